"""The lab topology: clients, a NAT, the director, a return-path router and three real servers.

Every node is a network namespace named ``<prefix>-<role>``; nothing is created in the root
namespace. The two shared segments are Linux bridges inside a switch namespace ``sw``::

    c1 198.18.0.11   c2 .12   nat .13 (MASQUERADE) <-- c3 198.19.3.2 (default via nat 198.19.3.1)
      |                |         |
    ==+================+=========+===== wan 198.18.0.0/24 ==+==================+==
                                                            |                  |
                                  director eth0 .1 + VIP .100/32    gw eth0 .254
                                  director eth1 .1                  gw eth1 .254
                                                            |                  |
    ==+================+=========+===== lan 198.18.1.0/24 ==+==================+==
      |                |         |
    rs1 198.18.1.11  rs2 .12   rs3 .13   dr/tun: VIP on lo, default via gw; nat: via director
                                         (dr/tun with return_via_director=True: via director)

Links, addresses and routes go through pyroute2; sysctls are written to /proc/sys from a thread
that has entered the namespace; only iptables (nat) and tc (tun) are shelled out. :meth:`Lab.down`
kills what the lab started and deletes the namespaces it made, from any partial state.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from director.dataplane.ebpf import object_dir
from director.packet import ip_to_int, ipv4_checksum

__all__ = [
    "Lab", "LabCommandError", "LabError", "MODES", "ROLES",
    "cleanup", "in_netns", "list_labs", "pids_in_netns", "read_sysctl",
]  # fmt: skip

MODES = ("dr", "tun", "nat")
RS_ROLES = ("rs1", "rs2", "rs3")
ROLES = ("sw", "c1", "c2", "nat", "c3", "director", "gw", *RS_ROLES)
DIRECTOR2 = "director2"  # the optional second (backup) director: Lab(mode, directors=2)
NETNS_DIR = "/run/netns"
DEFAULT_PREFIX_RE = re.compile(r"^vdl[0-9a-f]{6}$")
ECMP_ROLE_RE = re.compile(r"router|d[1-8]")  # director/lab/ecmp.py's extra roles

REPO = Path(__file__).resolve().parents[2]
DECAP_OBJ = object_dir() / "rs_decap.o"  # the same lookup as the fast path's objects
DECAP_SECTION = "tc"
DECAP_TUN = "decap0"

_CLONE_NEWNET = 0x40000000
_TUNSETIFF = 0x400454CA
_TUNSETPERSIST = 0x400454CB
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_MTU = 1500

_libc = ctypes.CDLL(None, use_errno=True)


class LabError(RuntimeError):
    """The lab could not be built or torn down; the message says what and where."""


class LabCommandError(subprocess.CalledProcessError):
    """A command run inside a lab namespace failed; str() includes its stderr."""

    def __str__(self) -> str:
        err = self.stderr if isinstance(self.stderr, str) else (self.stderr or b"").decode(errors="replace")
        return f"{super().__str__()}\nstderr: {err.strip()}"


# -- namespaces -----------------------------------------------------------------------------------


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the body with the calling thread inside netns ``name``, and always switch back.

    setns(2) moves only the calling thread; sockets created in the body stay in ``name``.
    Unlike ``pyroute2.netns.pushns``, a missing namespace is an error, never created.
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(home)  # if this fails the thread is lost anyway: let it raise
        finally:
            os.close(target)
    finally:
        os.close(home)


def _write_sysctls(name: str, values: dict[str, int | str]) -> None:
    """Write ``net/...`` sysctls inside netns ``name`` (paths relative to /proc/sys)."""
    with in_netns(name):
        for key, value in values.items():
            with open(f"/proc/sys/{key}", "w") as f:
                f.write(f"{value}\n")


def read_sysctl(name: str, key: str) -> str:
    """One ``net/...`` sysctl as seen inside netns ``name``."""
    with in_netns(name):
        with open(f"/proc/sys/{key}") as f:
            return f.read().strip()


def _ns_ident(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def pids_in_netns(names: Iterable[str]) -> list[int]:
    """Pids (other than ours) whose network namespace is one of ``names``."""
    idents = {i for i in (_ns_ident(os.path.join(NETNS_DIR, n)) for n in names) if i}
    if not idents:
        return []
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        if _ns_ident(f"/proc/{entry}/ns/net") in idents:
            found.append(int(entry))
    return found


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> int | None:
    """SIGTERM, wait up to ``timeout``, SIGKILL if it hangs; returns the exit code (None if never started)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    return proc.returncode


def _kill_and_reap(pids: list[int], grace: float = 1.0) -> list[int]:
    """SIGTERM then SIGKILL ``pids``; returns those still alive after both."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            alive = []
            for pid in pids:
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)  # reap our own children
                except ChildProcessError:
                    done = 0 if _pid_alive(pid) else pid
                if not done and _pid_alive(pid):
                    alive.append(pid)
            pids = alive
            if pids:
                time.sleep(0.02)
        if not pids:
            break
    return pids


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def list_labs(prefix: str | None = None) -> dict[str, list[str]]:
    """Namespaces in /run/netns grouped by lab prefix (all ``vdl??????`` labs, or ``prefix``)."""
    try:
        names = sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return {}
    labs: dict[str, list[str]] = {}
    for name in names:
        head, sep, role = name.rpartition("-")
        if not sep or (role not in ROLES and role != DIRECTOR2 and not ECMP_ROLE_RE.fullmatch(role)):
            continue
        if (prefix is not None and head == prefix) or (prefix is None and DEFAULT_PREFIX_RE.match(head)):
            labs.setdefault(head, []).append(name)
    return labs


def cleanup(prefix: str) -> list[str]:
    """Remove a (crashed) lab's namespaces and kill every process inside them; returns the names."""
    names = list_labs(prefix).get(prefix, [])
    stuck = _kill_and_reap(pids_in_netns(names))
    if stuck:
        raise LabError(f"processes would not die in {prefix}: {stuck}")
    for name in names:
        pr_netns.remove(name)
    return names


# -- the lab --------------------------------------------------------------------------------------


class Lab:
    """The lab topology for one forwarding ``mode`` ("dr", "tun" or "nat"); a context manager.

    ``up()`` and ``down()`` are idempotent; ``down()`` also undoes a half-built lab. Addresses are
    class attributes (dotted quads) with ``*_int`` twins for the packet builders.
    """

    vip = "198.18.0.100"
    director_wan = "198.18.0.1"
    director_lan = "198.18.1.1"
    gw_wan = "198.18.0.254"
    gw_lan = "198.18.1.254"
    nat_public = "198.18.0.13"
    nat_inside = "198.19.3.1"
    rs_addrs = ["198.18.1.11", "198.18.1.12", "198.18.1.13"]
    client_addrs = {"c1": "198.18.0.11", "c2": "198.18.0.12", "c3": "198.19.3.2"}
    wan_net = "198.18.0.0/24"
    lan_net = "198.18.1.0/24"

    vip_int = ip_to_int(vip)
    director_wan_int = ip_to_int(director_wan)
    director_lan_int = ip_to_int(director_lan)
    rs_addr_ints = [ip_to_int(a) for a in rs_addrs]
    client_addr_ints = {k: ip_to_int(v) for k, v in client_addrs.items()}

    rs_roles = list(RS_ROLES)

    # -- IPv6 (``ipv6=True``): a dual-stack lab, the same layout with a /64 per segment --
    vip6 = "2001:db8:18::100"
    director_wan6 = "2001:db8:18::1"
    director_lan6 = "2001:db8:18:1::1"
    gw_wan6 = "2001:db8:18::fe"
    gw_lan6 = "2001:db8:18:1::fe"
    rs_addrs6 = ["2001:db8:18:1::11", "2001:db8:18:1::12", "2001:db8:18:1::13"]
    client_addrs6 = {"c1": "2001:db8:18::11", "c2": "2001:db8:18::12"}  # c3 (behind the NAT) is IPv4 only
    vip6_int = ip_to_int(vip6)
    rs_addr6_ints = [ip_to_int(a) for a in rs_addrs6]
    client_addr6_ints = {k: ip_to_int(v) for k, v in client_addrs6.items()}

    # -- two directors (failover): addresses of the second one and of the VRRP-held LAN gateway --
    director2_wan = "198.18.0.2"
    director2_lan = "198.18.1.2"
    lan_vip = "198.18.1.3"  # NAT real servers' gateway when two directors share the VIPs

    def __init__(self, mode: str = "dr", prefix: str | None = None, directors: int = 1, *,
                 return_via_director: bool = False, ipv6: bool = False) -> None:  # fmt: skip
        if directors not in (1, 2):
            raise ValueError(f"directors must be 1 or 2, not {directors!r}")
        # DR/TUN with the real servers' default route via the director (the VIP stays on the
        # director's eth0 too): their replies come back through it (return_path = "director")
        if return_via_director and (mode == "nat" or directors != 1):
            raise ValueError("return_via_director is for DR and TUN labs with one director")
        self.return_via_director = return_via_director
        if ipv6 and (directors != 1 or return_via_director):
            raise ValueError("ipv6 is for labs with one director")
        self.ipv6 = ipv6
        self.directors = directors
        self.roles = ROLES + ((DIRECTOR2,) if directors == 2 else ())
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if prefix is not None and (not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.]{0,40}", prefix)):
            raise ValueError(f"prefix must be letters, digits, '_' or '.', not {prefix!r}")
        self.mode = mode
        self.rs_addrs = list(type(self).rs_addrs)  # per-instance copies: callers may mutate them
        self.client_addrs = dict(type(self).client_addrs)
        self.prefix = prefix or f"vdl{secrets.token_hex(3)}"
        self.ns = {role: f"{self.prefix}-{role}" for role in self.roles}
        self.tmpdir: Path | None = None
        self._created: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._sockets: list[socket.socket] = []
        self._iprs: list[IPRoute] = []
        self._responders: dict[int, subprocess.Popen] = {}
        self._up = False
        self._lock = threading.Lock()

    # -- context manager --------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def __repr__(self) -> str:
        via = ", return_via_director=True" if self.return_via_director else ""
        via += ", ipv6=True" if self.ipv6 else ""
        return f"Lab(mode={self.mode!r}, prefix={self.prefix!r}{via}, up={self._up})"

    # -- build ------------------------------------------------------------------------------------

    def up(self) -> Lab:
        """Build the whole topology; on any failure, tear down what was built and re-raise."""
        if self._up:
            return self
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces, veth, iptables, tc)")
        if self.mode == "tun" and not DECAP_OBJ.is_file():
            raise LabError(f"tun mode needs {DECAP_OBJ}: run `make -C ebpf` in the source tree")
        atexit.register(self.down)
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        self._up = True
        return self

    def add_namespace(self, role: str) -> str:
        """Create ``<prefix>-<role>`` with the lab's base settings; ``down()`` removes it."""
        name = self.ns.setdefault(role, f"{self.prefix}-{role}")
        # Never adopt (and later delete) a namespace someone else made. Recorded before the
        # call, so a failure half-way through creating it still gets it removed.
        if os.path.exists(os.path.join(NETNS_DIR, name)):
            raise LabError(f"namespace {name} already exists (another lab with prefix {self.prefix}?)")
        self._created.append(name)
        try:
            IPRoute(netns=name, flags=os.O_CREAT | os.O_EXCL).close()
        except FileExistsError:
            self._created.remove(name)  # lost a race: it is someone else's
            raise LabError(f"namespace {name} already exists") from None
        _write_sysctls(name, {
            "net/ipv4/conf/all/rp_filter": 0,
            "net/ipv4/conf/default/rp_filter": 0,
            # No IPv6 unless asked: no router solicitations or DAD chatter in captures and logs.
            "net/ipv6/conf/all/disable_ipv6": 0 if self.ipv6 else 1,
            "net/ipv6/conf/default/disable_ipv6": 0 if self.ipv6 else 1,
        })  # fmt: skip
        if self.ipv6:  # static addresses usable at once: no DAD, no autoconfiguration, no solicitations
            _write_sysctls(name, {
                "net/ipv6/conf/lo/disable_ipv6": 0,
                **{f"net/ipv6/conf/{dev}/{key}": 0 for dev in ("all", "default")
                   for key in ("accept_dad", "accept_ra", "autoconf", "router_solicitations")},
            })  # fmt: skip
        return name

    def _build(self) -> None:
        for role in self.roles:
            self.add_namespace(role)

        iprs: dict[str, IPRoute] = {}
        try:
            for role in self.roles:
                iprs[role] = IPRoute(netns=self.ns[role], flags=0)
            for ipr in iprs.values():
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            self._wire(iprs)
            self._address(iprs)
            self._route(iprs)
        finally:
            for ipr in iprs.values():
                ipr.close()
        self._tune()
        self.run("nat", ["iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j", "MASQUERADE"])
        if self.mode == "tun":
            self._setup_decap()

    # (role, ifname, bridge in sw) for every leg on a shared segment.
    _PORTS = (
        ("c1", "eth0", "wan"), ("c2", "eth0", "wan"), ("nat", "eth0", "wan"),
        ("director", "eth0", "wan"), ("gw", "eth0", "wan"),
        ("director", "eth1", "lan"), ("gw", "eth1", "lan"),
        ("rs1", "eth0", "lan"), ("rs2", "eth0", "lan"), ("rs3", "eth0", "lan"),
    )  # fmt: skip

    def _wire(self, iprs: dict[str, IPRoute]) -> None:
        sw = iprs["sw"]
        bridges = {}
        for br in ("wan", "lan"):
            sw.link("add", ifname=br, kind="bridge", br_stp_state=0, br_forward_delay=0)
            bridges[br] = sw.link_lookup(ifname=br)[0]
            sw.link("set", index=bridges[br], state="up")
        ports = self._PORTS + ((DIRECTOR2, "eth0", "wan"), (DIRECTOR2, "eth1", "lan")) * (self.directors == 2)
        for role, ifname, br in ports:
            port = f"{role}-{ifname}"
            # Created in sw with the peer born in the node's namespace: the root namespace never
            # holds either end, even for a moment.
            sw.link("add", ifname=port, kind="veth", mtu=_MTU,
                    peer={"ifname": ifname, "net_ns_fd": self.ns[role], "mtu": _MTU})  # fmt: skip
            idx = sw.link_lookup(ifname=port)[0]
            sw.link("set", index=idx, master=bridges[br], state="up")
        # c3 sits on a point-to-point leg behind the NAT.
        iprs["nat"].link("add", ifname="eth1", kind="veth", mtu=_MTU,
                         peer={"ifname": "eth0", "net_ns_fd": self.ns["c3"], "mtu": _MTU})  # fmt: skip
        self._links_up(iprs)

    @staticmethod
    def _links_up(iprs: dict) -> None:
        """Every link but lo up, in every namespace but the switch (its ports came up when bridged)."""
        for role, ipr in iprs.items():
            if role == "sw":
                continue
            for link in ipr.get_links():
                if link.get("ifname") != "lo":
                    ipr.link("set", index=link["index"], state="up")

    def _addresses(self) -> list[tuple[str, str, str, int]]:
        addrs = [
            ("c1", "eth0", self.client_addrs["c1"], 24),
            ("c2", "eth0", self.client_addrs["c2"], 24),
            ("nat", "eth0", self.nat_public, 24),
            ("nat", "eth1", self.nat_inside, 24),
            ("c3", "eth0", self.client_addrs["c3"], 24),
            ("director", "eth0", self.director_wan, 24),
            *([("director", "eth0", self.vip, 32)] if self.directors == 1 else []),  # 2: keepalived's
            ("director", "eth1", self.director_lan, 24),
            ("gw", "eth0", self.gw_wan, 24),
            ("gw", "eth1", self.gw_lan, 24),
        ]
        if self.directors == 2:
            addrs += [(DIRECTOR2, "eth0", self.director2_wan, 24), (DIRECTOR2, "eth1", self.director2_lan, 24)]
        for role, addr in zip(RS_ROLES, self.rs_addrs):
            addrs.append((role, "eth0", addr, 24))
            if self.mode in ("dr", "tun"):
                addrs.append((role, "lo", self.vip, 32))
        if self.ipv6:
            addrs += [
                ("c1", "eth0", self.client_addrs6["c1"], 64), ("c2", "eth0", self.client_addrs6["c2"], 64),
                ("director", "eth0", self.director_wan6, 64), ("director", "eth0", self.vip6, 128),
                ("director", "eth1", self.director_lan6, 64),
                ("gw", "eth0", self.gw_wan6, 64), ("gw", "eth1", self.gw_lan6, 64),
            ]  # fmt: skip
            for role, addr in zip(RS_ROLES, self.rs_addrs6):
                addrs.append((role, "eth0", addr, 64))
                if self.mode in ("dr", "tun"):  # on lo: a real server answers neighbour solicitations
                    addrs.append((role, "lo", self.vip6, 128))  # only for its interface's own addresses
        return addrs

    def _address(self, iprs: dict[str, IPRoute]) -> None:
        for role, ifname, addr, plen in self._addresses():
            ipr = iprs[role]
            ipr.addr("add", index=ipr.link_lookup(ifname=ifname)[0], address=addr, prefixlen=plen,
                     family=socket.AF_INET6 if ":" in addr else socket.AF_INET)

    def _route(self, iprs: dict[str, IPRoute]) -> None:
        iprs["c3"].route("add", dst="0.0.0.0/0", gateway=self.nat_inside)
        gateway = self.gw_lan if self.mode in ("dr", "tun") and not self.return_via_director else self.director_lan
        if self.mode == "nat" and self.directors == 2:
            gateway = self.lan_vip  # held by whichever director is VRRP master
        for role in RS_ROLES:
            iprs[role].route("add", dst="0.0.0.0/0", gateway=gateway)
            if self.ipv6:
                gw6 = self.gw_lan6 if self.mode in ("dr", "tun") else self.director_lan6
                iprs[role].route("add", dst="::/0", gateway=gw6, family=socket.AF_INET6)

    def _tune(self) -> None:
        for role in self.roles:
            name = self.ns[role]
            values: dict[str, int | str] = {}
            if role in ("director", DIRECTOR2, "gw", "nat"):
                values["net/ipv4/ip_forward"] = 1
                if self.ipv6 and role != "nat":
                    values["net/ipv6/conf/all/forwarding"] = 1
            if role == "sw" and os.path.exists("/proc/sys/net/bridge"):
                # br_netfilter is built in: keep the switch a switch (no iptables, no defrag).
                for fam in ("iptables", "ip6tables", "arptables"):
                    values[f"net/bridge/bridge-nf-call-{fam}"] = 0
            if role in RS_ROLES and self.mode in ("dr", "tun"):
                # The VIP lives on lo: never answer ARP for it, never use it as an ARP source.
                for dev in ("all", "eth0"):
                    values[f"net/ipv4/conf/{dev}/arp_ignore"] = 1
                    values[f"net/ipv4/conf/{dev}/arp_announce"] = 2
            for dev in self._devices(role):
                values[f"net/ipv4/conf/{dev}/rp_filter"] = 0
            _write_sysctls(name, values)

    def _devices(self, role: str) -> list[str]:
        with in_netns(self.ns[role]):
            return sorted(d for d in os.listdir("/proc/sys/net/ipv4/conf") if d not in ("all", "default"))

    def _setup_decap(self) -> None:
        for role in RS_ROLES:
            name = self.ns[role]
            with in_netns(name):
                # A persistent TUN device the responder attaches to (--decap): opening
                # /dev/net/tun here makes the device belong to this namespace.
                fd = os.open("/dev/net/tun", os.O_RDWR)
                try:
                    ifr = struct.pack("16sH22x", DECAP_TUN.encode(), _IFF_TUN | _IFF_NO_PI)
                    fcntl.ioctl(fd, _TUNSETIFF, ifr)
                    fcntl.ioctl(fd, _TUNSETPERSIST, 1)
                finally:
                    os.close(fd)
            with IPRoute(netns=name, flags=0) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname=DECAP_TUN)[0], state="up", mtu=65535)
            _write_sysctls(name, {f"net/ipv4/conf/{DECAP_TUN}/rp_filter": 0})
            self.run(role, ["tc", "qdisc", "add", "dev", "eth0", "clsact"])
            self.run(role, ["tc", "filter", "add", "dev", "eth0", "ingress", "bpf", "direct-action",
                            "obj", str(DECAP_OBJ), "sec", DECAP_SECTION])  # fmt: skip

    # -- teardown ---------------------------------------------------------------------------------

    def down(self) -> None:
        """Kill every process the lab started, delete every namespace it made; safe to repeat."""
        # pinned eBPF maps of directors run in this lab (bpffs is not per namespace)
        for pin in Path("/sys/fs/bpf").glob(f"{self.prefix}-*"):
            shutil.rmtree(pin, ignore_errors=True)
        with self._lock:
            errors: list[str] = []
            for sock in self._sockets:
                try:
                    sock.close()
                except OSError:
                    pass
            self._sockets.clear()
            for ipr in self._iprs:
                try:
                    ipr.close()
                except Exception:  # pyroute2 may complain about a closed loop; nothing to undo
                    pass
            self._iprs.clear()

            for proc in self._procs:
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, signal.SIGTERM)
                    except (ProcessLookupError, PermissionError):
                        proc.terminate()
            for proc in self._procs:
                try:
                    proc.wait(timeout=2.0)
                except subprocess.TimeoutExpired:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    try:
                        proc.wait(timeout=2.0)
                    except subprocess.TimeoutExpired:
                        errors.append(f"pid {proc.pid} survived SIGKILL")
                for stream in (proc.stdin, proc.stdout, proc.stderr):
                    if stream:
                        stream.close()
            self._procs.clear()
            self._responders.clear()

            # Anything else still running in our namespaces (a grandchild, a leaked `run`).
            stuck = _kill_and_reap(pids_in_netns(self._created), grace=0.5)
            if stuck:
                errors.append(f"processes would not die: {stuck}")

            for name in list(self._created):
                try:
                    pr_netns.remove(name)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    if e.errno != errno.ENOENT:
                        errors.append(f"remove {name}: {e}")
                        continue
                self._created.remove(name)

            if self.tmpdir is not None:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
                self.tmpdir = None
            self._up = False
            atexit.unregister(self.down)
            if errors:
                raise LabError(f"lab {self.prefix} teardown: " + "; ".join(errors))

    # -- using the lab ----------------------------------------------------------------------------

    def _netns(self, role: str) -> str:
        try:
            return self.ns[role]
        except KeyError:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}") from None

    def _wrap(self, role: str, argv: list[str], nsenter: bool | None) -> list[str]:
        name = self._netns(role)
        if nsenter is None:
            nsenter = os.path.basename(str(argv[0])) in ("tc", "bpftool")
        if nsenter:
            # `ip netns exec` remounts /sys in a private mount namespace: bpffs pins made under it
            # vanish with the command, so tc and bpftool enter only the network namespace.
            return ["nsenter", f"--net={NETNS_DIR}/{name}", "--", *map(str, argv)]
        return ["ip", "netns", "exec", name, *map(str, argv)]

    def run(
        self, role: str, argv: list[str], check: bool = True, *, nsenter: bool | None = None, **kw
    ) -> subprocess.CompletedProcess:
        """Run ``argv`` inside ``role``'s namespace (output captured as text unless overridden).

        ``nsenter`` picks ``nsenter --net=...`` over ``ip netns exec``; by default tc and bpftool
        use nsenter.
        """
        kw.setdefault("capture_output", "stdout" not in kw and "stderr" not in kw)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        proc = subprocess.run(self._wrap(role, argv, nsenter), **kw)
        if check and proc.returncode:
            raise LabCommandError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        return proc

    def popen(self, role: str, argv: list[str], *, nsenter: bool | None = None, **kw) -> subprocess.Popen:
        """Start ``argv`` inside ``role``'s namespace, in its own session; killed at down()."""
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(self._wrap(role, argv, nsenter), **kw)
        self._procs.append(proc)
        return proc

    def socket(self, role: str, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM,
               proto: int = 0) -> socket.socket:  # fmt: skip
        """A socket created inside ``role``'s namespace (closed at down())."""
        with in_netns(self._netns(role)):
            sock = socket.socket(family, type, proto)
        self._sockets.append(sock)
        return sock

    def ipr(self, role: str) -> IPRoute:
        """A pyroute2 IPRoute bound to ``role``'s namespace (closed at down())."""
        ipr = IPRoute(netns=self._netns(role), flags=0)
        self._iprs.append(ipr)
        return ipr

    def sysctl(self, role: str, key: str) -> str:
        """Read one sysctl (path under /proc/sys, e.g. ``net/ipv4/ip_forward``) in ``role``."""
        return read_sysctl(self._netns(role), key)

    def ping(self, role: str, dst: str, timeout: float = 1.0) -> bool:
        """One ICMP echo from ``role`` to ``dst``; True when the matching reply came back."""
        sock = self.socket(role, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        try:
            ident, seq = secrets.randbits(16), 1
            body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"vpn-director-lab"
            csum = ipv4_checksum(body)  # RFC 1071, the same sum ICMP uses (RFC 792)
            sock.sendto(body[:2] + struct.pack("!H", csum) + body[4:], (dst, 0))
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    data, (src, _) = sock.recvfrom(2048)
                except (TimeoutError, socket.timeout):
                    return False
                ihl = (data[0] & 0x0F) * 4
                if len(data) < ihl + 8 or src != dst:
                    continue
                typ, _code, _c, rid, rseq = struct.unpack_from("!BBHHH", data, ihl)
                if typ == 0 and rid == ident and rseq == seq:
                    return True
            return False
        finally:
            sock.close()

    # -- keepalived (two directors) ---------------------------------------------------------------

    def keepalived_conf(self, role: str, *, priority: int, advert_int: float = 0.1) -> str:
        """VRRPv3 between the two directors, unicast on the wan segment: the VIP /32 on eth0 and,
        in NAT mode, the real servers' gateway address on eth1. Both start BACKUP with nopreempt:
        the first master keeps the VIP until it dies, and a director that comes back stays backup."""
        me, peer = ((self.director_wan, self.director2_wan) if role == "director"
                    else (self.director2_wan, self.director_wan))
        lan = f"\n        {self.lan_vip}/32 dev eth1" if self.mode == "nat" else ""
        return f"""global_defs {{
    router_id {self.prefix}-{role}
    vrrp_garp_master_delay 0
    vrrp_garp_master_repeat 3
    vrrp_garp_lower_prio_repeat 0
}}
vrrp_instance VD {{
    state BACKUP
    nopreempt
    version 3
    interface eth0
    virtual_router_id 51
    priority {priority}
    advert_int {advert_int}
    unicast_src_ip {me}
    unicast_peer {{
        {peer}
    }}
    virtual_ipaddress {{
        {self.vip}/32 dev eth0{lan}
    }}
}}
"""

    def start_keepalived(self, role: str, *, priority: int, advert_int: float = 0.1) -> subprocess.Popen:
        """keepalived (VRRP only) in ``role``'s namespace with private config, pid and log files."""
        if self.directors != 2 or role not in ("director", DIRECTOR2):
            raise ValueError("keepalived runs in the directors of a Lab(mode, directors=2)")
        exe = shutil.which("keepalived") or "/usr/sbin/keepalived"
        if not os.path.exists(exe):
            raise LabError("keepalived is not installed (Debian: keepalived)")
        tmp = self._tmp()
        conf = tmp / f"keepalived-{role}.conf"
        conf.write_text(self.keepalived_conf(role, priority=priority, advert_int=advert_int))
        log = open(tmp / f"keepalived-{role}.log", "ab")
        try:
            return self.popen(role, [exe, "--dont-fork", "--log-console", "--log-detail", "--vrrp",
                                     "--use-file", str(conf), "--pid", str(tmp / f"keepalived-{role}.pid"),
                                     "--vrrp_pid", str(tmp / f"keepalived-{role}.vrrp.pid")],
                              stdout=log, stderr=log)
        finally:
            log.close()

    def holds_vip(self, role: str) -> bool:
        out = self.run(role, ["ip", "-o", "-4", "addr", "show", "dev", "eth0"]).stdout
        return f" {self.vip}/32 " in out

    # -- responders -------------------------------------------------------------------------------

    def _tmp(self) -> Path:
        if self.tmpdir is None:
            self.tmpdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        return self.tmpdir

    @property
    def responder_procs(self) -> dict[int, subprocess.Popen]:
        """Running responders by real-server index (0..2)."""
        return dict(self._responders)

    def responder_log(self, i: int) -> Path:
        return self._tmp() / f"responder-{RS_ROLES[i]}.jsonl"

    def start_responders(self, silent: Iterable[int | str] = (), timeout: float = 10.0,
                         only: Iterable[int] | None = None) -> list[subprocess.Popen]:  # fmt: skip
        """Start the IKE responder in every real server (the VIP in dr/tun, the RIP in nat).

        ``silent`` names real servers (index 0..2 or role) that record but never answer. ``only``
        (indexes) restarts just those responders and leaves the others running, so their servers
        never miss a health probe. Returns once every responder started has bound its sockets (its
        log file exists).
        """
        quiet = {RS_ROLES[s] if isinstance(s, int) else s for s in silent}
        unknown = quiet - set(RS_ROLES)
        if unknown:
            raise ValueError(f"silent must name real servers 0..2 or {RS_ROLES}, not {sorted(unknown)}")
        which = set(range(len(RS_ROLES)) if only is None else only)
        self.stop_responders(which)
        started = []
        for i, role in enumerate(RS_ROLES):
            if i not in which:
                continue
            log = self.responder_log(i)
            log.unlink(missing_ok=True)
            Path(str(log) + ".icmp").unlink(missing_ok=True)
            addr = self.vip if self.mode in ("dr", "tun") else self.rs_addrs[i]
            argv = [sys.executable, "-m", "director.lab.responder", "--addr", addr, "--log", str(log)]
            if addr != self.rs_addrs[i]:  # the director's health probes go to the server's own address
                argv += ["--addr", self.rs_addrs[i]]
            if self.ipv6:
                argv += ["--addr", self.rs_addrs6[i]] + (["--addr", self.vip6] if self.mode in ("dr", "tun") else [])
            if self.mode == "tun":
                argv.append("--decap")
            if role in quiet:
                argv.append("--silent")
            errlog = open(self._tmp() / f"responder-{role}.stderr", "wb")
            try:
                proc = self.popen(role, argv, stdout=subprocess.DEVNULL, stderr=errlog, cwd=str(REPO))
            finally:
                errlog.close()
            self._responders[i] = proc
            started.append((i, role, proc, log))
        deadline = time.monotonic() + timeout
        for i, role, proc, log in started:
            while not log.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = (self._tmp() / f"responder-{role}.stderr").read_text(errors="replace")
                    raise LabError(f"responder in {role} did not start (rc={proc.poll()}): {err.strip()}")
                time.sleep(0.01)
        return [p for _, _, p, _ in started]

    def stop_responders(self, which: Iterable[int] | None = None) -> None:
        """Stop running responders (SIGTERM; they exit 0), all or those ``which`` names; their logs
        stay readable."""
        procs = {i: p for i, p in self._responders.items() if which is None or i in which}
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=3.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for i in procs:
            del self._responders[i]

    def received(self, i: int) -> list[dict]:
        """The records responder ``i`` (0..2) has written so far, oldest first."""
        try:
            text = self.responder_log(i).read_text()
        except FileNotFoundError:
            return []
        records = []
        for line in text.splitlines(keepends=True):
            if line.endswith("\n"):  # a half-written last line is not a record yet
                records.append(json.loads(line))
        return records

    def received_icmp(self, i: int) -> list[dict]:
        """The ICMP errors responder ``i`` (0..2) has recorded so far (see director.lab.responder)."""
        try:
            text = Path(str(self.responder_log(i)) + ".icmp").read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]

    def wait_received(self, i: int, predicate: Callable[[dict], bool], timeout: float = 2.0) -> list[dict]:
        """Wait until responder ``i`` recorded a packet matching ``predicate``; returns the matches.

        Raises TimeoutError (with everything it did record) when none arrives in time.
        """
        deadline = time.monotonic() + timeout
        while True:
            records = self.received(i)
            matches = [r for r in records if predicate(r)]
            if matches:
                return matches
            if time.monotonic() > deadline:
                raise TimeoutError(f"{RS_ROLES[i]} recorded no matching packet in {timeout}s; got {records}")
            time.sleep(0.02)

