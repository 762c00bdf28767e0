"""Byte layouts of the fast path's map keys and values: ``struct.Struct`` mirrors of ebpf/include/structs.h.

docs/fastpath.md is the contract. Addresses are kept in network order, as in the packet (an ``int``
such as ``director.packet.ip_to_int("192.0.2.1")`` goes in as its 4 big-endian bytes); ports, ids,
counters and times are in host order (native ``=`` formats, standard sizes, no implicit padding:
the C structs pad explicitly). tests/bpf/test_struct_layout.py compares every :class:`Layout`
here (size and each field's offset and size) with the BTF of the compiled object.

Per-CPU maps (``stats``, ``rs_stats``): a lookup returns one value per possible CPU, each rounded
up to 8 bytes (:func:`percpu_size`); :func:`unpack_dp_stats` and :func:`unpack_rs_stats` sum them.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from director.forwarding.method import Method

__all__ = [
    "ADMIT",
    "ADMIT_SRC",
    "CLIENT6_KEY",
    "CLIENT_KEY",
    "CLIENT_VAL",
    "DP_CONFIG",
    "DP_F_FIB_RULES",
    "DP_STATS",
    "LABEL_SEEN_VAL",
    "LABEL_STATS",
    "LAYOUTS",
    "MAPS",
    "METHOD_DR",
    "METHOD_NAT",
    "METHOD_TUN",
    "RS_STATS",
    "SERVER6_VAL",
    "SERVER_VAL",
    "SERVER_IDS",
    "RS_STATS_SLOTS",
    "LAST_SEEN_GRAIN_NS",
    "NextHop",
    "SPI_LABEL_CFG",
    "SPI_LABEL_SLOTS",
    "U32",
    "VIP_F_AH",
    "VIP_VAL",
    "DpConfig",
    "Field",
    "Layout",
    "MapSpec",
    "addr",
    "addr6",
    "addr_int",
    "admit",
    "admit_window",
    "client6_key",
    "client_key",
    "client_val",
    "dp_config",
    "percpu_size",
    "percpu_zero",
    "server_val",
    "u32",
    "unpack_admit",
    "unpack_client_key",
    "unpack_client_val",
    "unpack_dp_config",
    "unpack_dp_stats",
    "unpack_label_seen",
    "unpack_label_stats",
    "unpack_rs_stats",
    "unpack_server_val",
    "unpack_server_nh",
    "server_slot",
    "unpack_u32",
    "unpack_vip_val",
    "vip_val",
]

VIP_F_AH = 0x01  # vip_val.flags: AH is accepted for this service
DP_F_FIB_RULES = 0x01  # dp_config.flags: route lookups follow the ip rules (else the main table directly)
METHOD_DR, METHOD_TUN, METHOD_NAT = int(Method.DR), int(Method.TUN), int(Method.NAT)  # server_val.method


class Field(NamedTuple):
    """One member of a C struct."""

    name: str
    offset: int  # bytes from the start of the struct
    size: int  # bytes (a whole array for array fields)
    fmt: str  # struct format of the field ("4s" = an address in network order, "8Q" = __u64[8])


class Layout(NamedTuple):
    """One C struct: its name in structs.h, its fields in order, and the precompiled Struct."""

    name: str
    fields: tuple[Field, ...]
    struct: struct.Struct

    @property
    def size(self) -> int:
        """sizeof(struct name)."""
        return self.struct.size

    def offset(self, field: str) -> int:
        """offsetof(struct name, field)."""
        for f in self.fields:
            if f.name == field:
                return f.offset
        raise KeyError(f"struct {self.name} has no field {field}")


def _layout(name: str, *fields: tuple[str, str]) -> Layout:
    out, offset = [], 0
    for fname, fmt in fields:
        size = struct.calcsize("=" + fmt)
        out.append(Field(fname, offset, size, fmt))
        offset += size
    return Layout(name, tuple(out), struct.Struct("=" + "".join(fmt for _, fmt in fields)))


VIP_VAL = _layout("vip_val", ("svc", "H"), ("flags", "B"), ("pad", "x"))
CLIENT_KEY = _layout("client_key", ("vip", "4s"), ("client", "4s"), ("port", "H"), ("pad", "H"))
CLIENT_VAL = _layout("client_val", ("rs", "H"), ("pad0", "H"), ("pad1", "I"), ("last_seen", "Q"))
SERVER_VAL = _layout(
    "server_val", ("addr", "4s"), ("method", "B"), ("nh_ok", "B"), ("nh_mtu", "H"), ("nh_ifindex", "I"),
    ("nh_dmac", "6s"), ("nh_smac", "6s"), ("slot", "H"), ("pad", "H"),
)
SERVER_IDS = 65536  # `servers` is an array indexed by real server id (structs.h)
RS_STATS_SLOTS = 4096  # `rs_stats` is a per-CPU array indexed by server_val.slot
DP_CONFIG = _layout(
    "dp_config", ("lan_addr", "4s"), ("lan_ifindex", "I"), ("lan_mtu", "I"), ("client_ifindex", "I"), ("flags", "I")
)
DP_STATS = _layout(
    "dp_stats",
    ("fwd_packets", "8Q"),
    ("fwd_bytes", "8Q"),
    ("pass_packets", "8Q"),
    ("miss", "Q"),
    ("fragments", "Q"),
    ("not_ours", "Q"),
    ("fib_miss", "Q"),
    ("mtu_pass", "Q"),
    ("ttl_pass", "Q"),
    ("replies", "Q"),
    ("drops", "128Q"),
)
RS_STATS = _layout("rs_stats", ("packets", "8Q"), ("bytes", "8Q"))
ADMIT = _layout("admit", ("per_window", "I"), ("per_source", "I"), ("window_ns", "Q"), ("window", "Q"), ("count", "Q"))
ADMIT_SRC = _layout("admit_src", ("window", "Q"), ("count", "Q"))
# SPI labels (ebpf/include/spi_label.h; packed by director.dataplane.bpf_spi_label)
SPI_LABEL_SLOTS = 16
SPI_LABEL_CFG = _layout(
    "spi_label_cfg",
    ("mask", "Q"),
    ("label", f"{SPI_LABEL_SLOTS}Q"),
    ("esp_min", f"{SPI_LABEL_SLOTS}I"),
    ("esp_max", f"{SPI_LABEL_SLOTS}I"),
    ("rs", f"{SPI_LABEL_SLOTS}H"),
    ("n", "H"),
    ("pad", "6x"),
)
LABEL_SEEN_VAL = _layout("label_seen_val", ("spi", "I"), ("rs", "H"), ("pad", "H"), ("first", "Q"))
LABEL_STATS = _layout("label_stats", ("forwarded", "Q"), ("unknown", "Q"), ("recorded", "Q"))

# -- per-source ingress limits (ebpf/include/ingress.h; in the client-side objects only) -------------
INGRESS_CFG = _layout("ingress_cfg", ("esp_pps", "I"), ("ah_pps", "I"), ("ike_pps", "I"), ("burst", "I"))
INGRESS_KEY = _layout("ingress_key", ("vip", "4s"), ("src", "4s"), ("cls", "B"), ("pad", "3x"))
INGRESS_TB = _layout("ingress_tb", ("tokens", "Q"), ("last_ns", "Q"))
INGRESS_LAYOUTS = {l.name: l for l in (INGRESS_CFG, INGRESS_KEY, INGRESS_TB)}


def ingress_cfg(esp_pps: int, ah_pps: int, ike_pps: int, burst: int) -> bytes:
    """Value of ``ingress_cfg`` (key: the VIP, :func:`addr`): a service's ``ingress`` table."""
    return INGRESS_CFG.struct.pack(esp_pps, ah_pps, ike_pps, burst)


def ingress_key(vip: int, src: int, cls: int) -> bytes:
    return INGRESS_KEY.struct.pack(_ADDR.pack(vip), _ADDR.pack(src), cls)


def unpack_ingress_tb(b: bytes) -> tuple[int, int]:
    """(tokens in nano-packets, last_ns) of an ``ingress_src`` value."""
    return INGRESS_TB.struct.unpack(b)


#: Every struct of docs/fastpath.md, by its C name.
CLIENT6_KEY = _layout("client6_key", ("vip", "16s"), ("client", "16s"), ("port", "H"), ("pad", "H"))
SERVER6_VAL = _layout("server6_val", ("addr", "16s"))

LAYOUTS = {l.name: l for l in (VIP_VAL, CLIENT_KEY, CLIENT_VAL, SERVER_VAL, DP_CONFIG, DP_STATS, RS_STATS,
                               ADMIT, ADMIT_SRC, SPI_LABEL_CFG, LABEL_SEEN_VAL, LABEL_STATS, CLIENT6_KEY, SERVER6_VAL)}

U32 = struct.Struct("=I")  # __u32 keys (rs_id, array index) in host order
_ADDR = struct.Struct("!I")  # an address: network order


class MapSpec(NamedTuple):
    """Key and value sizes of one map, as the syscalls move them."""

    key_size: int
    value_size: int  # one CPU's value for per-CPU maps
    percpu: bool
    array: bool = False  # an ARRAY or PERCPU_ARRAY: every index exists, nothing is deleted


#: The maps of docs/fastpath.md: name -> sizes (for map_lookup/map_keys on pinned fds).
MAPS = {
    "vips": MapSpec(4, VIP_VAL.size, False),
    "clients": MapSpec(CLIENT_KEY.size, CLIENT_VAL.size, False),
    "servers": MapSpec(4, SERVER_VAL.size, False, True),
    "nat_replies": MapSpec(4, 4, False),
    "config": MapSpec(4, DP_CONFIG.size, False, True),
    "stats": MapSpec(4, DP_STATS.size, True, True),
    "rs_stats": MapSpec(4, RS_STATS.size, True, True),
    "admit": MapSpec(4, ADMIT.size, False, True),
    "admit_src": MapSpec(4, ADMIT_SRC.size, False),
    "spi_labels": MapSpec(4, SPI_LABEL_CFG.size, False),  # key: service id
    "label_seen": MapSpec(CLIENT_KEY.size, LABEL_SEEN_VAL.size, False),
    "label_stats": MapSpec(4, LABEL_STATS.size, True, True),
    "ingress_cfg": MapSpec(4, INGRESS_CFG.size, False),
    "ingress_src": MapSpec(INGRESS_KEY.size, INGRESS_TB.size, False),
    # IPv6 (docs/ipv6.md): servers and rs_stats are shared with IPv4
    "vips6": MapSpec(16, VIP_VAL.size, False),
    "clients6": MapSpec(CLIENT6_KEY.size, CLIENT_VAL.size, False),
    "servers6": MapSpec(4, SERVER6_VAL.size, False, True),
}


# -- scalars ----------------------------------------------------------------------------------------


def addr(address: int) -> bytes:
    """An IPv4 address (int, as director.packet.ip_to_int gives) as 4 bytes in network order.

    Key of ``vips`` (the VIP) and ``nat_replies`` (the RIP), value of ``nat_replies`` (the VIP).
    """
    return _ADDR.pack(address)


def addr6(address: int) -> bytes:
    """An IPv6 address (a 128-bit int, director.packet) as 16 bytes in network order: key of
    ``vips6``, value of ``servers6``."""
    return address.to_bytes(16, "big")


def client6_key(vip: int, client: int, port: int = 0) -> bytes:
    """Key of ``clients6``: as :func:`client_key`, with IPv6 addresses."""
    return CLIENT6_KEY.struct.pack(vip.to_bytes(16, "big"), client.to_bytes(16, "big"), port, 0)


def unpack_client6_key(b: bytes) -> tuple[int, int, int]:
    """(vip, client, port) of a ``clients6`` key."""
    vip, client, port, _pad = CLIENT6_KEY.struct.unpack(b)
    return int.from_bytes(vip, "big"), int.from_bytes(client, "big"), port


def addr_int(b: bytes) -> int:
    """The int of a 4-byte network-order address (inverse of :func:`addr`)."""
    return _ADDR.unpack(b)[0]


def u32(value: int) -> bytes:
    """A host-order __u32: key of ``servers`` and ``rs_stats`` (rs_id), of ``config`` and ``stats`` (0)."""
    return U32.pack(value)


def unpack_u32(b: bytes) -> int:
    """Inverse of :func:`u32`."""
    return U32.unpack(b)[0]


# -- keys and values --------------------------------------------------------------------------------


def vip_val(svc: int, flags: int = 0) -> bytes:
    """Value of ``vips``: service id and flags (VIP_F_AH)."""
    return VIP_VAL.struct.pack(svc, flags)


def unpack_vip_val(b: bytes) -> tuple[int, int]:
    """(svc, flags) of a ``vips`` value."""
    return VIP_VAL.struct.unpack(b)


def client_key(vip: int, client: int, port: int = 0) -> bytes:
    """Key of ``clients``: (VIP, client address, client UDP source port for ESP-in-UDP or 0); pad 0."""
    return CLIENT_KEY.struct.pack(_ADDR.pack(vip), _ADDR.pack(client), port, 0)


def unpack_client_key(b: bytes) -> tuple[int, int, int]:
    """(vip, client, port) of a ``clients`` key."""
    vip, client, port, _pad = CLIENT_KEY.struct.unpack(b)
    return addr_int(vip), addr_int(client), port


LAST_SEEN_GRAIN_NS = 100_000_000  # the programs rewrite a client's last_seen at most this often (fastpath.h)


def client_val(rs: int, last_seen: int = 0) -> bytes:
    """Value of ``clients``: real server id and last_seen (ns of CLOCK_MONOTONIC; the programs write
    bpf_ktime_get_coarse_ns, that clock as of the last tick)."""
    return CLIENT_VAL.struct.pack(rs, 0, 0, last_seen)


def unpack_client_val(b: bytes) -> tuple[int, int]:
    """(rs, last_seen) of a ``clients`` value; last_seen in ns, ``/ 1e9`` compares with time.monotonic()."""
    rs, _p0, _p1, last_seen = CLIENT_VAL.struct.unpack(b)
    return rs, last_seen


class NextHop(NamedTuple):
    """A real server's next hop as the daemon resolved it (``server_val.nh_*``)."""

    ifindex: int
    mtu: int
    dmac: bytes  # 6 bytes: the real server's MAC, or its gateway's
    smac: bytes  # 6 bytes: the egress interface's


def server_val(address: int, method: int, nh: NextHop | None = None, slot: int = 0) -> bytes:
    """Value of ``servers`` (index: the real server id): the real server's address, its method
    (METHOD_DR/TUN/NAT), its next hop if resolved (else the programs look the route up per
    packet), and the slot of its counters in ``rs_stats``. All zero (``bytes(SERVER_VAL.size)``):
    no server."""
    if nh is None:
        return SERVER_VAL.struct.pack(_ADDR.pack(address), method, 0, 0, 0, bytes(6), bytes(6), slot, 0)
    return SERVER_VAL.struct.pack(_ADDR.pack(address), method, 1, min(nh.mtu, 0xFFFF), nh.ifindex, nh.dmac, nh.smac,
                                  slot, 0)  # fmt: skip


def unpack_server_val(b: bytes) -> tuple[int, int]:
    """(addr, method) of a ``servers`` value (addr 0: no server)."""
    a, method, *_ = SERVER_VAL.struct.unpack(b)
    return addr_int(a), method


def server_slot(b: bytes) -> int:
    """The ``rs_stats`` slot of a ``servers`` value."""
    return SERVER_VAL.struct.unpack(b)[7]


def unpack_server_nh(b: bytes) -> NextHop | None:
    """The next hop of a ``servers`` value, or None if it has none."""
    _a, _m, ok, mtu, ifindex, dmac, smac, _slot, _pad = SERVER_VAL.struct.unpack(b)
    return NextHop(ifindex, mtu, dmac, smac) if ok else None


class DpConfig(NamedTuple):
    """The ``config`` value, unpacked (addresses as ints)."""

    lan_addr: int
    lan_ifindex: int
    lan_mtu: int
    client_ifindex: int
    flags: int = 0


def dp_config(lan_addr: int, lan_ifindex: int, lan_mtu: int, client_ifindex: int, flags: int = 0) -> bytes:
    """Value of ``config`` (key u32(0)): TUN outer source, LAN ifindex, LAN MTU, client ifindex, DP_F_*."""
    return DP_CONFIG.struct.pack(_ADDR.pack(lan_addr), lan_ifindex, lan_mtu, client_ifindex, flags)


ADMIT_MIN_PER_WINDOW = 8  # the global window is as short as this allows (an even stream, not bursts)
ADMIT_MIN_WINDOW_NS = 1_000_000  # ... but not below 1 ms


def admit(rate: float, per_source: float) -> bytes:
    """Value of ``admit`` (key u32(0)) for ``rate`` initial IKE packets per second in all and
    ``per_source`` per source and second (0 = no limit; a fractional per-source limit rounds up):
    the global window is the shortest (>= 1 ms) that holds at least 8 packets; state empty."""
    per_window, window_ns = admit_window(rate)
    return ADMIT.struct.pack(per_window, _whole(per_source), window_ns, 0, 0)


def admit_window(rate: float) -> tuple[int, int]:
    """(per_window, window_ns) for a global rate; (0, 0) for no limit."""
    if rate <= 0:
        return 0, 0
    window_ns = max(ADMIT_MIN_WINDOW_NS, -int(-ADMIT_MIN_PER_WINDOW * 1e9 // rate))
    return min(0xFFFFFFFF, max(1, round(rate * window_ns / 1e9))), window_ns


def _whole(rate: float) -> int:
    return min(0xFFFFFFFF, -int(-rate // 1)) if rate > 0 else 0


def unpack_admit(b: bytes) -> tuple[int, int, int, int, int]:
    """(per_window, per_source, window_ns, window, count) of an ``admit`` value."""
    return ADMIT.struct.unpack(b)


def unpack_dp_config(b: bytes) -> DpConfig:
    """A ``config`` value as a :class:`DpConfig`."""
    a, lan_ifindex, lan_mtu, client_ifindex, flags = DP_CONFIG.struct.unpack(b)
    return DpConfig(addr_int(a), lan_ifindex, lan_mtu, client_ifindex, flags)


# -- per-CPU values ---------------------------------------------------------------------------------


def percpu_size(layout: Layout | int, ncpus: int) -> int:
    """Bytes of a per-CPU map value as the syscall moves it: ncpus * round_up(size, 8)."""
    size = layout if isinstance(layout, int) else layout.size
    return ncpus * ((size + 7) & ~7)


def percpu_zero(layout: Layout | int, ncpus: int) -> bytes:
    """An all-zero per-CPU value (to create or reset an entry of ``stats``/``rs_stats``)."""
    return bytes(percpu_size(layout, ncpus))


def _unpack_summed(layout: Layout, b: bytes, ncpus: int) -> dict[str, int | list[int]]:
    stride = (layout.size + 7) & ~7
    if len(b) < stride * ncpus:
        raise ValueError(f"{layout.name}: {len(b)} bytes for {ncpus} CPUs of {stride}")
    total = [0] * (layout.size // 8)
    unpack = struct.Struct(f"={layout.size // 8}Q").unpack_from
    for cpu in range(ncpus):
        for i, v in enumerate(unpack(b, cpu * stride)):
            total[i] += v
    out: dict[str, int | list[int]] = {}
    for f in layout.fields:
        i, n = f.offset // 8, f.size // 8
        out[f.name] = total[i] if f.fmt == "Q" else total[i : i + n]
    return out


def unpack_dp_stats(b: bytes, ncpus: int) -> dict[str, int | list[int]]:
    """A ``stats`` lookup summed over CPUs, by field name.

    Arrays stay lists: {"fwd_packets": [8 by Kind], ..., "miss": n, ..., "drops": [128 by DropReason]}.
    """
    return _unpack_summed(DP_STATS, b, ncpus)


def unpack_label_seen(b: bytes) -> tuple[int, int, int]:
    """(spi, rs, first) of a ``label_seen`` value: the ESP SPI, the real server its label named,
    the ns (bpf_ktime_get_ns) of the packet that made the record."""
    spi, rs, _pad, first = LABEL_SEEN_VAL.struct.unpack(b)
    return spi, rs, first


def unpack_label_stats(b: bytes, ncpus: int) -> dict[str, int]:
    """A ``label_stats`` lookup summed over CPUs: {"forwarded": n, "unknown": n, "recorded": n}."""
    return _unpack_summed(LABEL_STATS, b, ncpus)  # type: ignore[return-value]


def unpack_rs_stats(b: bytes, ncpus: int) -> dict[str, list[int]]:
    """An ``rs_stats`` lookup summed over CPUs: {"packets": [8 by Kind], "bytes": [8 by Kind]}."""
    return _unpack_summed(RS_STATS, b, ncpus)  # type: ignore[return-value]
