"""The eBPF fast path adapter: load, pin, attach, and keep the maps equal to the table's projection.

The contract with the C programs is docs/fastpath.md. What the ``clients`` map holds is a
projection of the connection table (``core.ClientProjection``): for each service and client, the
real server of the client's newest ESTABLISHED entry, under the key (VIP, client, 0) for raw
ESP/AH and (VIP, client, port) for ESP-in-UDP. The projection follows the table's events and
notes which keys may have changed; ``flush`` writes exactly those. ESP forwarded in the kernel
never reaches the table, so the table asks the projection before it expires an ESTABLISHED entry,
which reads the map's last-seen time: the entry lives on if the fast path saw its client recently.
The ``clients`` map is reached through a ``MapAccess`` (``BpfMap`` in production), which a test
replaces to check the projection without a kernel.

Maps and programs outlive the daemon (pinned, attached): a restart loses no ESP packet of an
established client, and the restarted daemon adopts the clients it finds in the ``clients`` map.

The client-side program runs at one of two hooks (``daemon.fastpath_hook``): tc clsact ingress
(director_tc, the default) or native XDP (director_xdp, the same decision; docs/fastpath.md, "The
XDP hook"). The NAT reply program stays at tc on the LAN interface either way. XDP can redirect
only to a device that transmits XDP frames (``ndo_xdp_xmit``); the loader asks the kernel
(netdev generic netlink, ``xdp-features``) and refuses XDP rather than let frames vanish.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink import NLM_F_REQUEST, genlmsg
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import GenericNetlinkSocket

from director.core import ClientProjection, Director
from director.drop_reasons import DropReason
from director.dataplane import bpf_structs as bs
from director.dataplane import libbpf, nexthop
from director.dataplane.bpf_spi_label import spi_label_cfg
from director.packet import int_to_ip, is_ipv6
from director.service import Method

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]


def object_dir() -> Path:
    """Where the compiled eBPF objects are. Run from a source tree (an editable install, the tests,
    the demo): ``ebpf/build``, which ``make -C ebpf`` keeps current. Installed from a wheel or an
    sdist: ``director/bpf`` inside the installed package, compiled there by the build hook
    (setup.py); no source tree is needed."""
    src = REPO / "ebpf"
    if (src / "Makefile").is_file():
        return src / "build"
    from importlib import resources

    return Path(str(resources.files("director") / "bpf"))


OBJ_DIR = object_dir()
PIN_DIR = Path("/sys/fs/bpf/vpn-director")
FILTER_PRIO = 0xC0DE  # our tc filter's priority on each interface: found and replaced by it
INGRESS = "ffff:fff2"
ADOPTED_SPI = 0xADAD_0000_0000_0000  # initiator "cookie" of entries rebuilt from the map (| port)
_MAPS = ("vips", "clients", "servers", "nat_replies", "config", "stats", "rs_stats", "admit", "admit_src",
         "spi_labels", "label_seen", "label_stats", "ingress_cfg", "ingress_src",
         "vips6", "clients6", "servers6")  # fmt: skip
_SIZED = ("clients", "clients6")  # sized daemon.capacity before load
LABEL_DRAIN_MAX = 4096  # label_seen records turned into entries per tick, at most (a flood waits its turn)
_RETURN_MAPS = ("return_vips", "return_macs", "return_stats")  # director_reply's own (include/return_path.h)
_RET_DROP_BASE, _RET_FORWARDED, _RET_STATS = 80, 15, 16  # return_stats: [reason - 80], [15] forwarded
HOOKS = ("tc", "xdp")  # where the client-side program runs (daemon.fastpath_hook)
FIB_MODES = ("cached", "main", "rules")  # daemon.fastpath_fib
_CLIENT_PROG = {"tc": ("director_tc.o", "director_tc"), "xdp": ("director_xdp.o", "director_xdp")}
XDP_PROG_NAME = "director_xdp"  # how our XDP program is told from anyone else's (bpf_prog_info.name)
XDP_PROG_PIN = "director_xdp_prog"  # our attached XDP program, pinned: known as ours by id, no CAP_SYS_ADMIN
XDP_FLAGS_DRV_MODE = 1 << 2  # linux/if_link.h: native (driver) XDP only, never the generic fallback
XDP_ACT_NDO_XMIT = 1 << 2  # netdev genl xdp-features: the device transmits redirected XDP frames


class FastPathUnavailable(RuntimeError):
    """The kernel or the build cannot run the eBPF dataplane here; the message says what is missing."""


def ensure_bpffs() -> None:
    """bpffs is not mounted at boot on these machines; pinned maps live there."""
    if os.path.ismount("/sys/fs/bpf"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", b"/sys/fs/bpf", b"bpf", 0, None) != 0:
        e = ctypes.get_errno()
        raise FastPathUnavailable(f"cannot mount bpffs on /sys/fs/bpf: {os.strerror(e)}")


class MapAccess:
    """One BPF hash map as FastPath reads and writes it: raw key and value bytes (bpf_structs).
    ``BpfMap`` is the kernel's; a test gives a dictionary-backed one."""

    def lookup(self, key: bytes) -> bytes | None:
        raise NotImplementedError

    def update(self, key: bytes, value: bytes) -> None:
        raise NotImplementedError

    def delete(self, key: bytes) -> bool:
        """True if the key was there."""
        raise NotImplementedError

    def items(self) -> list[tuple[bytes, bytes]]:
        raise NotImplementedError


class BpfMap(MapAccess):
    """A map by its fd, through libbpf's syscalls."""

    def __init__(self, fd: int, key_size: int, value_size: int) -> None:
        self.fd, self.key_size, self.value_size = fd, key_size, value_size

    def lookup(self, key: bytes) -> bytes | None:
        return libbpf.map_lookup(self.fd, key, self.value_size)

    def update(self, key: bytes, value: bytes) -> None:
        libbpf.map_update(self.fd, key, value)

    def delete(self, key: bytes) -> bool:
        return libbpf.map_delete(self.fd, key)

    def items(self) -> list[tuple[bytes, bytes]]:
        return list(libbpf.map_items(self.fd, self.key_size, self.value_size))


class FastPath:
    """Owns the programs and maps of one director namespace.

    ``clients_map``: the ``clients`` map's access (default: the pinned map, opened by ``start``).
    """

    def __init__(self, director: Director, *, client_ifindex: int, lan_ifindex: int, lan_addr: int,
                 lan_mtu: int, pin_dir: Path = PIN_DIR, obj_dir: Path = OBJ_DIR, hook: str = "tc",
                 admit_rate: float = 0.0, admit_per_source: float = 0.0, fib: str = "cached",
                 clients_map: MapAccess | None = None) -> None:  # fmt: skip
        if hook not in (*HOOKS, "auto"):
            raise ValueError(f"fastpath hook must be one of auto, {', '.join(HOOKS)}, got {hook!r}")
        self.requested_hook = hook
        self.hook = "tc" if hook == "auto" else hook  # "auto": settled by start()
        self.hook_reason = ""  # "auto" chose tc: why not XDP
        # initial IKE packets admitted to the queue per second (daemon.new_entries_rate and
        # new_entries_per_source, enforced in the kernel before the queue; 0 = no limit)
        self.admit_rate = admit_rate
        if fib not in FIB_MODES:
            raise ValueError(f"fastpath fib must be one of {', '.join(FIB_MODES)}, got {fib!r}")
        # daemon.fastpath_fib: next hops resolved here ("cached", dataplane.nexthop), or a route
        # lookup per packet in the main table ("main") or through the ip rules ("rules")
        self.fib = fib
        self.fib_rules = fib == "rules"
        self.next_hops: dict[int, nexthop.Resolution] = {}  # real server address -> what resolve found
        self.slots: dict[int, int] = {}  # real server id -> its counters' slot in rs_stats
        self._written: set[int] = set()  # real server ids with an entry in `servers`
        self.watch: nexthop.Watch | None = None
        self._ipr: IPRoute | None = None
        self._next_refresh = 0.0
        self.admit_per_source = admit_per_source
        self.d = director
        self.client_ifindex = client_ifindex
        self.lan_ifindex = lan_ifindex
        self.lan_addr = lan_addr
        self.lan_mtu = lan_mtu
        self.pin_dir = Path(pin_dir)
        self.obj_dir = Path(obj_dir)
        self.fd: dict[str, int] = {}
        self.clients_map = clients_map
        self.clients6_map: MapAccess | None = None  # IPv6 clients (``clients6``), opened by ``start``
        self._written6: set[int] = set()  # ids with a servers6 entry
        self.projection: ClientProjection | None = None
        self._objs: list[libbpf.BpfObject] = []
        self.ncpus = 1
        self.stats = {"map_writes": 0, "map_deletes": 0, "adopted": 0, "pruned": 0,
                      # SPI labels: the kernel's label_stats (as of the last drain) and the drain's
                      "label_forwarded": 0, "label_unknown": 0, "label_recorded": 0,
                      "label_drained": 0, "label_created": 0, "label_known": 0, "label_refused": 0,
                      # next hops (daemon.fastpath_fib = "cached"): full resolves, next hops changed
                      "next_hop_resolves": 0, "next_hop_changes": 0}
        # the return path through the director: the reply object's own maps (not pinned: the daemon
        # rewrites them at every start), and who sent a reply by MAC (dataplane.return_path.Senders)
        self.senders = None
        self._ret_fd: dict[str, int] = {}

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self, ipr: IPRoute) -> int:
        """Load (reusing pinned maps), attach (replacing our previous program), adopt. Returns adopted.

        The client-side program goes to the configured hook and ours at the other hook is removed
        after (tc <-> xdp: the new one forwards before the old one goes, so no packet is lost).
        With hook "auto", XDP where the checks of :func:`xdp_unfit` and the loader's pass, else tc,
        with the reason logged and shown in the status."""
        if self.requested_hook != "auto":
            return self._start(ipr)
        why = xdp_unfit(ipr, self.client_ifindex)
        if why is None:
            self.hook = "xdp"
            try:
                return self._start(ipr)
            except FastPathUnavailable as e:
                why = str(e)
        self.hook, self.hook_reason = "tc", why
        log.info("fastpath.hook_auto chose=tc reason=%s", why)
        return self._start(ipr)

    def _start(self, ipr: IPRoute) -> int:
        client_obj, client_prog = _CLIENT_PROG[self.hook]
        for name in (client_obj, "director_reply.o"):
            if not (self.obj_dir / name).is_file():
                raise FastPathUnavailable(f"{self.obj_dir / name} is missing: build it with `make -C ebpf` "
                                          "(source tree) or reinstall the package (clang at build time)")
        tx_ports = []
        if self.hook == "xdp":
            tx_ports = _xdp_preflight(ipr, self.client_ifindex, self.lan_ifindex, self.pin_dir)
        ensure_bpffs()
        self.pin_dir.mkdir(mode=0o700, exist_ok=True)
        self.ncpus = libbpf.num_possible_cpus()
        self._drop_stale_pins()
        progs = []
        try:
            for obj_name, ifindex in ((client_obj, self.client_ifindex), ("director_reply.o", self.lan_ifindex)):
                obj = libbpf.BpfObject(self.obj_dir / obj_name)
                self._objs.append(obj)
                for m in obj.map_names:
                    if m in _MAPS:
                        if m in _SIZED:
                            obj.set_max_entries(m, self.d.table.capacity)
                        obj.set_pin_path(m, self.pin_dir / m)
                obj.load()
                progs.append((obj.prog_fd(obj.prog_names[0]), ifindex, obj.prog_names[0]))
            for m in _MAPS:
                self.fd[m] = libbpf.obj_get(self.pin_dir / m)
            self._ret_fd = {m: self._objs[1].map_fd(m) for m in _RETURN_MAPS}
            if tx_ports:  # the XDP program redirects only to these (include/xdp.h)
                tx_fd = self._objs[0].map_fd("xdp_tx_ports")
                for i in tx_ports:
                    libbpf.map_update(tx_fd, bs.u32(i), bs.u32(i))
        except OSError as e:
            self.close()
            raise FastPathUnavailable(f"cannot load the eBPF programs: {e}") from None
        if self.clients_map is None:
            self.clients_map = BpfMap(self.fd["clients"], bs.CLIENT_KEY.size, bs.CLIENT_VAL.size)
        if self.clients6_map is None:
            self.clients6_map = BpfMap(self.fd["clients6"], bs.CLIENT6_KEY.size, bs.CLIENT_VAL.size)
        self._ipr = ipr
        self._adopt_servers()
        if self.fib == "cached":  # subscribed before the first resolve: no change falls between
            self.watch = nexthop.Watch()
            self._resolve_all()
        self._write_config()
        self.sync_services()
        self.follow_table()
        adopted = self.adopt()
        for fd, ifindex, name in progs:
            if name == XDP_PROG_NAME:
                try:
                    _attach_xdp(ipr, ifindex, fd)
                except FastPathUnavailable:
                    self.close()
                    raise
                _pin_xdp(fd, self.pin_dir)
                _detach(ipr, ifindex)  # our tc program of an earlier run with fastpath_hook = "tc"
            else:
                _attach(ipr, ifindex, fd, name)
                if ifindex == self.client_ifindex and name == client_prog:
                    _detach_xdp(ipr, ifindex, self.pin_dir)  # ours of an earlier run with fastpath_hook = "xdp"
        log.info("fastpath.started hook=%s pin=%s adopted=%d cpus=%d", self.hook, self.pin_dir, adopted, self.ncpus)
        return adopted

    def _drop_stale_pins(self) -> None:
        """Unpin maps whose layout is not this version's (an upgrade changed a struct), so the load
        creates them anew instead of failing on the pinned one. The programs still attached keep
        the old maps until the new programs replace them, so forwarding goes on meanwhile. Every
        map but ``clients`` is rewritten by the daemon (config, services) or restarts at zero
        (counters, admission windows); a ``clients`` of another layout or size cannot be adopted
        (its clients are unknown to the new daemon: their ESP is dropped until their next IKE
        exchange), so that is logged as a warning. The size of ``clients`` is daemon.capacity."""
        for name in _MAPS:
            path = self.pin_dir / name
            if not path.exists():
                continue
            spec = bs.MAPS[name]
            try:
                fd = libbpf.obj_get(path)
            except OSError:
                continue
            try:
                info = libbpf.map_info(fd)
            finally:
                libbpf.close_fd(fd)
            want_entries = self.d.table.capacity if name in _SIZED else info.max_entries
            is_array = info.type in (libbpf.BPF_MAP_TYPE_ARRAY, libbpf.BPF_MAP_TYPE_PERCPU_ARRAY)
            if (info.key_size, info.value_size, info.max_entries, is_array) == (
                    spec.key_size, spec.value_size, want_entries, spec.array):  # fmt: skip
                continue
            (log.warning if name == "clients" else log.info)(
                "fastpath.replaced_map name=%s pinned=%d/%d/%d want=%d/%d/%d%s", name, info.key_size,
                info.value_size, info.max_entries, spec.key_size, spec.value_size, want_entries,
                " (its clients cannot be adopted)" if name == "clients" else "")  # fmt: skip
            path.unlink()

    def close(self) -> None:
        """Close our fds; programs and maps stay (pinned and attached) for the next daemon."""
        if self.watch is not None:
            self.watch.close()
            self.watch = None
        if self.projection is not None:
            self.d.unlisten(self.projection)
            self.projection = None
        for fd in self.fd.values():
            libbpf.close_fd(fd)
        self.fd = {}
        for obj in self._objs:
            obj.close()
        self._objs = []

    @staticmethod
    def remove(ipr: IPRoute, ifindexes: list[int], pin_dir: Path = PIN_DIR) -> None:
        """Detach our programs (tc filters, XDP) and unpin the maps: the namespace as before the fast path."""
        for ifindex in ifindexes:
            _detach(ipr, ifindex)
            _detach_xdp(ipr, ifindex, pin_dir)
        shutil.rmtree(pin_dir, ignore_errors=True)

    # -- the projection -----------------------------------------------------------------------------
    def _write_config(self) -> None:
        libbpf.map_update(self.fd["config"], bs.u32(0),
                          bs.dp_config(self.lan_addr, self.lan_ifindex, self.lan_mtu, self.client_ifindex,
                                       bs.DP_F_FIB_RULES if self.fib_rules else 0))  # fmt: skip
        libbpf.map_update(self.fd["admit"], bs.u32(0), bs.admit(self.admit_rate, self.admit_per_source))

    def sync_services(self) -> None:
        """vips, servers and nat_replies equal the running services; clients of gone ones pruned."""
        d = self.d
        vips, nat, labels, ingress, vips6 = {}, {}, {}, {}, {}
        for svc in d.services.values():
            if is_ipv6(svc.vip):  # IPv6 (fastpath6.h): forwarding only; labels, limits and NAT66 replies are the queue's
                vips6[bs.addr6(svc.vip)] = bs.vip_val(svc.id, bs.VIP_F_AH if svc.ah else 0)
                continue
            vips[bs.addr(svc.vip)] = bs.vip_val(svc.id, bs.VIP_F_AH if svc.ah else 0)
            if svc.ingress:  # per-source ingress limits (ebpf/include/ingress.h)
                ingress[bs.addr(svc.vip)] = bs.ingress_cfg(*svc.ingress)
            sl = d.spi_labels(svc.id)
            if sl is not None:  # SPI labels: the kernel decodes a miss's ESP SPI
                try:
                    labels[bs.u32(svc.id)] = spi_label_cfg(sl)
                except ValueError as e:  # more servers than slots: the slow path decodes them
                    log.warning("fastpath.spi_label_skipped svc=%d reason=%s", svc.id, e)
            for rs in svc.servers.values():
                if svc.method_of(rs) == Method.NAT:
                    nat[bs.addr(rs.addr)] = bs.addr(svc.vip)
        self._write_servers()
        for name, want in (("vips", vips), ("nat_replies", nat), ("spi_labels", labels), ("ingress_cfg", ingress),
                           ("vips6", vips6)):
            fd = self.fd[name]
            spec = bs.MAPS[name]
            for k in list(libbpf.map_keys(fd, spec.key_size)):
                if k not in want:
                    libbpf.map_delete(fd, k)
            for k, v in want.items():
                libbpf.map_update(fd, k, v)
        self._sync_return(d)
        # a client whose VIP or real server is gone goes back to the slow path
        for m, unpack in ((self.clients_map, bs.unpack_client_key), (self.clients6_map, bs.unpack_client6_key)):
            if m is None:
                continue
            for k, v in m.items():
                vip, _client, _port = unpack(k)
                rs, _seen = bs.unpack_client_val(v)
                svc = d.service_by_vip(vip)
                if svc is None or rs not in svc.servers:
                    m.delete(k)
                    self.stats["pruned"] += 1

    # -- next hops (dataplane.nexthop; daemon.fastpath_fib = "cached") --------------------------------
    def _next_hop(self, addr: int) -> bs.NextHop | None:
        if self.fib != "cached":
            return None
        if addr not in self.next_hops and self._ipr is not None:  # a server added since the last resolve
            self.next_hops[addr] = nexthop.resolve(self._ipr, addr)
        r = self.next_hops.get(addr)
        return r.nh if r is not None else None

    def _resolve_all(self) -> bool:
        """Resolve every real server's next hop; True if any changed. Forwarding disabled on the
        client interface resolves none (the programs' lookup then says so, and passes)."""
        if self._ipr is None:
            return False
        addrs = {rs.addr for svc in self.d.services.values() for rs in svc.servers.values()}
        ifname = _ifname(self._ipr, self.client_ifindex)
        fwd = {False: nexthop.forwarding_enabled(ifname),
               True: nexthop.forwarding_enabled(ifname, Path("/proc/sys/net/ipv6/conf"))}  # fmt: skip
        off = nexthop.Resolution(None, None, "forwarding disabled")
        new = {a: nexthop.resolve(self._ipr, a) if fwd[is_ipv6(a)] else off for a in addrs}
        changed = {a for a in addrs if a not in self.next_hops or self.next_hops[a].nh != new[a].nh}
        for a in changed:
            was = self.next_hops.get(a)
            log.info("fastpath.next_hop server=%s %s%s", int_to_ip(a),
                     f"ifindex={new[a].nh.ifindex} mac={new[a].nh.dmac.hex(':')} mtu={new[a].nh.mtu}"
                     if new[a].nh else f"unresolved ({new[a].why})",
                     "" if was is None else " (changed)")  # fmt: skip
        self.next_hops = new
        self.stats["next_hop_resolves"] += 1
        self.stats["next_hop_changes"] += len(changed)
        return bool(changed)

    def next_hop_status(self) -> dict[str, dict]:
        """Per real server address: its next hop as the maps hold it, or why it has none."""
        out = {}
        for a, r in sorted(dict(self.next_hops).items()):
            if r.nh is None:
                out[int_to_ip(a)] = {"resolved": False, "why": r.why}
            else:
                out[int_to_ip(a)] = {"resolved": True, "ifindex": r.nh.ifindex, "mtu": r.nh.mtu,
                                     "mac": r.nh.dmac.hex(":"), "source_mac": r.nh.smac.hex(":")}  # fmt: skip
        return out

    def watch_fds(self) -> list:
        """What the daemon's loop selects on for us: the netlink watch (``drain`` when readable)."""
        return [self] if self.watch is not None else []

    def fileno(self) -> int:
        assert self.watch is not None
        return self.watch.fileno()

    def drain(self) -> None:
        """Netlink changes arrived: re-resolve if they may touch a next hop, and rewrite ``servers``."""
        assert self.watch is not None
        egress = {r.oif for r in self.next_hops.values() if r.oif} | {self.lan_ifindex}
        if self.watch.changed(egress):
            self.refresh_next_hops()

    def refresh_next_hops(self, now: float | None = None) -> None:
        """Re-resolve and rewrite ``servers`` if a next hop changed. With ``now``: only when REFRESH
        seconds have passed since the last periodic one (the daemon's tick calls it so)."""
        if self.fib != "cached":
            return
        if now is not None:
            if now < self._next_refresh:
                return
            self._next_refresh = now + nexthop.REFRESH
        if self._resolve_all():
            self._write_servers()

    # -- servers and their counters' slots ------------------------------------------------------------
    def _adopt_servers(self) -> None:
        """What a previous daemon left in ``servers`` (pinned): the slots of servers still configured
        with the same address are kept (their kernel counters go on); every id written is
        remembered, so that a server gone since is cleared by the next write."""
        fd = self.fd["servers"]
        want = {rs.id: rs.addr for svc in self.d.services.values() for rs in svc.servers.values()}
        self._written = set()
        self.slots = {}
        for rs_id, v in enumerate(libbpf.array_values(fd, bs.SERVER_VAL.size, bs.SERVER_IDS)):
            a, _m = bs.unpack_server_val(v)
            if not a:
                continue
            self._written.add(rs_id)
            slot = bs.server_slot(v)
            if want.get(rs_id) == a and slot not in self.slots.values():
                self.slots[rs_id] = slot
        # the IPv6 servers a previous daemon wrote: cleared by the next write if gone since
        self._written6 = {i for i, v in enumerate(libbpf.array_values(self.fd["servers6"], bs.SERVER6_VAL.size,
                                                                      bs.SERVER_IDS)) if any(v)}  # fmt: skip

    def _slot(self, rs_id: int) -> int:
        """rs_id's slot in ``rs_stats``, taken (and zeroed) on first use."""
        slot = self.slots.get(rs_id)
        if slot is None:
            used = set(self.slots.values())
            slot = next((i for i in range(bs.RS_STATS_SLOTS) if i not in used), None)
            if slot is None:  # more servers than slots: they share the last one (counts mixed, forwarding not)
                log.warning("fastpath.rs_stats_full server=%d slots=%d", rs_id, bs.RS_STATS_SLOTS)
                return bs.RS_STATS_SLOTS - 1
            libbpf.map_update(self.fd["rs_stats"], bs.u32(slot), bs.percpu_zero(bs.RS_STATS, self.ncpus))
            self.slots[rs_id] = slot
        return slot

    def _write_servers(self) -> None:
        """``servers`` equal to the running real servers: each one's address, method, next hop and
        counter slot; the ids of servers gone are cleared (all zero), their slots freed."""
        fd = self.fd["servers"]
        now = {}
        for svc in self.d.services.values():
            for rs in svc.servers.values():
                now[rs.id] = (rs.addr, int(svc.method_of(rs)))
        for rs_id in list(self.slots):
            if rs_id not in now:
                del self.slots[rs_id]
        for rs_id in self._written - set(now):
            libbpf.map_update(fd, bs.u32(rs_id), bytes(bs.SERVER_VAL.size))
        six = {rs_id for rs_id, (a, _m) in now.items() if is_ipv6(a)}
        for rs_id in self._written6 - six:
            libbpf.map_update(self.fd["servers6"], bs.u32(rs_id), bytes(bs.SERVER6_VAL.size))
        for rs_id, (a, m) in now.items():
            # an IPv6 server: its address in servers6, zero in servers (the IPv4 program's "none")
            libbpf.map_update(fd, bs.u32(rs_id), bs.server_val(0 if rs_id in six else a, m, self._next_hop(a),
                                                                self._slot(rs_id)))  # fmt: skip
            if rs_id in six:
                libbpf.map_update(self.fd["servers6"], bs.u32(rs_id), bs.addr6(a))
        self._written = set(now)
        self._written6 = six

    # -- the return path through the director (include/return_path.h) ------------------------------
    def _sync_return(self, d: Director) -> None:
        if not self._ret_fd:
            return
        want = {bs.addr(svc.vip): bs.u32(svc.id) for svc in d.services.values() if svc.return_path == "director"}
        _replace(self._ret_fd["return_vips"], 4, want)
        if self.senders is not None:
            self.senders.on_change = self.write_return_macs
            self.write_return_macs(self.senders.macs)

    def write_return_macs(self, macs: dict[bytes, int]) -> None:
        """``return_macs`` = {MAC: real server id} (Senders.on_change)."""
        if self._ret_fd:
            _replace(self._ret_fd["return_macs"], 8, {mac_key(m): bs.u32(rs) for m, rs in macs.items()})

    def return_stats(self) -> list[int]:
        """return_stats summed over CPUs: [reason - 80] drops, [RET_FORWARDED] forwarded."""
        if not self._ret_fd:
            return []
        size = bs.percpu_size(8, self.ncpus)
        out = []
        for i in range(_RET_STATS):
            v = libbpf.map_lookup(self._ret_fd["return_stats"], bs.u32(i), size)
            out.append(sum(int.from_bytes(v[j:j + 8], "little") for j in range(0, len(v), 8)) if v else 0)
        return out

    def follow_table(self) -> None:
        """Start following the director's table (``start`` does; ``close`` stops)."""
        if self.projection is None:
            self.projection = self.d.client_projection(self.last_seen)

    @property
    def pending(self) -> bool:
        """Whether some client's map keys may be stale (``flush`` is due)."""
        return bool(self.projection is not None and self.projection.pending)

    def flush(self) -> None:
        """Write the map keys of every client whose projection may have changed since the last flush."""
        if self.projection is None:
            return
        for vip, client, port, rs in self.projection.drain():
            if is_ipv6(vip):
                m, key = self.clients6_map, bs.client6_key(vip, client, port)
            else:
                m, key = self.clients_map, bs.client_key(vip, client, port)
            if m is None:  # no clients6 (a test's stand-in map): nothing to keep
                continue
            if rs is not None:
                old = m.lookup(key)
                if old is None or bs.unpack_client_val(old)[0] != rs:
                    m.update(key, bs.client_val(rs, 0))
                    self.stats["map_writes"] += 1
            elif m.delete(key):
                self.stats["map_deletes"] += 1

    def last_seen(self, vip: int, client: int, port: int) -> float | None:
        """When the fast path last forwarded for this key (seconds, monotonic), if ever."""
        if is_ipv6(vip):
            v = self.clients6_map.lookup(bs.client6_key(vip, client, port)) if self.clients6_map is not None else None
        else:
            v = self.clients_map.lookup(bs.client_key(vip, client, port))
        if v is None:
            return None
        seen = bs.unpack_client_val(v)[1]
        return seen / 1e9 if seen else None

    def adopt(self, now: float | None = None) -> int:
        """Rebuild ESTABLISHED entries for the clients a previous daemon left in the map."""
        n = 0
        items = [(bs.unpack_client_key(k), v) for k, v in self.clients_map.items()]
        if self.clients6_map is not None:
            items += [(bs.unpack_client6_key(k), v) for k, v in self.clients6_map.items()]
        for (vip, client, port), v in items:
            rs, _seen = bs.unpack_client_val(v)
            if not port:
                continue
            if now is None:
                import time

                now = time.monotonic()
            if self.d.adopt_client(vip, client, port, rs, ADOPTED_SPI | port, now):
                n += 1
        self.stats["adopted"] += n
        if self.projection is not None:
            self.projection.pending.clear()  # what we adopted is what the map already says
        return n

    # -- SPI labels ---------------------------------------------------------------------------------
    def drain_labels(self, now: float, limit: int = LABEL_DRAIN_MAX) -> int:
        """Turn the kernel's label_seen records into ESTABLISHED entries (each tick).

        The programs forward labelled ESP of a client with no ``clients`` entry and record its key
        once; here each record is deleted and handed to the core (``Director.label_forwarded``:
        admission limits, counters), whose new entry the projection then writes to ``clients``.
        At most ``limit`` records per call; a client whose entry was refused (admission, table
        full) is recorded again by its next packet. Returns the records handled."""
        fd = self.fd.get("label_seen")
        if fd is None:
            return 0
        keys = []
        for k in libbpf.map_keys(fd, bs.CLIENT_KEY.size):
            keys.append(k)
            if len(keys) >= limit:
                break
        st = self.stats
        for k in keys:
            v = libbpf.map_lookup(fd, k, bs.LABEL_SEEN_VAL.size)
            libbpf.map_delete(fd, k)
            if v is None:
                continue
            vip, client, port = bs.unpack_client_key(k)
            spi, _rs, _first = bs.unpack_label_seen(v)
            r = self.d.label_forwarded(vip, client, port, spi, now)
            if r is None:
                st["label_known"] += 1
            elif isinstance(r, DropReason):
                st["label_refused"] += 1
            else:
                st["label_created"] += 1
        st["label_drained"] += len(keys)
        self._refresh_label_stats()
        return len(keys)

    def _refresh_label_stats(self) -> None:
        ls = self.label_stats()
        for k in ("forwarded", "unknown", "recorded"):
            self.stats[f"label_{k}"] = ls[k]

    def label_stats(self) -> dict[str, int]:
        """The kernel's label_stats, summed over CPUs."""
        v = libbpf.map_lookup(self.fd["label_stats"], bs.u32(0), bs.percpu_size(bs.LABEL_STATS, self.ncpus))
        return bs.unpack_label_stats(v, self.ncpus) if v else {"forwarded": 0, "unknown": 0, "recorded": 0}

    # -- reading ------------------------------------------------------------------------------------
    def dp_stats(self) -> dict:
        """``stats`` summed over CPUs, with the return path's counts: its drops in ``drops`` (by
        DropReason value, the list lengthened past 64) and its forwarded packets as ``returned``.
        Refreshes the kernel's label counters in ``self.stats`` too (label_forwarded,
        label_unknown, label_recorded), so a reader of both sees them as current as the rest."""
        v = libbpf.map_lookup(self.fd["stats"], bs.u32(0), bs.percpu_size(bs.DP_STATS, self.ncpus))
        self._refresh_label_stats()
        st = bs.unpack_dp_stats(v, self.ncpus) if v else {}
        ret = self.return_stats()
        if ret and st:
            drops = list(st.get("drops", []))
            drops += [0] * (_RET_DROP_BASE + _RET_FORWARDED - len(drops))
            for i, n in enumerate(ret[:_RET_FORWARDED]):
                drops[_RET_DROP_BASE + i] += n
            st["drops"] = drops
            st["returned"] = ret[_RET_FORWARDED]
        return st

    def rs_stats(self) -> dict[int, dict]:
        """The kernel's counters of every running real server, by real server id."""
        out = {}
        size = bs.percpu_size(bs.RS_STATS, self.ncpus)
        for rs_id, slot in list(self.slots.items()):
            v = libbpf.map_lookup(self.fd["rs_stats"], bs.u32(slot), size)
            if v is not None:
                out[rs_id] = bs.unpack_rs_stats(v, self.ncpus)
        return out

    def clients(self) -> list[tuple[str, str, int, int]]:
        """(vip, client, port, real server id) of every client in the map (for status and tests)."""
        out = []
        for m, unpack in ((self.clients_map, bs.unpack_client_key), (self.clients6_map, bs.unpack_client6_key)):
            for k, v in (m.items() if m is not None else ()):
                vip, client, port = unpack(k)
                out.append((int_to_ip(vip), int_to_ip(client), port, bs.unpack_client_val(v)[0]))
        return sorted(out)


def mac_key(mac: bytes) -> bytes:
    """Key of ``return_macs``: the 6 MAC bytes in memory order, then two zero bytes (a __u64)."""
    return bytes(mac[:6]) + b"\0\0"


def _replace(fd: int, key_size: int, want: dict[bytes, bytes]) -> None:
    for k in list(libbpf.map_keys(fd, key_size)):
        if k not in want:
            libbpf.map_delete(fd, k)
    for k, v in want.items():
        libbpf.map_update(fd, k, v)


def _attach(ipr: IPRoute, ifindex: int, fd: int, name: str) -> None:
    try:
        ipr.tc("add", "clsact", ifindex)
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise
    ipr.tc("replace-filter", "bpf", ifindex, ":1", fd=fd, name=name, parent=INGRESS, prio=FILTER_PRIO,
           classid=1, direct_action=True)


def _detach(ipr: IPRoute, ifindex: int) -> None:
    try:
        ipr.tc("del-filter", "bpf", ifindex, ":1", parent=INGRESS, prio=FILTER_PRIO)
    except NetlinkError as e:
        if e.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
            raise


# -- XDP ----------------------------------------------------------------------------------------------


class _DevMsg(genlmsg):
    """The netdev generic netlink family's device (Documentation/netlink/specs/netdev.yaml, kernel 6.3+)."""

    prefix = "NETDEV_A_DEV_"
    nla_map = (
        ("NETDEV_A_DEV_UNSPEC", "none"),
        ("NETDEV_A_DEV_IFINDEX", "uint32"),
        ("NETDEV_A_DEV_PAD", "none"),
        ("NETDEV_A_DEV_XDP_FEATURES", "uint64"),
    )


_NETDEV_CMD_DEV_GET = 1


def xdp_features(ifindex: int) -> int | None:
    """The device's xdp-features bits (NETDEV_XDP_ACT_*) in this namespace, or None if the kernel
    has no netdev family (before 6.3) and cannot say."""
    s = GenericNetlinkSocket()
    try:
        try:
            s.bind("netdev", _DevMsg)
        except NetlinkError:
            return None
        msg = _DevMsg()
        msg["cmd"] = _NETDEV_CMD_DEV_GET
        msg["version"] = 1
        msg["attrs"] = [("NETDEV_A_DEV_IFINDEX", ifindex)]
        for reply in s.nlm_request(msg, msg_type=s.prid, msg_flags=NLM_F_REQUEST):
            v = reply.get_attr("NETDEV_A_DEV_XDP_FEATURES")
            if v is not None:
                return v
        return 0
    finally:
        s.close()


def _ifname(ipr: IPRoute, ifindex: int) -> str:
    return ipr.get_links(ifindex)[0].get_attr("IFLA_IFNAME")


XDP_ACT_BASIC = 1 << 0  # netdev genl xdp-features: native XDP (XDP_PASS, DROP, ABORTED)
XDP_ACT_REDIRECT = 1 << 1  # ... and XDP_REDIRECT


def xdp_unfit(ipr: IPRoute, client_ifindex: int) -> str | None:
    """Why ``fastpath_hook = "auto"`` should not take XDP on the client interface (None: try it).

    Native XDP with redirects is needed. A veth is refused although it has both: its XDP runs in
    the NAPI of the CPU that transmitted into it, so on a veth the forwarding stays on the
    sender's core (x0 in docs/performance.md's group f); the tc hook is the better default there."""
    name = _ifname(ipr, client_ifindex)
    feats = xdp_features(client_ifindex)
    if feats is None:
        return "this kernel cannot report XDP features (netdev genetlink, Linux 6.3+)"
    if _link_kind(ipr, client_ifindex) == "veth":
        return f"{name} is a veth: its XDP runs on the sending CPU (docs/performance.md)"
    want = XDP_ACT_BASIC | XDP_ACT_REDIRECT
    if feats & want != want:
        return f"{name} has no native XDP with redirects (xdp-features {feats:#x})"
    return None


def _xdp_preflight(ipr: IPRoute, client_ifindex: int, lan_ifindex: int, pin_dir: Path) -> list[int]:
    """Refuse XDP where it would lose packets; return the egress interfaces it may redirect to.

    The real servers are behind the LAN interface: it must transmit XDP frames, or every
    forwarded packet would be dropped without a trace (a bridge never can; a veth only while its
    peer runs an XDP program or has GRO on). The client interface joins the list if it can.
    Another XDP program on the client interface is not replaced."""
    lan_name, client_name = _ifname(ipr, lan_ifindex), _ifname(ipr, client_ifindex)
    feats = xdp_features(lan_ifindex)
    if feats is None:
        raise FastPathUnavailable("fastpath_hook xdp: this kernel cannot report XDP features (netdev genetlink, "
                                  "Linux 6.3+), so a redirect to the LAN interface cannot be known to work; "
                                  'use fastpath_hook = "tc"')
    if not feats & XDP_ACT_NDO_XMIT:
        kind = _link_kind(ipr, lan_ifindex)
        hint = {
            "veth": f"its veth peer needs an XDP program or GRO on (`ethtool -K <peer of {lan_name}> gro on`)",
            "bridge": "a bridge cannot transmit XDP frames: use the uplink port itself, or the tc hook",
        }.get(kind, "its driver has no ndo_xdp_xmit")
        raise FastPathUnavailable(f"fastpath_hook xdp: {lan_name} (server_interface) cannot transmit "
                                  f"XDP-redirected frames, they would be dropped silently; {hint}; "
                                  'or use fastpath_hook = "tc"')
    other = _xdp_prog_name(ipr, client_ifindex, pin_dir)
    if other not in (None, XDP_PROG_NAME):
        raise FastPathUnavailable(f"fastpath_hook xdp: {client_name} already runs XDP program {other!r}, not ours; "
                                  "remove it or use the tc hook")
    ports = [lan_ifindex]
    if client_ifindex != lan_ifindex and (xdp_features(client_ifindex) or 0) & XDP_ACT_NDO_XMIT:
        ports.append(client_ifindex)
    return ports


def _link_kind(ipr: IPRoute, ifindex: int) -> str | None:
    info = ipr.get_links(ifindex)[0].get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info else None


def _xdp_prog_id(ipr: IPRoute, ifindex: int) -> int:
    """The id of the native XDP program on the interface (0: none)."""
    xdp = ipr.get_links(ifindex)[0].get_attr("IFLA_XDP")
    if not xdp:
        return 0
    return xdp.get_attr("IFLA_XDP_DRV_PROG_ID") or (xdp.get_attr("IFLA_XDP_PROG_ID") or 0)


def _pinned_xdp_id(pin_dir: Path | None) -> int:
    """The id of the XDP program an earlier run of ours attached and pinned (0: none)."""
    if pin_dir is None or not (pin_dir / XDP_PROG_PIN).exists():
        return 0
    try:
        fd = libbpf.obj_get(pin_dir / XDP_PROG_PIN)
    except OSError:
        return 0
    try:
        return libbpf.prog_id(fd)
    except OSError:
        return 0
    finally:
        libbpf.close_fd(fd)


def _pin_xdp(fd: int, pin_dir: Path) -> None:
    """Pin the XDP program just attached, so the next run knows it as ours by its id: reading the
    name of an attached program by id (BPF_PROG_GET_FD_BY_ID) needs CAP_SYS_ADMIN, which the unit
    does not grant; opening our own pin needs only CAP_BPF."""
    path = pin_dir / XDP_PROG_PIN
    path.unlink(missing_ok=True)
    libbpf.obj_pin(fd, path)


def _xdp_prog_name(ipr: IPRoute, ifindex: int, pin_dir: Path | None = None) -> str | None:
    """The name of the XDP program on the interface (None: none; "?" if it cannot be read). Ours
    is recognised by the id of our pinned program first, then (with CAP_SYS_ADMIN) by its name."""
    prog_id = _xdp_prog_id(ipr, ifindex)
    if not prog_id:
        return None
    if prog_id == _pinned_xdp_id(pin_dir):
        return XDP_PROG_NAME
    name = libbpf.prog_name_by_id(prog_id)
    return "?" if name is None else name


def _attach_xdp(ipr: IPRoute, ifindex: int, fd: int) -> None:
    """Native XDP, replacing our program of an earlier run in one step (XDP has one program per
    interface and mode: nothing stacks). No generic-mode fallback: it would cost more than tc."""
    try:
        ipr.link("set", index=ifindex, xdp={"attrs": [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", XDP_FLAGS_DRV_MODE)]})
    except NetlinkError as e:
        raise FastPathUnavailable(f"fastpath_hook xdp: cannot attach native XDP to {_ifname(ipr, ifindex)}: "
                                  f"{os.strerror(e.code)} (the driver may lack native XDP, or generic XDP is "
                                  'attached); use fastpath_hook = "tc"') from None


def _detach_xdp(ipr: IPRoute, ifindex: int, pin_dir: Path | None = None) -> None:
    """Remove the native XDP program if it is ours (an operator's own XDP program stays), and its pin."""
    if _xdp_prog_name(ipr, ifindex, pin_dir) != XDP_PROG_NAME:
        return
    try:
        ipr.link("set", index=ifindex, xdp={"attrs": [("IFLA_XDP_FD", -1), ("IFLA_XDP_FLAGS", XDP_FLAGS_DRV_MODE)]})
    except NetlinkError as e:
        if e.code not in (errno.ENOENT, errno.ENODEV):
            raise
    if pin_dir is not None:
        (pin_dir / XDP_PROG_PIN).unlink(missing_ok=True)
