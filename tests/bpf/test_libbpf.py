"""director.dataplane.libbpf: the ctypes binding over libbpf.so.1, on the real objects and kernel."""

from __future__ import annotations

import errno
import os
import subprocess
import uuid

import pytest

from bpf_world import BPFFS, TC_OBJ, require
from director.dataplane import bpf_structs as S
from director.dataplane import libbpf as L

BAD_PROG = r"""
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
SEC("tc")
int unchecked(struct __sk_buff *skb)
{
	return *(int *)((void *)(long)skb->data + 100); /* no bounds check: the verifier refuses */
}
char LICENSE[] SEC("license") = "GPL";
"""


@pytest.fixture
def loaded():
    """director_tc.o loaded without pins (maps private to the test)."""
    require()
    with L.BpfObject(TC_OBJ) as obj:
        obj.set_max_entries("clients", 64)
        obj.load()
        yield obj


def test_names_and_fds(loaded):
    assert loaded.prog_names == ["director_tc"]
    assert set(S.MAPS) <= set(loaded.map_names)
    assert loaded.prog_fd("director_tc") > 0
    assert L.map_info(loaded.map_fd("clients")).max_entries == 64  # set before load


def test_unknown_names_raise_enoent(loaded):
    with pytest.raises(OSError) as e:
        loaded.map_fd("nope")
    assert e.value.errno == errno.ENOENT and "bpf_object__find_map_by_name(nope)" in str(e.value)
    with pytest.raises(OSError) as e:
        loaded.prog_fd("nope")
    assert e.value.errno == errno.ENOENT


def test_open_missing_file():
    require()
    with pytest.raises(OSError) as e:
        L.BpfObject("/nonexistent/x.o")
    assert e.value.errno == errno.ENOENT and "bpf_object__open_file" in str(e.value)


def test_map_operations_and_iteration(loaded):
    fd = loaded.map_fd("clients")
    keys = [S.client_key(0xC000020A, 0xCB007100 + i, i) for i in range(10)]
    for i, k in enumerate(keys):
        L.map_update(fd, k, S.client_val(i))
    assert S.unpack_client_val(L.map_lookup(fd, keys[3], 16)) == (3, 0)
    assert sorted(L.map_keys(fd, 12)) == sorted(keys)
    assert dict(L.map_items(fd, 12, 16)) == {k: S.client_val(i) for i, k in enumerate(keys)}
    with pytest.raises(OSError) as e:
        L.map_update(fd, keys[0], S.client_val(9), L.BPF_NOEXIST)
    assert e.value.errno == errno.EEXIST and "bpf_map_update_elem" in str(e.value)
    assert L.map_delete(fd, keys[0]) is True
    assert L.map_delete(fd, keys[0]) is False
    assert L.map_lookup(fd, keys[0], 16) is None
    assert L.map_next_key(fd, None, 12) in keys[1:]


def test_percpu_lookup_size(loaded):
    ncpus = L.num_possible_cpus()
    assert ncpus >= 1
    raw = L.map_lookup(loaded.map_fd("stats"), S.u32(0), S.percpu_size(S.DP_STATS, ncpus))
    assert len(raw) == ncpus * S.DP_STATS.size and S.unpack_dp_stats(raw, ncpus)["miss"] == 0


def test_pin_obj_get_and_pin_path_reuse():
    """A pinned map opened by path is the same map; a second object reuses it through set_pin_path."""
    require()
    pin = BPFFS / f"vpnd-test-libbpf-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    pin.mkdir()
    fd = -1
    try:
        with L.BpfObject(TC_OBJ) as a:
            a.set_pin_path("vips", pin / "vips")
            a.load()
            assert (pin / "vips").exists()
            L.map_update(a.map_fd("vips"), S.addr(0xC000020A), S.vip_val(7, S.VIP_F_AH))
            fd = L.obj_get(pin / "vips")
            info = L.map_info(fd)
            assert (info.key_size, info.value_size, info.name) == (4, 4, "vips")
            assert S.unpack_vip_val(L.map_lookup(fd, S.addr(0xC000020A), 4)) == (7, S.VIP_F_AH)
            with L.BpfObject(TC_OBJ) as b:
                b.set_pin_path("vips", pin / "vips")
                b.load()
                assert L.map_info(b.map_fd("vips")).id == info.id
            L.obj_pin(a.prog_fd("director_tc"), pin / "prog")
            prog = L.obj_get(pin / "prog")
            L.close_fd(prog)
        with pytest.raises(OSError) as e:
            L.obj_get(pin / "nope")
        assert e.value.errno == errno.ENOENT and "bpf_obj_get" in str(e.value)
    finally:
        if fd >= 0:
            L.close_fd(fd)
        for p in pin.iterdir():
            p.unlink()
        pin.rmdir()


def test_failed_load_carries_the_verifier_log(tmp_path):
    require()
    src, obj = tmp_path / "bad.bpf.c", tmp_path / "bad.o"
    src.write_text(BAD_PROG)
    arch = os.uname().machine
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", f"-I/usr/include/{arch}-linux-gnu", "-c", str(src),
                    "-o", str(obj)], check=True)  # fmt: skip
    with L.BpfObject(obj) as bad:
        with pytest.raises(OSError) as e:
            bad.load()
    assert e.value.errno == errno.EACCES
    assert "bpf_object__load" in str(e.value) and "invalid access to packet" in str(e.value)


def test_prog_test_run_repeat(loaded):
    frame = bytes(12) + b"\x08\x06" + bytes(28)  # ARP: passed untouched
    r = L.prog_test_run(loaded.prog_fd("director_tc"), frame, repeat=100)
    assert (r.retval, r.data_out) == (0, frame)
    assert r.duration >= 0
    with pytest.raises(OSError) as e:
        L.prog_test_run(loaded.prog_fd("director_tc"), b"")
    assert e.value.errno == errno.EINVAL and "bpf_prog_test_run_opts" in str(e.value)


def test_array_values_reads_a_whole_array_by_index(loaded):
    fd = loaded.map_fd("servers")
    L.map_update(fd, S.u32(7), S.server_val(0x0A000001, S.METHOD_DR, slot=3))
    L.map_update(fd, S.u32(S.SERVER_IDS - 1), S.server_val(0x0A000002, S.METHOD_TUN, slot=4))
    values = L.array_values(fd, S.SERVER_VAL.size, S.SERVER_IDS)
    assert len(values) == S.SERVER_IDS
    written = {i: (S.unpack_server_val(v), S.server_slot(v)) for i, v in enumerate(values) if any(v)}
    assert written == {7: ((0x0A000001, S.METHOD_DR), 3), S.SERVER_IDS - 1: ((0x0A000002, S.METHOD_TUN), 4)}
