"""include/spi_label.h in the kernel agrees with director/spi_label.py, run through BPF_PROG_TEST_RUN.

ebpf/test_spi_label.bpf.c decodes the SPIs of a crafted frame with the header's functions; the
same inputs go through SpiLabels.decode_ike / decode_esp. Cases: a fixed table (the strongSwan
lab's labels: each rule of the module docstring) and a few thousand random SPIs built to hit
labels, misses and IKEv1 disagreements.
"""

from __future__ import annotations

import random
import struct

import pytest

from bpf_world import EBPF, require
from director.dataplane import libbpf as L
from director.dataplane.bpf_spi_label import SPI_LABEL_CFG, SPI_LABEL_NONE, spi_label_cfg
from director.spi_label import ServerLabel, SpiLabels
from test_struct_layout import btf_structs

OBJ = EBPF / "build" / "test_spi_label.o"
PROBE = struct.Struct("!14xQQBBxxI")
MASK = 0x00000000FF000000
LABELS = SpiLabels.build(MASK, {
    3: ServerLabel(0x41000000, 0x41000000, 0x41FFFFFF),
    7: ServerLabel(0x42000000, 0x42000000, 0x42FFFFFF),
    9: ServerLabel(0x00000000),  # label 0 and no ESP range: both allowed
})  # fmt: skip


@pytest.fixture(scope="module")
def probe():
    require()
    if not OBJ.is_file():
        pytest.fail(f"{OBJ} missing: `make -C ebpf`", pytrace=False)
    obj = L.BpfObject(OBJ)
    obj.load()
    prog, cfg = obj.prog_fd("spi_label_probe"), obj.map_fd("spi_label_test_cfg")

    def run(labels: SpiLabels, spi_i: int, spi_r: int, version: int, flags: int, esp: int) -> tuple:
        L.map_update(cfg, struct.pack("=I", 0), spi_label_cfg(labels))
        ret = L.prog_test_run(prog, PROBE.pack(spi_i, spi_r, version, flags, esp)).retval & 0xFFFFFFFF
        ike, esp_rs = ret >> 16, ret & 0xFFFF
        return (None if ike == SPI_LABEL_NONE else ike), (None if esp_rs == SPI_LABEL_NONE else esp_rs)

    yield run
    obj.close()


def expect(labels: SpiLabels, spi_i, spi_r, version, flags, esp) -> tuple:
    return labels.decode_ike(spi_i, spi_r, version, flags), labels.decode_esp(esp)


def test_layout_matches_btf():
    require()
    size, members = btf_structs(OBJ)["spi_label_cfg"]
    assert SPI_LABEL_CFG.size == size
    assert [(f.name, f.offset, f.size) for f in SPI_LABEL_CFG.fields] == members


CASES = [
    # (description, spi_i, spi_r, version, flags, esp SPI, expected (ike, esp))
    ("v2 client-started: responder SPI", 0x1111111143000000, 0xAAAAAAAA41BBBBBB, 2, 0x08, 0x41000000, (3, 3)),
    ("v2 server-started: initiator SPI", 0xAAAAAAAA42BBBBBB, 0x1111111141000000, 2, 0x00, 0x42FFFFFF, (7, 7)),
    ("v2 IKE_SA_INIT: responder SPI 0", 0xAAAAAAAA42BBBBBB, 0, 2, 0x08, 0x40FFFFFF, (None, None)),
    ("v2 label 0", 0x1, 0xFFFFFFFF00FFFFFF, 2, 0x28, 0x43000000, (9, None)),
    ("v2 unknown label", 0x1, 0xFFFFFFFF77FFFFFF, 2, 0x08, 0x100, (None, None)),
    ("v1 responder field", 0x1234567877000000, 0xAAAAAAAA41BBBBBB, 1, 0x00, 0x41ABCDEF, (3, 3)),
    ("v1 initiator field", 0xAAAAAAAA42BBBBBB, 0x1234567877000000, 1, 0x01, 0x42000000, (7, 7)),
    ("v1 disagreement", 0xAAAAAAAA42BBBBBB, 0xAAAAAAAA41BBBBBB, 1, 0x00, 0, (None, None)),
    ("v1 same label twice", 0xAAAAAAAA42BBBBBB, 0xCCCCCCCC42DDDDDD, 1, 0x00, 0xFFFFFFFF, (7, None)),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_case_table(probe, case):
    _desc, spi_i, spi_r, version, flags, esp, want = case
    assert expect(LABELS, spi_i, spi_r, version, flags, esp) == want  # the table is right about Python
    assert probe(LABELS, spi_i, spi_r, version, flags, esp) == want


def test_labels_off_answers_none(probe):
    assert probe(None, 0x1111111141000000, 0x1111111141000000, 2, 0x08, 0x41000000) == (None, None)


def test_random_spis_agree_with_python(probe):
    rng = random.Random(14)
    mismatches = []
    hits = 0
    for _ in range(40):
        width = rng.randint(1, 12)
        shift = rng.randint(0, 64 - width)
        mask = ((1 << width) - 1) << shift
        n = rng.randint(1, min(16, 1 << width))
        values = rng.sample(range(1 << width), n)
        cuts = sorted(rng.sample(range(256, 2**32), 2 * n))
        labels = SpiLabels.build(mask, {
            rs * 5 + 1: ServerLabel(v << shift, cuts[2 * rs], cuts[2 * rs + 1]) for rs, v in enumerate(values)
        })  # fmt: skip
        for _ in range(50):
            def some_spi() -> int:
                base = rng.getrandbits(64)
                return (base & ~mask) | (rng.choice(values) << shift) if rng.random() < 0.7 else base
            spi_i, spi_r = some_spi(), rng.choice([0, some_spi()])
            version, flags = rng.choice([1, 2]), rng.getrandbits(8)
            esp = rng.choice([rng.getrandbits(32), rng.randint(cuts[0], cuts[-1])])
            want = expect(labels, spi_i, spi_r, version, flags, esp)
            hits += want[0] is not None
            got = probe(labels, spi_i, spi_r, version, flags, esp)
            if got != want:
                mismatches.append((hex(mask), hex(spi_i), hex(spi_r), version, flags, hex(esp), want, got))
    assert mismatches == []
    assert hits > 500  # the inputs really hit labels (2,000 runs, ~70% labelled SPIs)
