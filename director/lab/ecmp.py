"""The scale-out lab: clients, a BIRD ECMP router, N directors speaking BGP + BFD, real servers.

Built on :class:`director.lab.netns.Lab` (namespaces, processes and teardown are its own); only
the topology differs. Every director runs its own BIRD 2 (own config, control socket and pid
file in the lab's temporary directory), announcing the VIP /32 to the router; the router's BIRD
merges the equal routes into one multipath route in its kernel table::

    c1 198.18.0.11   c2 .12
      |                |
    ==+================+======== wan 198.18.0.0/24 ==+==
                                                    |
                                   router eth0 .254 (BIRD: AS 65000, merge paths, BFD)
                                   router eth1 198.18.2.254
                                                    |
    ==+================+================+========== fabric 198.18.2.0/24 (eBGP + BFD)
      |                |                |
    d1 eth0 .1       d2 .2            d3 .3          (BIRD each: AS 65001, VIP 198.18.10.100/32)
    d1 eth1 198.18.1.1  d2 .2          d3 .3
      |                |                |
    ==+================+================+========== lan 198.18.1.0/24 ==+== router eth2 .254
      |                |                |
    rs1 198.18.1.11  rs2 .12          rs3 .13   (dr/tun: VIP on lo, default via the router)

``net.ipv4.fib_multipath_hash_policy`` on the router is 1 (L4) by default: a client's UDP 500,
UDP 4500 and ESP may reach different directors, the hard case.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from pyroute2 import IPRoute

from director.dataplane.bgp import Bird, render_include
from director.lab.netns import RS_ROLES, Lab, LabError, _write_sysctls, pids_in_netns, stop_process

__all__ = ["EcmpLab", "NAT_PUBLIC", "ROUTER_AS", "DIRECTOR_AS", "BFD_INTERVAL_MS", "BFD_MULTIPLIER", "bird_exe"]

ROUTER_AS = 65000
DIRECTOR_AS = 65001
BFD_INTERVAL_MS = 100  # BFD tx/rx interval on both ends of every session
BFD_MULTIPLIER = 3  # a session is down after 3 missed intervals: 300 ms
HOLD_TIME = 9  # BGP hold time (s): the bound without BFD for a silent director (BIRD's default: 240)
NAT_PUBLIC = "198.18.0.13"  # the masquerading NAT's address on the wan (add_nat_clients)


def bird_exe() -> str:
    exe = shutil.which("bird") or "/usr/sbin/bird"
    if not os.path.exists(exe):
        raise LabError("BIRD 2 is not installed (Debian: bird2)")
    return exe


class EcmpLab(Lab):
    """``EcmpLab(mode, directors=3)``: the scale-out topology; a context manager like Lab."""

    vip = "198.18.10.100"
    router_wan = "198.18.0.254"
    router_fabric = "198.18.2.254"
    router_lan = "198.18.1.254"
    fabric_net = "198.18.2.0/24"
    client_addrs = {"c1": "198.18.0.11", "c2": "198.18.0.12"}

    def __init__(self, mode: str = "dr", prefix: str | None = None, directors: int = 3,
                 hash_policy: int = 1) -> None:  # fmt: skip
        super().__init__(mode, prefix, directors=1)
        if not 1 <= directors <= 8:
            raise ValueError(f"directors must be 1..8, not {directors!r}")
        if hash_policy not in (0, 1):
            raise ValueError(f"hash_policy must be 0 (L3) or 1 (L4), not {hash_policy!r}")
        self.n = directors
        self.hash_policy = hash_policy
        self.director_roles = [f"d{i}" for i in range(1, directors + 1)]
        self.roles = ("sw", "c1", "c2", "router", *self.director_roles, *RS_ROLES)
        self.ns = {role: f"{self.prefix}-{role}" for role in self.roles}
        self.client_addrs = dict(type(self).client_addrs)
        self._birds: dict[str, subprocess.Popen] = {}
        self._bird_adapters: dict[str, Bird] = {}

    def __repr__(self) -> str:
        return f"EcmpLab(mode={self.mode!r}, directors={self.n}, prefix={self.prefix!r}, up={self._up})"

    # -- addresses --------------------------------------------------------------------------------

    def director_fabric(self, role: str) -> str:
        return f"198.18.2.{self.director_roles.index(role) + 1}"

    def director_lan_addr(self, role: str) -> str:
        return f"198.18.1.{self.director_roles.index(role) + 1}"

    def role_of_nexthop(self, gateway: str) -> str:
        return self.director_roles[int(gateway.rsplit(".", 1)[1]) - 1]

    # -- build ------------------------------------------------------------------------------------

    def _build(self) -> None:
        bird_exe()
        for role in self.roles:
            self.add_namespace(role)
        iprs: dict[str, IPRoute] = {}
        try:
            for role in self.roles:
                iprs[role] = IPRoute(netns=self.ns[role], flags=0)
                iprs[role].link("set", index=iprs[role].link_lookup(ifname="lo")[0], state="up")
            self._wire_ecmp(iprs)
            for role, ifname, addr, plen in self._ecmp_addresses():
                ipr = iprs[role]
                ipr.addr("add", index=ipr.link_lookup(ifname=ifname)[0], address=addr, prefixlen=plen)
            for role in self.client_roles:
                iprs[role].route("add", dst="0.0.0.0/0", gateway=self.router_wan)
            for role in self.director_roles:
                iprs[role].route("add", dst="0.0.0.0/0", gateway=self.router_fabric)
            for i, role in enumerate(RS_ROLES):
                gateway = self.router_lan if self.mode in ("dr", "tun") else self.director_lan_addr(self.director_roles[0])
                iprs[role].route("add", dst="0.0.0.0/0", gateway=gateway)
        finally:
            for ipr in iprs.values():
                ipr.close()
        self._tune_ecmp()
        if self.mode == "tun":
            self._setup_decap()
        self.start_bird("router")
        for role in self.director_roles:
            self.start_bird(role)

    @property
    def client_roles(self) -> list[str]:
        return list(self.client_addrs)

    def _wire_ecmp(self, iprs: dict[str, IPRoute]) -> None:
        sw = iprs["sw"]
        bridges = {}
        for br in ("wan", "fabric", "lan"):
            sw.link("add", ifname=br, kind="bridge", br_stp_state=0, br_forward_delay=0)
            bridges[br] = sw.link_lookup(ifname=br)[0]
            sw.link("set", index=bridges[br], state="up")
        ports = [(c, "eth0", "wan") for c in self.client_roles]
        ports += [("router", "eth0", "wan"), ("router", "eth1", "fabric"), ("router", "eth2", "lan")]
        for d in self.director_roles:
            ports += [(d, "eth0", "fabric"), (d, "eth1", "lan")]
        ports += [(rs, "eth0", "lan") for rs in RS_ROLES]
        for role, ifname, br in ports:
            port = f"{role}-{ifname}"
            sw.link("add", ifname=port, kind="veth", mtu=1500,
                    peer={"ifname": ifname, "net_ns_fd": self.ns[role], "mtu": 1500})  # fmt: skip
            idx = sw.link_lookup(ifname=port)[0]
            sw.link("set", index=idx, master=bridges[br], state="up")
        self._links_up(iprs)

    def _ecmp_addresses(self) -> list[tuple[str, str, str, int]]:
        addrs = [(c, "eth0", a, 24) for c, a in self.client_addrs.items()]
        addrs += [("router", "eth0", self.router_wan, 24), ("router", "eth1", self.router_fabric, 24),
                  ("router", "eth2", self.router_lan, 24)]  # fmt: skip
        for d in self.director_roles:
            addrs += [(d, "eth0", self.director_fabric(d), 24), (d, "eth1", self.director_lan_addr(d), 24),
                      (d, "lo", self.vip, 32)]  # fmt: skip
        for role, addr in zip(RS_ROLES, self.rs_addrs):
            addrs.append((role, "eth0", addr, 24))
            if self.mode in ("dr", "tun"):
                addrs.append((role, "lo", self.vip, 32))
        return addrs

    def _tune_ecmp(self) -> None:
        for role in self.roles:
            values: dict[str, int | str] = {}
            if role in ("router", *self.director_roles):
                values["net/ipv4/ip_forward"] = 1
            if role == "router":
                values["net/ipv4/fib_multipath_hash_policy"] = self.hash_policy
            if role == "sw" and os.path.exists("/proc/sys/net/bridge"):
                for fam in ("iptables", "ip6tables", "arptables"):
                    values[f"net/bridge/bridge-nf-call-{fam}"] = 0
            if role in RS_ROLES and self.mode in ("dr", "tun"):
                for dev in ("all", "eth0"):
                    values[f"net/ipv4/conf/{dev}/arp_ignore"] = 1
                    values[f"net/ipv4/conf/{dev}/arp_announce"] = 2
            if role in self.director_roles:
                # The VIP is on lo (the director accepts it); it must never answer ARP for it on
                # the LAN, where the real servers hold the same VIP.
                for dev in ("all", "eth1"):
                    values[f"net/ipv4/conf/{dev}/arp_ignore"] = 1
                    values[f"net/ipv4/conf/{dev}/arp_announce"] = 2
            for dev in self._devices(role):
                values[f"net/ipv4/conf/{dev}/rp_filter"] = 0
            _write_sysctls(self.ns[role], values)

    # -- BIRD -------------------------------------------------------------------------------------

    def bird_dir(self, role: str) -> Path:
        d = self._tmp() / f"bird-{role}"
        d.mkdir(exist_ok=True)
        return d

    def bird_socket(self, role: str) -> Path:
        return self.bird_dir(role) / "bird.ctl"

    def bird_include(self, role: str) -> Path:
        return self.bird_dir(role) / "vips.conf"

    def bird(self, role: str) -> Bird:
        """The adapter for ``role``'s BIRD (a director's, to announce; the router's, to read); one
        per role, so what it applied is remembered across calls (and across BIRD restarts, as
        the include file is)."""
        if role not in self._bird_adapters:
            self._bird_adapters[role] = Bird(self.bird_socket(role), self.bird_include(role))
        return self._bird_adapters[role]

    def _bfd_block(self, ifname: str) -> str:
        return (f'protocol bfd {{\n    interface "{ifname}" {{\n'
                f"        min rx interval {BFD_INTERVAL_MS} ms;\n"
                f"        min tx interval {BFD_INTERVAL_MS} ms;\n"
                f"        multiplier {BFD_MULTIPLIER};\n    }};\n}}\n")  # fmt: skip

    # Short connect/error timers: with BIRD's defaults a neighbour that comes back waits minutes.
    _BGP_TIMERS = (f"    hold time {HOLD_TIME};\n    keepalive time 3;\n    connect retry time 1;\n"
                   "    connect delay time 1;\n    error wait time 1, 4;\n    graceful restart off;\n")

    def bird_conf(self, role: str, bfd: bool = True) -> str:
        if role == "router":
            peers = "".join(
                f"protocol bgp {d} from directors {{\n    neighbor {self.director_fabric(d)} as {DIRECTOR_AS};\n}}\n"
                for d in self.director_roles
            )
            return (
                f"router id {self.router_fabric};\nprotocol device {{ scan time 10; }}\n"
                # merge paths: equal BGP routes become one multipath kernel route
                f"protocol kernel {{\n    ipv4 {{ import none; export all; }};\n    merge paths on limit 16;\n}}\n"
                f"{self._bfd_block('eth1')}"
                f"template bgp directors {{\n    local {self.router_fabric} as {ROUTER_AS};\n"
                f"    ipv4 {{ import all; export none; }};\n    bfd {'on' if bfd else 'off'};\n{self._BGP_TIMERS}}}\n"
                f"{peers}"
            )
        me = self.director_fabric(role)
        return (
            f"router id {me};\nprotocol device {{ scan time 10; }}\n"
            f"{self._bfd_block('eth0')}"
            f'include "{self.bird_include(role)}";\n'
            f"protocol bgp uplink {{\n    local {me} as {DIRECTOR_AS};\n"
            f"    neighbor {self.router_fabric} as {ROUTER_AS};\n"
            f"    ipv4 {{ import none; export where source = RTS_STATIC; }};\n"
            f"    bfd {'on' if bfd else 'off'};\n{self._BGP_TIMERS}}}\n"
        )

    def start_bird(self, role: str, bfd: bool = True, timeout: float = 10.0) -> subprocess.Popen:
        """BIRD in ``role``'s namespace (foreground, own files); returns once its socket answers."""
        self.stop_bird(role)
        d = self.bird_dir(role)
        conf = d / "bird.conf"
        conf.write_text(self.bird_conf(role, bfd=bfd))
        if role != "router" and not self.bird_include(role).exists():
            self.bird_include(role).write_text(render_include({}))
        sock = self.bird_socket(role)
        sock.unlink(missing_ok=True)
        log = open(d / "bird.log", "ab")
        try:
            proc = self.popen(role, [bird_exe(), "-f", "-c", str(conf), "-s", str(sock), "-P", str(d / "bird.pid")],
                              stdout=log, stderr=log)  # fmt: skip
        finally:
            log.close()
        self._birds[role] = proc
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise LabError(f"bird in {role} exited {proc.returncode}: {(d / 'bird.log').read_text()[-2000:]}")
            if sock.exists():
                try:
                    self.bird(role).command("show status")
                    return proc
                except Exception:
                    pass
            if time.monotonic() > deadline:
                raise LabError(f"bird in {role} did not answer on {sock} within {timeout}s")
            time.sleep(0.02)

    def bird_pid(self, role: str) -> int:
        return self._birds[role].pid

    def stop_bird(self, role: str) -> None:
        proc = self._birds.pop(role, None)
        if proc is not None:
            stop_process(proc, timeout=5)

    def kill_director(self, role: str) -> list[int]:
        """SIGKILL every process in ``role``'s namespace, like a box losing power; returns the pids."""
        pids = pids_in_netns([self.ns[role]])
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc = self._birds.pop(role, None)
        if proc is not None:
            proc.wait(timeout=5)
        return pids

    # -- the router's view ------------------------------------------------------------------------

    def nexthops(self, dst: str | None = None) -> set[str]:
        """The gateways of the router's kernel route to ``dst`` (the VIP by default), read by
        netlink: the multipath legs, or the one gateway, or nothing."""
        dst = dst or self.vip
        with IPRoute(netns=self.ns["router"], flags=0) as ipr:
            routes = ipr.get_routes(family=socket.AF_INET, table=254)
        found: set[str] = set()
        for r in routes:
            if r.get_attr("RTA_DST") != dst or r["dst_len"] != 32:
                continue
            gw = r.get_attr("RTA_GATEWAY")
            if gw:
                found.add(gw)
            for leg in r.get_attr("RTA_MULTIPATH") or []:
                if leg.get_attr("RTA_GATEWAY"):
                    found.add(leg.get_attr("RTA_GATEWAY"))
        return found

    def wait_nexthops(self, want: set[str], timeout: float, poll: float = 0.002) -> float:
        """Wait until the router's VIP route has exactly the ``want`` gateways; returns the
        seconds it took. Raises TimeoutError with the last route seen."""
        start = time.monotonic()
        while True:
            got = self.nexthops()
            if got == want:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"router's route to {self.vip}: {sorted(got)} after {timeout}s, want {sorted(want)}")
            time.sleep(poll)

    def fabric_addrs(self, roles) -> set[str]:
        return {self.director_fabric(r) for r in roles}

    # -- clients behind a NAT ---------------------------------------------------------------------

    nat_public = NAT_PUBLIC

    def add_nat_clients(self, n: int) -> list[str]:
        """``n`` client namespaces n1, n2, ... behind one masquerading NAT (namespace ``nat``, wan
        address 198.18.0.13): client ``nk`` is 198.19.k.2 on its own veth leg to the NAT's
        ``ethk`` (198.19.k.1), so every one of them reaches the VIP from 198.18.0.13, on ports the
        NAT picks (the first keeps 500/4500, the others are remapped). Registered with the lab
        (``ns``, ``client_addrs``): ``down()`` removes them. Returns the client roles."""
        if not 1 <= n <= 8:
            raise ValueError(f"n must be 1..8, not {n!r}")
        if "nat" in self.ns:
            raise LabError("the NAT clients are already added")
        self.add_namespace("nat")
        roles = [f"n{k}" for k in range(1, n + 1)]
        for role in roles:
            self.add_namespace(role)
        with IPRoute(netns=self.ns["sw"], flags=0) as sw:
            sw.link("add", ifname="nat-eth0", kind="veth", mtu=1500,
                    peer={"ifname": "eth0", "net_ns_fd": self.ns["nat"], "mtu": 1500})  # fmt: skip
            idx = sw.link_lookup(ifname="nat-eth0")[0]
            sw.link("set", index=idx, master=sw.link_lookup(ifname="wan")[0], state="up")
        with IPRoute(netns=self.ns["nat"], flags=0) as nat:
            for k, role in enumerate(roles, 1):
                nat.link("add", ifname=f"eth{k}", kind="veth", mtu=1500,
                         peer={"ifname": "eth0", "net_ns_fd": self.ns[role], "mtu": 1500})  # fmt: skip
            for link in nat.get_links():
                nat.link("set", index=link["index"], state="up")
            nat.addr("add", index=nat.link_lookup(ifname="eth0")[0], address=NAT_PUBLIC, prefixlen=24)
            for k in range(1, n + 1):
                nat.addr("add", index=nat.link_lookup(ifname=f"eth{k}")[0], address=f"198.19.{k}.1", prefixlen=24)
            nat.route("add", dst="0.0.0.0/0", gateway=self.router_wan)
        for k, role in enumerate(roles, 1):
            with IPRoute(netns=self.ns[role], flags=0) as ipr:
                for link in ipr.get_links():
                    ipr.link("set", index=link["index"], state="up")
                ipr.addr("add", index=ipr.link_lookup(ifname="eth0")[0], address=f"198.19.{k}.2", prefixlen=24)
                ipr.route("add", dst="0.0.0.0/0", gateway=f"198.19.{k}.1")
            _write_sysctls(self.ns[role], {"net/ipv4/conf/eth0/rp_filter": 0})
            self.client_addrs[role] = f"198.19.{k}.2"
        _write_sysctls(self.ns["nat"], {"net/ipv4/ip_forward": 1})
        self.run("nat", ["iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j", "MASQUERADE"])
        return roles

    def seen_as(self, role: str) -> str:
        """A client's address as the directors see it (the NAT's for the clients behind it)."""
        return NAT_PUBLIC if role.startswith("n") and role in self.client_addrs else self.client_addrs[role]
