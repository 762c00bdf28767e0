"""The Python mirrors (director/dataplane/bpf_structs.py) have the C layout: sizes and every offset.

The C truth is the BTF clang wrote into the compiled objects (``bpftool btf dump file ... format
raw``), not numbers copied by hand; the map definitions are checked against the kernel's view
of the loaded maps, and the constants of structs.h against the Python enums.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from bpf_world import REPLY_OBJ, TC_OBJ, XDP_OBJ, require
from director.dataplane import bpf_structs as S
from director.dataplane import libbpf as L
from director.packet import Kind
from director.service import Method

_TYPE = re.compile(r"^\[(\d+)\] (\w+) '([^']*)'(.*)$")
_MEMBER = re.compile(r"^\s+'([^']*)' type_id=(\d+) bits_offset=(\d+)")


def btf_structs(obj) -> dict[str, tuple[int, list[tuple[str, int, int]]]]:
    """Named structs of an object's BTF: name -> (size, [(member, byte offset, byte size)])."""
    require()
    out = subprocess.run(
        ["bpftool", "btf", "dump", "file", str(obj), "format", "raw"], capture_output=True, text=True, check=True
    ).stdout
    types: dict[int, tuple[str, str, str, list]] = {}
    current = None
    for line in out.splitlines():
        m = _TYPE.match(line)
        if m:
            current = [m.group(2), m.group(3), m.group(4), []]
            types[int(m.group(1))] = current
            continue
        m = _MEMBER.match(line)
        if m and current is not None:
            current[3].append((m.group(1), int(m.group(2)), int(m.group(3))))

    def attr(rest: str, key: str) -> int:
        return int(re.search(rf"\b{key}=(\d+)", rest).group(1))

    def size_of(tid: int) -> int:
        kind, _name, rest, _members = types[tid]
        if kind in ("INT", "STRUCT", "UNION", "ENUM"):
            return attr(rest, "size")
        if kind in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
            return size_of(attr(rest, "type_id"))
        if kind == "ARRAY":
            return size_of(attr(rest, "type_id")) * attr(rest, "nr_elems")
        if kind == "PTR":
            return 8
        raise AssertionError(f"BTF kind {kind} not handled")

    structs = {}
    for kind, name, rest, members in types.values():
        if kind == "STRUCT" and name:
            for _m, _tid, bits in members:
                assert bits % 8 == 0, f"{name}: bit field"
            structs[name] = (attr(rest, "size"), [(m, bits // 8, size_of(tid)) for m, tid, bits in members])
    return structs


@pytest.fixture(
    scope="module", params=[TC_OBJ, REPLY_OBJ, XDP_OBJ], ids=["director_tc.o", "director_reply.o", "director_xdp.o"]
)
def c_structs(request):
    return btf_structs(request.param)


@pytest.mark.parametrize("layout", list(S.LAYOUTS.values()), ids=list(S.LAYOUTS))
def test_python_mirror_matches_btf(c_structs, layout):
    assert layout.name in c_structs, f"struct {layout.name} not in the object's BTF"
    size, members = c_structs[layout.name]
    assert layout.size == size, f"sizeof(struct {layout.name})"
    assert [(f.name, f.offset, f.size) for f in layout.fields] == members


def test_every_contract_struct_is_mirrored(c_structs):
    contract = {"vip_val", "client_key", "client_val", "server_val", "dp_config", "dp_stats", "rs_stats", "admit",
                "admit_src", "spi_label_cfg", "label_seen_val", "label_stats", "client6_key", "server6_val"}  # fmt: skip
    assert contract <= set(c_structs)
    assert set(S.LAYOUTS) == contract


def test_map_specs_match_the_loaded_maps():
    require()
    with L.BpfObject(TC_OBJ) as obj:
        assert set(S.MAPS) <= set(obj.map_names)
        obj.load()
        for name, spec in S.MAPS.items():
            info = L.map_info(obj.map_fd(name))
            percpu = info.type in (5, 6)  # BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY
            assert (info.key_size, info.value_size, percpu) == (spec.key_size, spec.value_size, spec.percpu), name


def test_structs_h_constants_mirror_python():
    text = (TC_OBJ.parents[1] / "include" / "structs.h").read_text()
    kinds = {m[1]: int(m[2]) for m in re.finditer(r"\bKIND_([A-Z_]+)\s*=\s*(\d+)", text)}
    methods = {m[1]: int(m[2]) for m in re.finditer(r"\bMETHOD_([A-Z]+)\s*=\s*(\d+)", text)}
    assert kinds == {k.name: int(k) for k in Kind}
    assert methods == {m.name: int(m) for m in Method}
    assert (S.METHOD_DR, S.METHOD_TUN, S.METHOD_NAT) == (Method.DR, Method.TUN, Method.NAT)
    assert int(re.search(r"#define VIP_F_AH (0x[0-9a-f]+)", text).group(1), 16) == S.VIP_F_AH


def test_packing_helpers_round_trip():
    assert S.unpack_client_key(S.client_key(0xC000020A, 0xCB007107, 40000)) == (0xC000020A, 0xCB007107, 40000)
    assert S.client_key(0xC000020A, 1, 0)[:4] == bytes([192, 0, 2, 10])  # network order, as in the packet
    assert S.unpack_client_val(S.client_val(7, 123456789)) == (7, 123456789)
    assert S.unpack_server_val(S.server_val(0x0A01000B, S.METHOD_NAT)) == (0x0A01000B, S.METHOD_NAT)
    assert S.unpack_vip_val(S.vip_val(3, S.VIP_F_AH)) == (3, S.VIP_F_AH)
    cfg = S.unpack_dp_config(S.dp_config(0x0A010001, 4, 1500, 3, S.DP_F_FIB_RULES))
    assert cfg == S.DpConfig(0x0A010001, 4, 1500, 3, S.DP_F_FIB_RULES)
    ncpus = 3
    stride = S.DP_STATS.size
    raw = bytearray(S.percpu_size(S.DP_STATS, ncpus))
    for cpu in range(ncpus):  # miss = 1 per CPU, drops[30] = cpu
        off = cpu * stride + S.DP_STATS.offset("miss")
        raw[off : off + 8] = (1).to_bytes(8, sys.byteorder)
        off = cpu * stride + S.DP_STATS.offset("drops") + 30 * 8
        raw[off : off + 8] = cpu.to_bytes(8, sys.byteorder)
    st = S.unpack_dp_stats(bytes(raw), ncpus)
    assert st["miss"] == 3 and st["drops"][30] == 3 and len(st["drops"]) == 128 and sum(st["fwd_packets"]) == 0
