"""Helpers of the BPF tests (the fixture is in conftest.py): the compiled fast path, run with BPF_PROG_TEST_RUN.

:class:`World` loads ebpf/build/director_tc.o, director_reply.o and director_xdp.o with every map
pinned under a unique directory of /sys/fs/bpf (the other objects reuse the tc object's pins, as
the daemon's loader does; the XDP object's xdp_tx_ports lists cli0, lan0 and lan2), and builds a network namespace whose routes and permanent neighbour entries make
bpf_fib_lookup answer deterministically. BPF_PROG_TEST_RUN runs a program in the calling
thread's network namespace, so :meth:`World.run` enters that namespace around each run only (the
rest of the session, other test directories included, stays where it was). Everything is removed
at the end, also when a test or the setup fails. A missing prerequisite fails with a message.

Topology (namespace ``vpnd-bpf-<pid>``, both ends of each veth pair inside it, forwarding on)::

    cli0 198.51.100.1/24  02:00:00:00:00:02   clients 203.0.113.0/24 via 198.51.100.254 (gw, neigh)
    lan0 10.1.0.1/24      02:00:00:00:00:01   real servers .11 DR, .12 NAT, .13 TUN (neigh), .99 (none)
    lan2 10.2.0.1/24      02:00:00:00:00:03   MTU 1280; real server 10.2.0.11 (neigh)
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from director.packet import int_to_ip, ip_to_int

REPO = Path(__file__).resolve().parents[2]
EBPF = REPO / "ebpf"
TC_OBJ = EBPF / "build" / "director_tc.o"
REPLY_OBJ = EBPF / "build" / "director_reply.o"
XDP_OBJ = EBPF / "build" / "director_xdp.o"
BPFFS = Path("/sys/fs/bpf")
# rs_stats slots the tests use: setup_maps gives every real server its id as its slot (ids < 256)
RS_SLOTS_USED = 256
CLONE_NEWNET = 0x40000000

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
XDP_DROP, XDP_PASS, XDP_REDIRECT = 1, 2, 4


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


@dataclass(frozen=True)
class Topo:
    """Addresses of the test namespace (ints as director.packet uses them, MACs as bytes)."""

    cli0_mac: bytes = mac("02:00:00:00:00:02")
    lan0_mac: bytes = mac("02:00:00:00:00:01")
    lan2_mac: bytes = mac("02:00:00:00:00:03")
    gw_mac: bytes = mac("02:00:00:00:02:fe")  # the clients' gateway on cli0
    client_gw: int = ip_to_int("198.51.100.254")
    lan_addr: int = ip_to_int("10.1.0.1")
    rip_dr: int = ip_to_int("10.1.0.11")
    rip_nat: int = ip_to_int("10.1.0.12")
    rip_tun: int = ip_to_int("10.1.0.13")
    rip_noneigh: int = ip_to_int("10.1.0.99")  # on-link, no neighbour entry
    rip_smallmtu: int = ip_to_int("10.2.0.11")  # behind lan2, MTU 1280
    rip_dr_mac: bytes = mac("02:00:00:00:01:0b")
    rip_nat_mac: bytes = mac("02:00:00:00:01:0c")
    rip_tun_mac: bytes = mac("02:00:00:00:01:0d")
    rip_smallmtu_mac: bytes = mac("02:00:00:00:03:0b")
    lan_mtu: int = 1500
    # IPv6 (the same interfaces, their own prefixes; the real servers' MACs are the IPv4 ones')
    client6_gw: int = ip_to_int("2001:db8:c::fe")
    rip6_dr: int = ip_to_int("2001:db8:1::11")
    rip6_nat: int = ip_to_int("2001:db8:1::12")
    rip6_smallmtu: int = ip_to_int("2001:db8:2::11")


TOPO = Topo()


def _hex_mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def _ip(a: int) -> str:
    return ".".join(str((a >> s) & 0xFF) for s in (24, 16, 8, 0))


def prerequisites() -> list[str]:
    """Everything missing to run these tests, as readable sentences (empty: all present)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (BPF, bpffs, network namespaces; CI runs as root)")
    for tool in ("ip", "bpftool", "clang", "mount", "mountpoint"):
        if shutil.which(tool) is None:
            missing.append(f"`{tool}` on PATH (Debian: iproute2, bpftool, clang, util-linux)")
    sources = [*EBPF.glob("director_*.bpf.c"), *(EBPF / "include").glob("*.h")]
    for obj in (TC_OBJ, REPLY_OBJ, XDP_OBJ):
        if not obj.is_file():
            missing.append(f"{obj} (build it: `make -C ebpf`, clang + libbpf-dev)")
        elif any(s.stat().st_mtime > obj.stat().st_mtime for s in sources):
            missing.append(f"an up-to-date {obj} (older than its sources: `make -C ebpf`)")
    try:
        ctypes.CDLL("libbpf.so.1")
    except OSError:
        missing.append("libbpf.so.1 (Debian: libbpf1)")
    return missing


def require() -> None:
    missing = prerequisites()
    if missing:
        pytest.fail("BPF test prerequisites missing: " + "; ".join(missing), pytrace=False)


def _sh(*args: str) -> str:
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns(CLONE_NEWNET): {os.strerror(e)}")


class Netns:
    """A named network namespace (``ip netns add``) with the topology above; ``close()`` deletes it."""

    def __init__(self) -> None:
        self.name = f"vpnd-bpf-{os.getpid()}"
        if Path(f"/run/netns/{self.name}").exists():
            _sh("ip", "netns", "del", self.name)  # left by a killed run of this pid
        _sh("ip", "netns", "add", self.name)
        self.fd = -1
        try:
            self._build()
            self.fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        except BaseException:
            self.close()
            raise

    def _ip(self, *args: str) -> str:
        return _sh("ip", "-n", self.name, *args)

    def _build(self) -> None:
        t = TOPO
        # ip_forward first: devices created afterwards inherit forwarding=1 (bpf_fib_lookup answers
        # FWD_DISABLED for an input interface that does not forward).
        _sh("ip", "netns", "exec", self.name, "sysctl", "-qw", "net.ipv4.conf.all.forwarding=1")
        _sh("ip", "netns", "exec", self.name, "sysctl", "-qw", "net.ipv4.conf.default.forwarding=1")
        for key in ("net.ipv6.conf.all.forwarding=1", "net.ipv6.conf.default.accept_dad=0"):
            _sh("ip", "netns", "exec", self.name, "sysctl", "-qw", key)
        for dev, peer, macaddr, addr, mtu in (
            ("cli0", "cli1", t.cli0_mac, "198.51.100.1/24", 1500),
            ("lan0", "lan1", t.lan0_mac, "10.1.0.1/24", t.lan_mtu),
            ("lan2", "lan3", t.lan2_mac, "10.2.0.1/24", 1280),
        ):
            self._ip("link", "add", dev, "address", _hex_mac(macaddr), "mtu", str(mtu), "type", "veth",
                     "peer", "name", peer, "mtu", str(mtu))  # fmt: skip
            self._ip("addr", "add", addr, "dev", dev)
            self._ip("link", "set", dev, "up")
            self._ip("link", "set", peer, "up")
        for addr, lladdr, dev in (
            (t.client_gw, t.gw_mac, "cli0"),
            (t.rip_dr, t.rip_dr_mac, "lan0"),
            (t.rip_nat, t.rip_nat_mac, "lan0"),
            (t.rip_tun, t.rip_tun_mac, "lan0"),
            (t.rip_smallmtu, t.rip_smallmtu_mac, "lan2"),
        ):
            self._ip("neigh", "replace", _ip(addr), "lladdr", _hex_mac(lladdr), "dev", dev, "nud", "permanent")
        self._ip("route", "add", "203.0.113.0/24", "via", _ip(t.client_gw), "dev", "cli0")
        for dev, addr in (("cli0", "2001:db8:c::1/64"), ("lan0", "2001:db8:1::1/64"), ("lan2", "2001:db8:2::1/64")):
            self._ip("addr", "add", addr, "dev", dev, "nodad")
        for addr, lladdr, dev in ((t.client6_gw, t.gw_mac, "cli0"), (t.rip6_dr, t.rip_dr_mac, "lan0"),
                                  (t.rip6_nat, t.rip_nat_mac, "lan0"),
                                  (t.rip6_smallmtu, t.rip_smallmtu_mac, "lan2")):  # fmt: skip
            self._ip("neigh", "replace", int_to_ip(addr), "lladdr", _hex_mac(lladdr), "dev", dev, "nud", "permanent")
        self._ip("-6", "route", "add", "2001:db8:77::/64", "via", int_to_ip(t.client6_gw), "dev", "cli0")
        self.ifindex = {d["ifname"]: d["ifindex"] for d in json.loads(self._ip("-j", "link", "show"))}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


class World:
    """Both programs loaded, maps pinned under ``pin_dir``, runs inside ``netns``."""

    def __init__(self, netns: Netns, pin_dir: Path) -> None:
        from director.dataplane import bpf_structs as S
        from director.dataplane import libbpf as L

        self.S, self.L = S, L
        self.netns = netns
        self.pin_dir = pin_dir
        self.ncpus = L.num_possible_cpus()
        self.objs = []
        self._servers_put: set[bytes] = set()
        for path in (TC_OBJ, REPLY_OBJ, XDP_OBJ):  # the tc object creates and pins, the others reuse
            obj = L.BpfObject(path)
            self.objs.append(obj)
            for name in S.MAPS:
                if name in obj.map_names:  # the ingress maps are the client-side objects' only
                    obj.set_pin_path(name, pin_dir / name)
            obj.load()
        self.prog_fd = {
            "tc": self.objs[0].prog_fd("director_tc"),
            "reply": self.objs[1].prog_fd("director_reply"),
            "xdp": self.objs[2].prog_fd("director_xdp"),
        }
        self.map_fd = {name: self.objs[0].map_fd(name) for name in S.MAPS}
        self.tx_ports_fd = self.objs[2].map_fd("xdp_tx_ports")
        self.set_tx_ports(["cli0", "lan0", "lan2"])

    def set_tx_ports(self, ifnames: list[str]) -> None:
        """The XDP program's xdp_tx_ports: exactly these interfaces of the namespace.

        A DEVMAP resolves an ifindex in the updating thread's namespace: updated from inside it."""
        L = self.L
        with self._inside():
            for k in list(L.map_keys(self.tx_ports_fd, 4)):
                L.map_delete(self.tx_ports_fd, k)
            for name in ifnames:
                i = self.S.u32(self.netns.ifindex[name])
                L.map_update(self.tx_ports_fd, i, i)

    # -- running ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _inside(self):
        """The calling thread inside the test namespace for the body, and back."""
        orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            _setns(self.netns.fd)
            try:
                yield
            finally:
                _setns(orig)
        finally:
            os.close(orig)

    def run(self, prog: str, frame: bytes):
        """BPF_PROG_TEST_RUN of ``prog`` ("tc", "reply" or "xdp") on ``frame`` inside the test namespace."""
        with self._inside():
            return self.L.prog_test_run(self.prog_fd[prog], frame)

    def run_repeat(self, prog: str, frame: bytes, repeat: int):
        """``repeat`` runs of ``prog`` on ``frame`` in one call (BPF_PROG_TEST_RUN reruns on the same
        packet, rewrites included); ``duration`` is the mean ns per run. For bench/bench_spi_label.py."""
        with self._inside():
            return self.L.prog_test_run(self.prog_fd[prog], frame, repeat=repeat)

    # -- maps ---------------------------------------------------------------------------------------
    def clear(self) -> None:
        """Empty every hash map, zero the stats, the config and the admission limits."""
        L, S = self.L, self.S
        for name in ("vips", "clients", "nat_replies", "admit_src", "spi_labels", "label_seen", "ingress_cfg",
                     "ingress_src", "vips6", "clients6"):
            fd = self.map_fd[name]
            for key in list(L.map_keys(fd, S.MAPS[name].key_size)):
                L.map_delete(fd, key)
        # the arrays: `servers` indexes written by put(), the first RS_SLOTS_USED counter slots
        for key in self._servers_put:
            L.map_update(self.map_fd["servers"], key, bytes(S.SERVER_VAL.size))
            L.map_update(self.map_fd["servers6"], key, bytes(S.SERVER6_VAL.size))
        self._servers_put = set()
        zero = S.percpu_zero(S.RS_STATS, self.ncpus)
        for slot in range(RS_SLOTS_USED):
            L.map_update(self.map_fd["rs_stats"], S.u32(slot), zero)
        L.map_update(self.map_fd["stats"], S.u32(0), S.percpu_zero(S.DP_STATS, self.ncpus))
        L.map_update(self.map_fd["label_stats"], S.u32(0), S.percpu_zero(S.LABEL_STATS, self.ncpus))
        L.map_update(self.map_fd["config"], S.u32(0), bytes(S.DP_CONFIG.size))
        L.map_update(self.map_fd["admit"], S.u32(0), bytes(S.ADMIT.size))  # no admission limits

    def put(self, name: str, key: bytes, value: bytes) -> None:
        if name in ("servers", "servers6"):
            self._servers_put.add(key)
        self.L.map_update(self.map_fd[name], key, value)

    def get(self, name: str, key: bytes) -> bytes | None:
        spec = self.S.MAPS[name]
        size = self.S.percpu_size(spec.value_size, self.ncpus) if spec.percpu else spec.value_size
        return self.L.map_lookup(self.map_fd[name], key, size)

    def stats(self) -> dict[str, int]:
        """dp_stats summed over CPUs, flattened: "miss", "pass_packets[4]", "drops[30]", ..."""
        raw = self.get("stats", self.S.u32(0))
        return flatten(self.S.unpack_dp_stats(raw, self.ncpus))

    def label_stats(self) -> dict[str, int]:
        """label_stats summed over CPUs: forwarded, unknown, recorded."""
        return self.S.unpack_label_stats(self.get("label_stats", self.S.u32(0)), self.ncpus)

    def label_seen(self) -> dict[bytes, tuple[int, int, int]]:
        """Every label_seen record: client key -> (spi, rs, first ns)."""
        L, S = self.L, self.S
        return {k: S.unpack_label_seen(v)
                for k, v in L.map_items(self.map_fd["label_seen"], S.CLIENT_KEY.size, S.LABEL_SEEN_VAL.size)}

    def rs_stats(self) -> dict[int, dict]:
        """Every rs_stats slot (of the first RS_SLOTS_USED) that counted something, summed over CPUs."""
        L, S = self.L, self.S
        size = S.percpu_size(S.RS_STATS, self.ncpus)
        out = {}
        for slot in range(RS_SLOTS_USED):
            c = S.unpack_rs_stats(L.map_lookup(self.map_fd["rs_stats"], S.u32(slot), size), self.ncpus)
            if any(c["packets"]) or any(c["bytes"]):
                out[slot] = c
        return out

    def close(self) -> None:
        for obj in self.objs:
            obj.close()


def flatten(stats: dict) -> dict[str, int]:
    out = {}
    for name, value in stats.items():
        if isinstance(value, list):
            for i, v in enumerate(value):
                out[f"{name}[{i}]"] = v
        else:
            out[name] = value
    return out


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The counters that changed, with their change."""
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


@contextlib.contextmanager
def bench_world():
    """A World in its own namespace and pin directory, for the benchmarks (bench/bench_bpf_prog.py,
    bench/bench_spi_label.py); everything removed on the way out."""
    import uuid

    pin_dir = BPFFS / f"vpnd-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    pin_dir.mkdir()
    netns = world = None
    try:
        netns = Netns()
        world = World(netns, pin_dir)
        yield world
    finally:
        if world is not None:
            world.close()
        if netns is not None:
            netns.close()
        for pin in pin_dir.iterdir():
            pin.unlink()
        pin_dir.rmdir()
