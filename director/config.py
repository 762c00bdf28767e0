"""The daemon's configuration: TOML in, frozen dataclasses out, every error found at once.

Each error names its field by path (``service[0].server[1].weight: must be 0..65535``), so one
run tells an operator everything that is wrong. Nothing here touches the running director: a
config is parsed and validated completely before anything is applied.

Example (see deploy/vpn-director.example.toml)::

    [daemon]
    client_interface = "eth0"
    server_interface = "eth1"

    [[service]]
    vip = "192.0.2.10"
    scheduler = "wlc"
    method = "dr"

    [[service.server]]
    address = "198.51.100.11"
    weight = 1
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from director.forwarding.method import AH_ACROSS_NAT, NAMES as METHOD_NAMES, Method, ah_across_nat
from director.isakmp_state import DEFAULT_ESTABLISHED_TIMEOUT, DEFAULT_INIT_TIMEOUT
from director.schedulers import SCHEDULERS
from director.service import AFFINITY, RETURN_PATHS


class ConfigErrors(ValueError):
    """Every problem of one config, each a line naming its field."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class ServerConfig:
    address: str
    weight: int = 1
    method: Method | None = None  # None: the service's method
    u_threshold: int = 0
    l_threshold: int = 0
    spi_label: int | None = None  # SPI labels: this server's label, positioned under the service's mask
    esp_spi_min: int | None = None  # ... and its inbound ESP SPI range (strongswan.conf spi_min/spi_max)
    esp_spi_max: int | None = None


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    vip: str
    scheduler: str = "wlc"
    scheduler_options: tuple[tuple[str, Any], ...] = ()
    method: Method = Method.DR
    affinity: str = "ip"
    affinity_prefix: int = 0  # "ip" affinity per /N (ipvsadm -M); 0: the whole address
    ah: bool = True
    init_timeout: float = DEFAULT_INIT_TIMEOUT
    established_timeout: float = DEFAULT_ESTABLISHED_TIMEOUT
    retransmit_threshold: int = 3
    soft_limit: int = 0
    soft_grace: float = 0.0
    expire_quiescent: bool = False  # IPVS's expire_quiescent_template, per service
    health: tuple[tuple[str, Any], ...] = ()  # () = no health checks; else HealthConfig fields
    servers: tuple[ServerConfig, ...] = ()
    drain: bool = False  # route health injection: withdraw this VIP's BGP route ([daemon.bgp])
    spi_label_mask: int = 0  # SPI labels: the IKE SPI bits naming the real server (0 = no labels)
    # per-source ingress limits (director/ingress.py): (esp_pps, ah_pps, ike_pps, burst), () = none
    ingress: tuple[int, int, int, int] | tuple[()] = ()
    return_path: str = "direct"  # DR/TUN replies: "direct" or "director" (NAT replies always pass it)


# -- failover sync ([daemon.sync], director/sync.py) -------------------------------------------
SYNC_ROLES = ("auto", "master", "backup", "all")
SYNC_MAX_PEERS = 64  # the kernel source filter (dataplane/sync_link.py) is one compare per peer
SYNC_STATE_FILE = "/var/lib/vpn-director/sync-state.json"


@dataclass(frozen=True, slots=True)
class SyncConfig:
    """The table sync to the other directors. Role auto: whoever holds the VIP (VRRP master) sends;
    role all: every director sends its own changes to every peer and applies theirs (scale-out)."""

    peers: tuple[str, ...]
    key: str  # hex or base64, at least 16 bytes
    port: int = 8514
    role: str = "auto"
    bind: str = ""  # "" = the source address toward the first peer
    state_file: str = SYNC_STATE_FILE  # replay floors and this sender's epoch, across restarts

    @property
    def peer(self) -> str:
        """The first (for a failover pair: the only) peer."""
        return self.peers[0]


def _sync(c: "_Checker", v: Any) -> "SyncConfig | None":
    if v is None:
        return None
    if not isinstance(v, dict):
        c.err("daemon.sync", "must be a table")
        return None
    # peer = "x": the older one-peer spelling of peers = ["x"], still accepted (not in the schema
    # the example config shows, which uses peers)
    c.unknown("daemon.sync", {k: x for k, x in v.items() if k != "peer"},
              {"peers", "port", "key", "role", "bind", "state_file"})
    peers: list[str] = []
    if "peer" in v and "peers" in v:
        c.err("daemon.sync.peers", "give either peer (one) or peers (a list), not both")
    elif "peer" in v:
        peers = [c.ipv4("daemon.sync.peer", v["peer"])]
    elif "peers" in v:
        raw = v["peers"]
        if not isinstance(raw, (list, tuple)) or not raw:
            c.err("daemon.sync.peers", f"must be a non-empty list of IPv4 addresses, got {raw!r}")
        elif len(raw) > SYNC_MAX_PEERS:
            c.err("daemon.sync.peers", f"at most {SYNC_MAX_PEERS} peers, got {len(raw)}")
        else:
            peers = [c.ipv4(f"daemon.sync.peers[{i}]", p) for i, p in enumerate(raw)]
            if len(set(peers)) != len(peers):
                c.err("daemon.sync.peers", "lists an address twice")
    else:
        c.err("daemon.sync.peers", "missing (peers = [...], or peer = \"...\" for a failover pair)")
    key = v.get("key")
    if key is None:
        c.err("daemon.sync.key", "missing (a shared secret, hex or base64, at least 16 bytes)")
        key = ""
    else:
        from director.sync import parse_key

        try:
            parse_key(key if isinstance(key, str) else "")
        except ValueError as e:
            c.err("daemon.sync.key", str(e))
    role = c.str_("daemon.sync.role", v.get("role", "auto"), SYNC_ROLES)
    if role in ("auto", "master", "backup") and len(peers) > 1:
        c.err("daemon.sync.role", f"{role} is for a failover pair (one peer); {len(peers)} peers need role all")
    bind = c.ipv4("daemon.sync.bind", v["bind"]) if "bind" in v else ""
    if bind and bind in peers:
        c.err("daemon.sync.bind", f"{bind} is also listed as a peer")
    state_file = v.get("state_file", SYNC_STATE_FILE)
    if not isinstance(state_file, str) or not state_file.startswith("/"):
        c.err("daemon.sync.state_file", f"must be an absolute path, got {state_file!r}")
        state_file = SYNC_STATE_FILE
    return SyncConfig(peers=tuple(peers), key=key if isinstance(key, str) else "",
                      port=c.int_("daemon.sync.port", v.get("port", 8514), 1, 65535),
                      role=role, bind=bind, state_file=state_file)
# -- end failover sync ------------------------------------------------------------------------------


# -- route health injection ([daemon.bgp], director/route_injection.py) ----------------------------
@dataclass(frozen=True, slots=True)
class BgpConfig:
    """The local BIRD that announces this director's VIPs (docs/scale-out.md)."""

    socket: str  # BIRD's control socket
    include: str  # the file BIRD's config includes; the director writes one static protocol per VIP there
    drain: bool = False  # withdraw every VIP of this director
    shutdown_wait: float = 1.0  # seconds between the withdraw at shutdown and taking the dataplane down


def _bgp(c: "_Checker", v: Any) -> "BgpConfig | None":
    if v is None:
        return None
    if not isinstance(v, dict):
        c.err("daemon.bgp", "must be a table")
        return None
    c.unknown("daemon.bgp", v, {"socket", "include", "drain", "shutdown_wait"})
    paths = {}
    for k in ("socket", "include"):
        if k not in v:
            c.err(f"daemon.bgp.{k}", "missing")
            paths[k] = ""
        else:
            paths[k] = c.str_(f"daemon.bgp.{k}", v[k])
            if paths[k] and not paths[k].startswith("/"):
                c.err(f"daemon.bgp.{k}", f"must be an absolute path, got {paths[k]!r}")
    wait = c.num("daemon.bgp.shutdown_wait", v.get("shutdown_wait", 1.0), positive=False)
    if wait > 60:
        c.err("daemon.bgp.shutdown_wait", f"must be at most 60 seconds, got {wait:g}")
    return BgpConfig(socket=paths["socket"], include=paths["include"],
                     drain=c.bool_("daemon.bgp.drain", v.get("drain", False)), shutdown_wait=wait)


CONSISTENT_SCHEDULERS = ("mh", "sh", "dh")  # the choice is a function of the packet and the config alone


def consistency_warnings(cfg: "Config") -> list[str]:
    """With [daemon.bgp] several directors share each VIP: a service whose scheduler depends on
    the director's own history (rr, wlc, ...) sends one new conversation to different real servers
    on different directors. Not an error (SPI labels or shared state can cover it): a warning."""
    if cfg.daemon.bgp is None:
        return []
    return [f"service[{i}].scheduler: {s.scheduler!r} is not the same on every director; with [daemon.bgp] use "
            f"mh (or sh, dh) so every director picks the same real server for a new conversation"
            for i, s in enumerate(cfg.services) if s.scheduler not in CONSISTENT_SCHEDULERS]  # fmt: skip
# -- end route health injection -------------------------------------------------------------------


FASTPATH_HOOKS = ("auto", "tc", "xdp")  # "auto" and director.dataplane.ebpf.HOOKS (config imports no adapter)


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    client_interface: str = "eth0"
    server_interface: str = "eth1"
    queue: int = 0  # client direction; replies (NAT) use queue + 1
    fail_open: bool = False
    capacity: int = 262144
    icmp_rate: float = 100.0  # ICMP unreachables per second, burst the same
    new_entries_rate: float = 0.0  # new ISAKMP entries per second, all sources (0 = no limit)
    new_entries_per_source: float = 0.0  # ... per client address (0 = no limit)
    drop_entry_threshold: float = 0.9  # table fill above which new entries reclaim INIT ones
    control_socket: str = "/run/vpn-director/control.sock"
    metrics: str = "127.0.0.1:9816"  # "" = no metrics endpoint
    bpf_pin_dir: str = "/sys/fs/bpf/vpn-director"  # eBPF maps, shared by every daemon run here
    # where the eBPF fast path runs on client_interface: "auto" (XDP where it fits, else tc, with
    # the reason logged), "tc" or "xdp" (native)
    fastpath_hook: str = "auto"
    # the fast path's next hops: "cached" (resolved by the daemon, no lookup per packet), or a route
    # lookup per packet in the "main" table directly or through the ip "rules"
    fastpath_fib: str = "cached"
    sync: SyncConfig | None = None  # failover: [daemon.sync] (None: a lone director)
    bgp: BgpConfig | None = None  # scale-out: [daemon.bgp] (None: no route health injection)


@dataclass(frozen=True, slots=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    services: tuple[ServiceConfig, ...] = ()


_DAEMON_KEYS = set(DaemonConfig.__dataclass_fields__)
_SERVICE_KEYS = {
    "vip", "scheduler", "scheduler_options", "method", "affinity", "affinity_prefix", "ah", "timeouts",
    "retransmit_threshold", "soft_expiry", "health", "server", "drain", "spi_label",
    "expire_quiescent", "ingress", "return_path",
}
_HEALTH_KEYS = {"interval", "timeout", "rise", "fall", "expire_on_down", "icmp"}
_SERVER_KEYS = {"address", "weight", "method", "u_threshold", "l_threshold", "spi_label", "esp_spi_min",
                "esp_spi_max"}


# The largest number any setting takes (seconds, rates per second): 1e9 s is 31 years, 1e9 per second
# is beyond any rate the director can see; larger values only overflow what they feed (a timer's
# deadline, the fast path's admission window in ns).
NUM_MAX = 1e9
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")  # TOML bare keys


class _Checker:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def err(self, path: str, msg: str) -> None:
        self.errors.append(f"{path}: {msg}")

    def unknown(self, path: str, table: dict, allowed: set[str]) -> None:
        for k in sorted(set(table) - allowed):
            if not _BARE_KEY.fullmatch(k):  # a quoted TOML key: shown quoted, so the error stays one line
                k = json.dumps(k)
            self.err(f"{path}.{k}" if path else k, "unknown setting")

    def int_(self, path: str, v: Any, lo: int, hi: int) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            self.err(path, f"must be an integer, got {v!r}")
            return lo
        if not lo <= v <= hi:
            self.err(path, f"must be {lo}..{hi}, got {v}")
        return v

    def num(self, path: str, v: Any, positive: bool = True) -> float:
        """A finite number of at most NUM_MAX: TOML's ``inf``/``nan`` and JSON's ``Infinity``/``1e999``
        are refused here, as are integers too large for a float, before any of them reaches a
        timer, a token bucket or a fast-path map value."""
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.err(path, f"must be a number, got {v!r}")
            return 1.0
        if isinstance(v, float) and not math.isfinite(v):
            self.err(path, f"must be a finite number, got {v}")
            return 1.0
        if not -NUM_MAX <= v <= NUM_MAX:
            shown = f"{v:.6g}" if isinstance(v, float) or abs(v) < 10**15 else f"an integer of {v.bit_length()} bits"
            self.err(path, f"must be at most {NUM_MAX:.0e}, got {shown}" if v > 0 else f"must be >= 0, got {shown}")
            return 1.0
        if positive and not v > 0:
            self.err(path, f"must be > 0, got {v}")
        elif not v >= 0:
            self.err(path, f"must be >= 0, got {v}")
        return float(v)

    def str_(self, path: str, v: Any, choices: tuple[str, ...] | None = None) -> str:
        if not isinstance(v, str) or not v:
            self.err(path, f"must be a non-empty string, got {v!r}")
            return ""
        if choices and v not in choices:
            self.err(path, f"must be one of {', '.join(choices)}, got {v!r}")
        return v

    def hex64(self, path: str, v: Any) -> int:
        """A 64-bit value written as a "0x..." string (TOML integers stop at 2**63 - 1)."""
        if not isinstance(v, str) or not re.fullmatch(r"0[xX][0-9a-fA-F]{1,16}", v.replace("_", "")):
            self.err(path, f'must be a hex string of at most 64 bits like "0x0100000000000000", got {v!r}')
            return 0
        return int(v.replace("_", ""), 16)

    def method(self, path: str, v: Any) -> Method:
        """dr, tun or nat, parsed here once (an error leaves DR, which nothing will apply)."""
        text = self.str_(path, v, METHOD_NAMES)
        return Method.parse(text) if text in METHOD_NAMES else Method.DR

    def bool_(self, path: str, v: Any) -> bool:
        if not isinstance(v, bool):
            self.err(path, f"must be true or false, got {v!r}")
            return False
        return v

    def ipv4(self, path: str, v: Any) -> str:
        try:
            a = ipaddress.IPv4Address(v)
        except (ipaddress.AddressValueError, ValueError, TypeError):
            self.err(path, f"not an IPv4 address: {v!r}")
            return "0.0.0.0"
        if a.is_multicast or a.is_unspecified or a == ipaddress.IPv4Address("255.255.255.255"):
            self.err(path, f"not a unicast address: {v}")
        return str(a)


    def ip(self, path: str, v: Any) -> str:
        """A unicast IPv4 or IPv6 address, returned in its canonical text (RFC 5952 for IPv6)."""
        if not isinstance(v, str) or ":" not in v:
            return self.ipv4(path, v)
        try:
            a = ipaddress.IPv6Address(v)
        except (ipaddress.AddressValueError, ValueError):
            self.err(path, f"not an IPv4 or IPv6 address: {v!r}")
            return "0.0.0.0"
        if a.is_multicast or a.is_link_local or int(a) >> 32 == 0:
            self.err(path, f"not a global or unique-local unicast address: {v} (multicast, link-local and ::/96 are refused)")
        return str(a)


def parse(text: str) -> Config:
    """Parse and validate TOML text; raises ConfigErrors listing every problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigErrors([f"toml: {e}"]) from None
    return from_dict(raw)


def load(path: str) -> Config:
    try:
        with open(path, "rb") as f:
            text = f.read().decode()
    except OSError as e:
        raise ConfigErrors([f"config: cannot read {path}: {e.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigErrors([f"config: {path} is not UTF-8 text"]) from None
    return parse(text)


def from_dict(raw: dict) -> Config:
    c = _Checker()
    c.unknown("", raw, {"daemon", "service"})
    d = raw.get("daemon", {})
    if not isinstance(d, dict):
        c.err("daemon", "must be a table")
        d = {}
    c.unknown("daemon", d, _DAEMON_KEYS)
    base = DaemonConfig()
    daemon = DaemonConfig(
        client_interface=c.str_("daemon.client_interface", d.get("client_interface", base.client_interface)),
        server_interface=c.str_("daemon.server_interface", d.get("server_interface", base.server_interface)),
        queue=c.int_("daemon.queue", d.get("queue", base.queue), 0, 65534),
        fail_open=c.bool_("daemon.fail_open", d.get("fail_open", base.fail_open)),
        capacity=c.int_("daemon.capacity", d.get("capacity", base.capacity), 1, 50_000_000),
        icmp_rate=c.num("daemon.icmp_rate", d.get("icmp_rate", base.icmp_rate), positive=False),
        new_entries_rate=c.num("daemon.new_entries_rate", d.get("new_entries_rate", 0.0), positive=False),
        new_entries_per_source=c.num("daemon.new_entries_per_source", d.get("new_entries_per_source", 0.0),
                                     positive=False),
        drop_entry_threshold=_fraction(c, "daemon.drop_entry_threshold",
                                       d.get("drop_entry_threshold", base.drop_entry_threshold)),
        control_socket=c.str_("daemon.control_socket", d.get("control_socket", base.control_socket)),
        metrics=_metrics_address(c, d.get("metrics", base.metrics)),
        bpf_pin_dir=_pin_dir(c, d.get("bpf_pin_dir", base.bpf_pin_dir)),
        fastpath_hook=c.str_("daemon.fastpath_hook", d.get("fastpath_hook", base.fastpath_hook), FASTPATH_HOOKS),
        fastpath_fib=c.str_("daemon.fastpath_fib", d.get("fastpath_fib", base.fastpath_fib),
                            ("cached", "main", "rules")),
        sync=_sync(c, d.get("sync")),
        bgp=_bgp(c, d.get("bgp")),
    )
    services = []
    raw_services = raw.get("service", [])
    if not isinstance(raw_services, list):
        c.err("service", "must be an array of tables ([[service]])")
        raw_services = []
    vips: dict[str, int] = {}
    addresses: dict[str, str] = {}
    for i, s in enumerate(raw_services):
        services.append(_service(c, f"service[{i}]", s, vips, addresses))
    if c.errors:
        raise ConfigErrors(c.errors)
    return Config(daemon, tuple(services))


def _fraction(c: _Checker, path: str, v: Any) -> float:
    f = c.num(path, v)
    if not 0.1 <= f <= 1.0:
        c.err(path, f"must be 0.1..1.0, got {v}")
        return 1.0
    return f


def _pin_dir(c: _Checker, v: Any) -> str:
    if not isinstance(v, str) or not v.startswith("/sys/fs/bpf/") or ".." in v or len(v) <= len("/sys/fs/bpf/"):
        c.err("daemon.bpf_pin_dir", f"must be a directory under /sys/fs/bpf/, got {v!r}")
        return DaemonConfig().bpf_pin_dir
    return v.rstrip("/")


def _metrics_address(c: _Checker, v: Any) -> str:
    """``host:port`` for the Prometheus endpoint, or "" to turn it off."""
    if v == "":
        return ""
    host, _, port = v.rpartition(":") if isinstance(v, str) else ("", "", "")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        c.err("daemon.metrics", f"must be host:port (or \"\" for off), got {v!r}")
        return ""
    return v


def _service(c: _Checker, p: str, s: Any, vips: dict[str, int], addresses: dict[str, str]) -> ServiceConfig:
    if not isinstance(s, dict):
        c.err(p, "must be a table")
        return ServiceConfig(vip="0.0.0.0")
    c.unknown(p, s, _SERVICE_KEYS)
    if "vip" not in s:
        c.err(f"{p}.vip", "missing")
    vip = c.ip(f"{p}.vip", s.get("vip", "0.0.0.0")) if "vip" in s else "0.0.0.0"
    if vip in vips:
        c.err(f"{p}.vip", f"duplicate of service[{vips[vip]}]")
    vips.setdefault(vip, int(p[8:-1]))
    scheduler = c.str_(f"{p}.scheduler", s.get("scheduler", "wlc"), tuple(sorted(SCHEDULERS)))
    opts = s.get("scheduler_options", {})
    if not isinstance(opts, dict):
        c.err(f"{p}.scheduler_options", "must be a table")
        opts = {}
    method = c.method(f"{p}.method", s.get("method", "dr"))
    affinity = c.str_(f"{p}.affinity", s.get("affinity", "ip"), AFFINITY)
    affinity_prefix = c.int_(f"{p}.affinity_prefix", s.get("affinity_prefix", 0), 0, 128 if ":" in vip else 32)
    if affinity_prefix and affinity != "ip":
        c.err(f"{p}.affinity_prefix", 'only with affinity = "ip" (a prefix groups addresses, not ports)')
    return_path = c.str_(f"{p}.return_path", s.get("return_path", "direct"), RETURN_PATHS)
    if return_path == "direct" and method == Method.NAT and "return_path" in s:
        c.err(f"{p}.return_path", 'a NAT service\'s replies always pass the director: "director" or leave it out')
    ah = c.bool_(f"{p}.ah", s.get("ah", method != Method.NAT))
    t = s.get("timeouts", {})
    if not isinstance(t, dict):
        c.err(f"{p}.timeouts", "must be a table")
        t = {}
    c.unknown(f"{p}.timeouts", t, {"init", "established"})
    init = c.num(f"{p}.timeouts.init", t.get("init", DEFAULT_INIT_TIMEOUT))
    est = c.num(f"{p}.timeouts.established", t.get("established", DEFAULT_ESTABLISHED_TIMEOUT))
    if init > 0 and est > 0 and est < init:
        c.err(f"{p}.timeouts.established", f"must be >= timeouts.init ({init}), got {est}")
    soft = s.get("soft_expiry", {})
    if not isinstance(soft, dict):
        c.err(f"{p}.soft_expiry", "must be a table")
        soft = {}
    c.unknown(f"{p}.soft_expiry", soft, {"limit", "grace"})
    soft_limit = c.int_(f"{p}.soft_expiry.limit", soft.get("limit", 0), 0, 50_000_000)
    soft_grace = c.num(f"{p}.soft_expiry.grace", soft.get("grace", 0.0), positive=bool(soft_limit))
    health: tuple = ()
    h = s.get("health")
    if h is not None:
        if not isinstance(h, dict):
            c.err(f"{p}.health", "must be a table")
        else:
            c.unknown(f"{p}.health", h, _HEALTH_KEYS)
            hv = {
                "interval": c.num(f"{p}.health.interval", h.get("interval", 5.0)),
                "timeout": c.num(f"{p}.health.timeout", h.get("timeout", 2.0)),
                "rise": c.int_(f"{p}.health.rise", h.get("rise", 2), 1, 100),
                "fall": c.int_(f"{p}.health.fall", h.get("fall", 3), 1, 100),
                "expire_on_down": c.bool_(f"{p}.health.expire_on_down", h.get("expire_on_down", False)),
                "icmp": c.bool_(f"{p}.health.icmp", h.get("icmp", False)),
            }
            if hv["timeout"] > hv["interval"]:
                c.err(f"{p}.health.timeout", f"must be <= health.interval ({hv['interval']}), got {hv['timeout']}")
            health = tuple(sorted(hv.items()))
    servers, server_paths = [], []
    raw_servers = s.get("server", [])
    if not isinstance(raw_servers, list):
        c.err(f"{p}.server", "must be an array of tables ([[service.server]])")
        raw_servers = []
    for j, r in enumerate(raw_servers):
        q = f"{p}.server[{j}]"
        if not isinstance(r, dict):
            c.err(q, "must be a table")
            continue
        c.unknown(q, r, _SERVER_KEYS)
        if "address" not in r:
            c.err(f"{q}.address", "missing")
        addr = c.ip(f"{q}.address", r.get("address", "0.0.0.0")) if "address" in r else "0.0.0.0"
        if "0.0.0.0" not in (addr, vip) and (":" in addr) != (":" in vip):
            c.err(f"{q}.address", f"{addr} is not of the VIP's address family ({vip}): a service is one family")
        key = f"{vip}/{addr}"
        if key in addresses:
            c.err(f"{q}.address", f"duplicate of {addresses[key]}")
        addresses.setdefault(key, q)
        rs_method = c.method(f"{q}.method", r["method"]) if r.get("method", "") != "" else None
        u = c.int_(f"{q}.u_threshold", r.get("u_threshold", 0), 0, 50_000_000)
        lo = c.int_(f"{q}.l_threshold", r.get("l_threshold", 0), 0, 50_000_000)
        if u and lo > u:
            c.err(f"{q}.l_threshold", f"must be <= u_threshold ({u}), got {lo}")
        label = c.hex64(f"{q}.spi_label", r["spi_label"]) if "spi_label" in r else None
        esp = [c.int_(f"{q}.{k}", r[k], 0, 0xFFFFFFFF) if k in r else None for k in ("esp_spi_min", "esp_spi_max")]
        servers.append(
            ServerConfig(addr, c.int_(f"{q}.weight", r.get("weight", 1), 0, 65535), rs_method, u, lo, label, *esp)
        )
        server_paths.append(q)
    mask = _spi_labels(c, p, s.get("spi_label"), servers, server_paths)
    if ":" in vip:  # IPv6 (docs/ipv6.md says what is not built yet)
        if return_path == "director" and method != Method.NAT:
            c.err(f"{p}.return_path", '"director" is not built for IPv6 DR and TUN services yet: "direct"')
    nat = ah_across_nat(ah, method, (r.method for r in servers))
    if nat is not None:
        c.err(f"{p}.ah" if nat < 0 else f"{server_paths[nat]}.method", AH_ACROSS_NAT)
    return ServiceConfig(
        vip=vip,
        scheduler=scheduler,
        scheduler_options=tuple(sorted(opts.items())),
        method=method,
        affinity=affinity,
        affinity_prefix=affinity_prefix,
        ah=ah,
        init_timeout=init,
        established_timeout=est,
        retransmit_threshold=c.int_(f"{p}.retransmit_threshold", s.get("retransmit_threshold", 3), 0, 255),
        soft_limit=soft_limit,
        soft_grace=soft_grace,
        expire_quiescent=c.bool_(f"{p}.expire_quiescent", s.get("expire_quiescent", False)),
        health=health,
        servers=tuple(servers),
        drain=c.bool_(f"{p}.drain", s.get("drain", False)),
        spi_label_mask=mask,
        ingress=_ingress(c, p, s.get("ingress")),
        return_path=return_path,
    )


INGRESS_KEYS = ("esp_pps", "ah_pps", "ike_pps", "burst")


def _ingress(c: _Checker, p: str, v: Any) -> tuple:
    """``ingress = { esp_pps = ..., ah_pps = ..., ike_pps = ..., burst = ... }``: whole packets per
    second per source (0 or absent: no limit), burst in packets (0 or absent: one second of each
    rate); () when every rate is 0."""
    from director.ingress import PPS_MAX

    if v is None:
        return ()
    if not isinstance(v, dict):
        c.err(f"{p}.ingress", "must be a table like { esp_pps = 50, ike_pps = 20 }")
        return ()
    c.unknown(f"{p}.ingress", v, set(INGRESS_KEYS))
    vals = tuple(c.int_(f"{p}.ingress.{k}", v.get(k, 0), 0, PPS_MAX) for k in INGRESS_KEYS)
    if vals[3] and not any(vals[:3]):
        c.err(f"{p}.ingress.burst", "set without any of esp_pps, ah_pps, ike_pps")
    return vals if any(vals[:3]) else ()


def _spi_labels(c: _Checker, p: str, v: Any, servers: list[ServerConfig], paths: list[str]) -> int:
    """``spi_label = { mask = "0x..." }``: every server then has a label (all or none), checked by
    SpiLabels.build as the core will build it; returns the mask (0: no labels)."""
    from director.service import ConfigError
    from director.spi_label import ServerLabel, SpiLabels

    mask = 0
    if v is not None:
        if not isinstance(v, dict):
            c.err(f"{p}.spi_label", "must be a table like { mask = \"0xff00000000000000\" }")
        else:
            c.unknown(f"{p}.spi_label", v, {"mask"})
            if "mask" not in v:
                c.err(f"{p}.spi_label.mask", "missing")
            else:
                mask = c.hex64(f"{p}.spi_label.mask", v["mask"])
    labelled = {j: r for j, r in enumerate(servers)
                if r.spi_label is not None or r.esp_spi_min is not None or r.esp_spi_max is not None}  # fmt: skip
    if not mask:
        for j in labelled:
            c.err(f"{paths[j]}.spi_label", f"the service has no spi_label.mask ({p}.spi_label)")
        return 0
    for j, r in enumerate(servers):
        if r.spi_label is None:
            c.err(f"{paths[j]}.spi_label", "missing: with spi_label.mask set every real server needs its label")
    try:
        SpiLabels.build(mask, {j: ServerLabel(r.spi_label, r.esp_spi_min, r.esp_spi_max)
                               for j, r in enumerate(servers) if r.spi_label is not None},
                        where=f"{p}.spi_label", server_path=lambda j: paths[j],
                        fields=("spi_label", "esp_spi_min", "esp_spi_max"))  # fmt: skip
    except ConfigError as e:
        c.errors.extend(str(e).split("; "))
    return mask


def service_to_dict(s: ServiceConfig) -> dict:
    """The TOML-shaped table of one service (``from_dict`` reads it back to an equal ServiceConfig)."""
    out: dict[str, Any] = {
        "vip": s.vip,
        "scheduler": s.scheduler,
        "method": s.method.label,
        "affinity": s.affinity,
        **({"affinity_prefix": s.affinity_prefix} if s.affinity_prefix else {}),
        "ah": s.ah,
        "timeouts": {"init": s.init_timeout, "established": s.established_timeout},
        "retransmit_threshold": s.retransmit_threshold,
    }
    if s.scheduler_options:
        out["scheduler_options"] = dict(s.scheduler_options)
    if s.soft_limit:
        out["soft_expiry"] = {"limit": s.soft_limit, "grace": s.soft_grace}
    if s.expire_quiescent:
        out["expire_quiescent"] = True
    if s.health:
        out["health"] = dict(s.health)
    if s.drain:
        out["drain"] = True
    if s.spi_label_mask:
        out["spi_label"] = {"mask": f"{s.spi_label_mask:#018x}"}
    if s.ingress:
        out["ingress"] = {k: n for k, n in zip(INGRESS_KEYS, s.ingress) if n}
    if s.return_path != "direct":
        out["return_path"] = s.return_path
    out["server"] = [server_to_dict(r) for r in s.servers]
    return out


def server_to_dict(r: ServerConfig) -> dict:
    out: dict[str, Any] = {"address": r.address, "weight": r.weight}
    if r.method is not None:
        out["method"] = r.method.label
    if r.u_threshold:
        out["u_threshold"] = r.u_threshold
    if r.l_threshold:
        out["l_threshold"] = r.l_threshold
    if r.spi_label is not None:
        out["spi_label"] = f"{r.spi_label:#018x}"
    for k in ("esp_spi_min", "esp_spi_max"):
        if getattr(r, k) is not None:
            out[k] = getattr(r, k)
    return out


def _sync_to_dict(s: SyncConfig) -> dict:
    out = {"peers": list(s.peers), "key": s.key, "port": s.port, "role": s.role, "state_file": s.state_file}
    return out | ({"bind": s.bind} if s.bind else {})


def to_dict(cfg: Config) -> dict:
    """The whole config as the dict ``from_dict`` takes (round trip: equal Config)."""
    d = cfg.daemon
    return {
        "daemon": {k: getattr(d, k) for k in DaemonConfig.__dataclass_fields__ if k not in ("sync", "bgp")}
        | ({"sync": _sync_to_dict(d.sync)} if d.sync else {})
        | ({"bgp": {k: getattr(d.bgp, k) for k in BgpConfig.__dataclass_fields__}} if d.bgp else {}),
        "service": [service_to_dict(s) for s in cfg.services],
    }
