"""Real IPsec peers in the lab: strongSwan's charon as road-warrior clients and as real servers.

The lab does not rely on the kernel's ESP (kernels built without it, as on the machines the lab was
written on, have none), so every charon runs the ``kernel-libipsec`` plugin: ESP is
done in user space over a TUN device and is always UDP-encapsulated (ESP-in-UDP on 4500), also
without a NAT. One charon per network namespace; each gets

- a directory ``<lab tmp>/charon-<name>/`` with ``strongswan.conf`` (``load_modular = no`` and an
  explicit plugin list, 16 threads, a per-instance vici socket ``charon.vici``, logging to
  ``charon.log``), ``swanctl.conf`` and a swanctl directory (``x509ca/``, ``x509/``, ``private/``);
- a private ``/run`` (``unshare -m`` + tmpfs): the pid file ``/var/run/charon.pid`` is compiled in.

The vici socket lives in the lab's temp dir, i.e. on the shared file system: ``swanctl`` runs from
the test process (any namespace) with ``--uri unix://<dir>/charon.vici``.

Topology helpers (``responder_swanctl``, ``client_swanctl``) build configurations where

- real servers own the VIP as the forwarding mode needs: DR/TUN responders answer on the VIP
  198.18.0.100 (it is on their lo), NAT responders on their own address (the director rewrites);
  ``mobike = no`` so a client never learns (and moves to) a real address behind the director;
- every real server hands out virtual IPs from its own pool (``10.77.<rs>.0/24``, rs 1..3) and
  protects ``10.88.0.1/32`` (on its lo: this kernel has no dummy driver), so traffic can be sent
  INSIDE each tunnel: ``ping 10.88.0.1`` from a client namespace goes out through ``ipsec0``.

``add_clients(lab, n)`` adds client namespaces c4, c5, ... on the wan bridge (one charon per
namespace: two would both want UDP 500/4500, the TUN name, routing table 220 and its rule).
``start_decap(lab)`` (TUN mode) replaces the fake responder's ``--decap`` duty: IP-in-IP envelopes
fragmented on the wire (a 5 KB certificate message) are reassembled by the kernel, read from a
raw IPPROTO_IPIP socket and written into the lab's TUN device ``decap0``.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pyroute2 import IPRoute

from director.lab.netns import Lab, LabError, _write_sysctls, stop_process

__all__ = [
    "CHARON", "PROTECTED", "PSK", "SERVER_ID", "Charon", "CharonError", "Peers", "Pki",
    "add_clients", "client_swanctl", "ike_sa_of", "installed_children", "parallel", "pool_of", "rs_of_vip",
    "responder_swanctl", "start_decap", "start_responders", "strongswan_prerequisites",
]  # fmt: skip

CHARON = "/usr/lib/ipsec/charon"
SWANCTL = "swanctl"
PKI = "pki"

PSK = "vpn-director-lab-preshared-key"
SERVER_ID = "vpn.lab"  # every real server's IKE identity (one service, one name)
PROTECTED = "10.88.0.1"  # on every real server's lo: the far end of every tunnel
PSK_DOMAIN = "psk.lab"  # PSK clients are <role>@psk.lab

PLUGINS = (
    "random nonce aes sha1 sha2 hmac kdf gcm pem pkcs1 pkcs8 x509 pubkey constraints gmp "
    "curve25519 openssl kernel-libipsec kernel-netlink socket-default vici"
)
SWANCTL_PLUGINS = "random nonce aes sha1 sha2 hmac pem pkcs1 pkcs8 x509 pubkey gmp openssl"
PKI_PLUGINS = "random nonce sha1 sha2 pem pkcs1 pkcs8 x509 pubkey gmp openssl"

EXTRA_CLIENT_BASE = 20  # c4 -> 198.18.0.24, c5 -> .25, ...


class CharonError(RuntimeError):
    """A charon instance did not start, or a swanctl command against it failed."""


def pool_of(rs: int) -> str:
    """The virtual-IP pool of real server ``rs`` (index 0..2): 10.77.1.0/24 .. 10.77.3.0/24."""
    return f"10.77.{rs + 1}.0/24"


def rs_of_vip(vip: str) -> int | None:
    """The real-server index whose pool holds virtual IP ``vip`` (None if none)."""
    m = re.fullmatch(r"10\.77\.(\d+)\.\d+", vip or "")
    return int(m.group(1)) - 1 if m else None


def strongswan_prerequisites() -> list[str]:
    """What is missing to run charon in the lab, as readable sentences (empty: all present)."""
    missing = []
    if not os.access(CHARON, os.X_OK):
        missing.append(f"{CHARON} (Debian: strongswan-charon)")
    for tool, pkg in ((SWANCTL, "strongswan-swanctl"), (PKI, "strongswan-pki"), ("unshare", "util-linux"),
                      ("ping", "iputils-ping"), ("iperf3", "iperf3")):  # fmt: skip
        if shutil.which(tool) is None:
            missing.append(f"`{tool}` on PATH (Debian: {pkg})")
    plugdir = Path("/usr/lib/ipsec/plugins")
    for plugin, pkg in (("kernel-libipsec", "libcharon-extra-plugins"), ("curve25519", "libstrongswan-extra-plugins"),
                        ("openssl", "libstrongswan-standard-plugins")):  # fmt: skip
        if not (plugdir / f"libstrongswan-{plugin}.so").exists():
            missing.append(f"the charon plugin {plugin} (Debian: {pkg})")
    return missing


def parallel(fns: Iterable[Callable[[], object]]) -> list:
    """Run the callables in threads; their results in order; the first exception is re-raised."""
    fns = list(fns)
    if not fns:
        return []
    with ThreadPoolExecutor(max_workers=len(fns)) as ex:
        futures = [ex.submit(f) for f in fns]
        return [f.result() for f in futures]


# -- a test PKI -----------------------------------------------------------------------------------


class Pki:
    """A test CA made with ``pki``: root (RSA 3072) -> intermediate (RSA 4096) -> leaves (RSA 4096).

    Every peer trusts both CAs and asks for both by CERTREQ, so charon sends only its end-entity
    certificate: a plain RSA-4096 leaf makes a ~3 KB IKE_AUTH. To get the ~5 KB messages of real
    deployments (above NetfilterQueue's 4016-byte copy, and far above the MTU: IP fragments unless
    RFC 7383 IKE fragmentation is on) the leaves carry many subjectAltNames: 100 on a client's
    (IKE_AUTH request 5136 bytes unfragmented), 160 on the server's (response ~4.7 KB). Keys take
    about a second each, so ``Pki.shared()`` makes one PKI per process (removed at exit) and the
    peers get copies of the files.
    """

    _shared: "Pki | None" = None
    _lock = threading.Lock()

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "strongswan.conf"
        self.conf.write_text(f"pki {{\n  load = {PKI_PLUGINS}\n}}\n")

    @classmethod
    def shared(cls) -> "Pki":
        with cls._lock:
            if cls._shared is None:
                d = Path(tempfile.mkdtemp(prefix="vdl-pki-"))
                atexit.register(shutil.rmtree, d, True)
                pki = cls(d)
                pki.make_ca()
                pki.issue("server", SERVER_ID, extra_sans=160)
                cls._shared = pki
            return cls._shared

    def _pki(self, *args: str, stdin: bytes | None = None) -> bytes:
        env = dict(os.environ, STRONGSWAN_CONF=str(self.conf))
        proc = subprocess.run([PKI, *args], input=stdin, capture_output=True, env=env, timeout=120)
        if proc.returncode:
            raise CharonError(f"pki {' '.join(args)} failed: {proc.stderr.decode(errors='replace')}")
        return proc.stdout

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    def cert(self, name: str) -> Path:
        return self.dir / f"{name}.crt"

    def make_ca(self) -> None:
        self.key("root").write_bytes(self._pki("--gen", "--type", "rsa", "--size", "3072", "--outform", "pem"))
        self.cert("root").write_bytes(self._pki(
            "--self", "--ca", "--lifetime", "3650", "--in", str(self.key("root")), "--type", "rsa",
            "--dn", "C=CH, O=vpn-director lab, CN=lab root CA", "--outform", "pem"))  # fmt: skip
        self.key("intermediate").write_bytes(self._pki("--gen", "--type", "rsa", "--size", "4096", "--outform", "pem"))
        pub = self._pki("--pub", "--in", str(self.key("intermediate")), "--type", "rsa")
        self.cert("intermediate").write_bytes(self._pki(
            "--issue", "--ca", "--lifetime", "3650", "--cacert", str(self.cert("root")),
            "--cakey", str(self.key("root")), "--dn", "C=CH, O=vpn-director lab, CN=lab intermediate CA",
            "--outform", "pem", stdin=pub))  # fmt: skip

    def issue(self, name: str, san: str, extra_sans: int = 100) -> tuple[Path, Path]:
        """A leaf ``name`` (id ``san``) signed by the intermediate; returns (cert, key)."""
        self.key(name).write_bytes(self._pki("--gen", "--type", "rsa", "--size", "4096", "--outform", "pem"))
        pub = self._pki("--pub", "--in", str(self.key(name)), "--type", "rsa")
        sans = ["--san", san]
        for k in range(extra_sans):  # a realistic enterprise certificate: many names
            sans += ["--san", f"alias-{k:03d}.{san}"]
        self.cert(name).write_bytes(self._pki(
            "--issue", "--lifetime", "3650", "--cacert", str(self.cert("intermediate")),
            "--cakey", str(self.key("intermediate")), "--dn", f"C=CH, O=vpn-director lab, CN={san}",
            *sans, "--flag", "serverAuth", "--flag", "clientAuth", "--outform", "pem", stdin=pub))  # fmt: skip
        return self.cert(name), self.key(name)

    def leaf(self, name: str, san: str) -> tuple[Path, Path]:
        """``issue`` once per process (cached by name)."""
        with self._lock:
            if not self.cert(name).exists():
                self.issue(name, san)
            return self.cert(name), self.key(name)

    def files_for(self, leaf: str) -> dict[str, bytes]:
        """swanctl-directory files for a peer whose own certificate is ``leaf``."""
        return {
            "x509ca/root.crt": self.cert("root").read_bytes(),
            "x509ca/intermediate.crt": self.cert("intermediate").read_bytes(),
            f"x509/{leaf}.crt": self.cert(leaf).read_bytes(),
            f"private/{leaf}.key": self.key(leaf).read_bytes(),
        }


# -- one charon -----------------------------------------------------------------------------------


class Charon:
    """One charon daemon inside lab namespace ``role``, configured from ``swanctl`` text.

    ``files`` are extra files for the swanctl directory (``x509/c.crt``, ``private/c.key``, ...).
    ``retransmit`` is (timeout, base, tries): short on clients so DPD and a dead server are
    noticed in seconds. ``options`` are extra ``charon { ... }`` settings (strongswan.conf syntax).
    """

    def __init__(
        self,
        lab: Lab,
        role: str,
        swanctl: str,
        *,
        name: str | None = None,
        files: dict[str, bytes] | None = None,
        retransmit: tuple[float, float, int] = (0.5, 1.2, 4),
        port: int = 500,
        port_nat_t: int = 4500,
        log_levels: str = "default = 1\n      ike = 2\n      net = 1\n      enc = 1\n      cfg = 1",
        options: str = "",
    ) -> None:
        self.lab = lab
        self.role = role
        self.name = name or role
        self.dir = lab._tmp() / f"charon-{self.name}"
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        for sub in ("x509ca", "x509", "private", "pubkey", "x509crl", "x509aa", "x509ac", "x509ocsp",
                    "rsa", "ecdsa", "bliss", "pkcs8", "pkcs12"):  # fmt: skip
            (self.dir / "swanctl" / sub).mkdir(parents=True, exist_ok=True)
        for rel, data in (files or {}).items():
            p = self.dir / "swanctl" / rel
            p.write_bytes(data)
            if rel.startswith("private/"):
                p.chmod(0o600)
        self.conf = self.dir / "strongswan.conf"
        self.swanctl_conf = self.dir / "swanctl" / "swanctl.conf"
        self.vici = self.dir / "charon.vici"
        self.log_path = self.dir / "charon.log"
        self.stderr_path = self.dir / "charon.stderr"
        timeout, base, tries = retransmit
        self.conf.write_text(f"""\
charon {{
  load_modular = no
  load = {PLUGINS}
  threads = 16
  port = {port}
  port_nat_t = {port_nat_t}
  retransmit_timeout = {timeout}
  retransmit_base = {base}
  retransmit_tries = {tries}
  install_virtual_ip = yes
  install_routes = yes
{options}
  plugins {{
    vici {{
      socket = unix://{self.vici}
    }}
  }}
  filelog {{
    lab {{
      path = {self.log_path}
      time_format = %H:%M:%S
      time_add_ms = yes
      ike_name = yes
      append = yes
      flush_line = yes
      {log_levels}
    }}
  }}
  syslog {{
    daemon {{
      default = -1
    }}
  }}
}}
swanctl {{
  load = {SWANCTL_PLUGINS}
}}
""")
        self.swanctl_conf.write_text(swanctl)
        self.proc: subprocess.Popen | None = None
        self.conn: str | None = None  # set by the helpers: the connection (= child) to initiate
        self.ike_id: str | None = None  # set by the helpers: this peer's IKE identity
        self.family = 4  # set by Peers.client: 6 for a client of the IPv6 VIP

    def __repr__(self) -> str:
        return f"Charon({self.name!r} in {self.role}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- life cycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0, *, wait: bool = True) -> "Charon":
        """Start charon in the namespace with a private /run; with ``wait``, until vici answers."""
        if self.running:
            return self
        self.vici.unlink(missing_ok=True)
        err = open(self.stderr_path, "ab")
        script = f"mount -t tmpfs tmpfs /run && STRONGSWAN_CONF={self.conf} exec {CHARON}"
        try:
            # `ip netns exec` already made a mount namespace with / rslave; `unshare -m` makes
            # another (private) one, so this tmpfs /run is charon's alone.
            self.proc = self.lab.popen(self.role, ["unshare", "-m", "sh", "-c", script],
                                       stdin=subprocess.DEVNULL, stdout=err, stderr=err)  # fmt: skip
        finally:
            err.close()
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise CharonError(f"charon {self.name} exited (rc={self.proc and self.proc.returncode}):\n"
                                  f"{self.stderr()}{self.log()[-3000:]}")  # fmt: skip
            if self.vici.exists():
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(str(self.vici))
                    return
                except OSError:
                    pass
                finally:
                    s.close()
            if time.monotonic() > deadline:
                raise CharonError(f"charon {self.name}: vici socket {self.vici} not ready after {timeout}s:\n"
                                  f"{self.log()[-3000:]}")  # fmt: skip
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM by pid (charon deletes its SAs and exits) and wait; SIGKILL if it hangs."""
        if self.proc is None:
            return None
        rc = stop_process(self.proc, timeout)
        self._wait_tun_gone()
        return rc

    def kill(self) -> None:
        """SIGKILL: a crash (no DELETE sent); the TUN device and the private /run go with it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self._wait_tun_gone()

    def _wait_tun_gone(self, timeout: float = 3.0) -> None:
        """charon's TUN devices (ipsec0...) vanish with its last fd; make sure before a restart."""
        deadline = time.monotonic() + timeout
        while self.tun_devices() and time.monotonic() < deadline:
            time.sleep(0.02)

    def tun_devices(self) -> list[str]:
        out = self.lab.run(self.role, ["ip", "-o", "link", "show", "type", "tun"], check=False).stdout
        return [m.group(1) for m in re.finditer(r"^\d+: (ipsec\d+)[:@]", out, re.M)]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- swanctl ----------------------------------------------------------------------------------

    def swanctl(self, *args: str, timeout: float = 30.0, check: bool = True) -> str:
        """``swanctl <command> ... --uri unix://<vici>`` (the URI after the command); stdout."""
        env = dict(os.environ, STRONGSWAN_CONF=str(self.conf))
        argv = [SWANCTL, *args, "--uri", f"unix://{self.vici}"]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise CharonError(f"{self.name}: {' '.join(argv)} timed out after {timeout}s") from e
        if check and proc.returncode:
            raise CharonError(f"{self.name}: {' '.join(args)} failed (rc={proc.returncode}):\n"
                              f"{proc.stdout}{proc.stderr}\n--- charon.log tail ---\n{self.log()[-4000:]}")  # fmt: skip
        return proc.stdout

    def load(self) -> str:
        """``swanctl --load-all --file <dir>/swanctl/swanctl.conf``: connections, secrets, pools, certs."""
        return self.swanctl("--load-all", "--noprompt", "--file", str(self.swanctl_conf))

    def initiate(self, child: str, ike: str | None = None, timeout: float = 20.0) -> str:
        args = ["--initiate", "--child", child, "--timeout", str(int(max(1, timeout)))]
        if ike:
            args += ["--ike", ike]
        return self.swanctl(*args, timeout=timeout + 5)

    def terminate(self, ike: str | None = None, *, child: str | None = None, timeout: float = 10.0) -> str:
        args = ["--terminate", "--timeout", str(int(max(1, timeout)))]
        if ike:
            args += ["--ike", ike]
        if child:
            args += ["--child", child]
        return self.swanctl(*args, timeout=timeout + 5)

    def rekey(self, *, ike: str | None = None, child: str | None = None, ike_id: str | int | None = None,
              child_id: str | int | None = None, reauth: bool = False) -> str:  # fmt: skip
        """``swanctl --rekey`` by name or unique id: queues the rekey (returns before it completed;
        poll list_sas)."""
        args = ["--rekey"]
        if ike:
            args += ["--ike", ike]
        if child:
            args += ["--child", child]
        if ike_id is not None:
            args += ["--ike-id", str(ike_id)]
        if child_id is not None:
            args += ["--child-id", str(child_id)]
        if reauth:
            args.append("--reauth")
        return self.swanctl(*args)

    def list_sas(self) -> dict[str, list[dict]]:
        """IKE SAs by connection name (a list: a connection may have several), parsed from
        ``swanctl --list-sas --pretty``. Every SA is a dict of vici keys (``state``, ``local-host``,
        ``remote-host``, ``initiator-spi``, ``responder-spi``, ``remote-vips``, ...) with its
        ``child-sas`` as a dict by CHILD_SA name (``<child>-<unique id>``).

        Never with ``--noblock``: charon's enumerator then SKIPS an IKE SA that a worker has
        checked out at that moment (a DPD, a rekey, any message being processed), so an SA that
        exists would be missing from the list now and then (docs/lab.md)."""
        out = self.swanctl("--list-sas", "--pretty")
        sas: dict[str, list[dict]] = {}
        for event in parse_pretty(out):
            for conn, sa in event.items():
                if isinstance(sa, dict):
                    sas.setdefault(conn, []).append(sa)
        return sas

    def established(self, conn: str | None = None) -> list[dict]:
        """ESTABLISHED IKE SAs (of ``conn``) with at least one INSTALLED CHILD_SA, newest first.

        Newest = highest unique id: after an IKEv1 rekey (a new main mode) the old ISAKMP SA may
        stay listed for a while (REKEYING on the side that started it, ESTABLISHED on the other).
        """
        result = []
        for name, sas in self.list_sas().items():
            if conn is not None and name != conn:
                continue
            for sa in sas:
                if sa.get("state") == "ESTABLISHED" and installed_children(sa):
                    result.append(sa)
        return sorted(result, key=lambda sa: -int(sa.get("uniqueid", 0)))

    def wait_established(self, conn: str | None = None, timeout: float = 20.0,
                         pred: Callable[[dict], bool] | None = None) -> dict:  # fmt: skip
        """Wait for an ESTABLISHED IKE SA with an INSTALLED CHILD_SA (matching ``pred``); the newest."""
        deadline = time.monotonic() + timeout
        while True:
            for sa in self.established(conn):
                if pred is None or pred(sa):
                    return sa
            if time.monotonic() > deadline:
                which = f" for {conn}" if conn else ""
                raise CharonError(f"{self.name}: no established SA{which} after {timeout}s: {self.list_sas()}\n"
                                  f"--- charon.log tail ---\n{self.log()[-5000:]}")  # fmt: skip
            time.sleep(0.1)

    def virtual_ip(self, conn: str | None = None) -> str | None:
        sas = self.established(conn)
        if not sas:
            return None
        vips = sas[0].get("local-vips") or []
        return vips[0] if vips else None


def installed_children(sa: dict) -> list[dict]:
    """The INSTALLED CHILD_SAs of one IKE SA (a rekeyed IKEv1 CHILD_SA stays listed as REKEYED)."""
    return [c for c in (sa.get("child-sas") or {}).values() if isinstance(c, dict) and c.get("state") == "INSTALLED"]


def sa_key(sa: dict) -> tuple:
    """What identifies an IKE SA and its installed CHILD_SAs (unchanged = nobody touched it)."""
    children = sorted((c["spi-in"], c["spi-out"]) for c in installed_children(sa))
    return sa["initiator-spi"], sa["responder-spi"], tuple(children)


def lost_echoes(out: str) -> tuple[int, list[int]]:
    """(echoes sent, sequence numbers never answered) from ``ping``'s output; the last echo may
    still have been on its way when ping was stopped, so it is not counted."""
    m = re.search(r"(\d+) packets transmitted", out)
    sent = int(m.group(1)) if m else 0
    got = {int(n) for n in re.findall(r"icmp_seq=(\d+) ", out)}
    return sent, sorted(set(range(1, sent)) - got)


def parse_pretty(text: str) -> list[dict]:
    """Parse ``swanctl --pretty`` output (``name {``, ``key = value``, ``key [`` ... ``]``)."""
    events: list[dict] = []
    stack: list[dict] = []
    current_list: list | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if current_list is not None:
            if line == "]":
                current_list = None
            else:
                current_list.append(line)
            continue
        if line.endswith("{"):
            name = line[:-1].strip()
            node: dict = {}
            if not stack:
                events.append(node)  # "list-sa event {" / "<name> reply {"
            else:
                stack[-1][name] = node
            stack.append(node)
        elif line == "}":
            if stack:
                stack.pop()
        elif line.endswith("[") and stack:
            current_list = []
            stack[-1][line[:-1].strip().rstrip("=").strip()] = current_list
        elif " = " in line and stack:
            k, v = line.split(" = ", 1)
            stack[-1][k.strip()] = v
    return events


# -- configurations -------------------------------------------------------------------------------


def responder_swanctl(lab: Lab, rs: int, *, pki: Pki | None = None, dpd_delay: str = "0s",
                      ike_proposals: str = "default") -> str:  # fmt: skip
    """A real server's swanctl.conf: IKEv2 PSK (``psk``), IKEv1 main mode PSK (``psk1``) and, with
    ``pki``, IKEv2 certificates (``cert``); local address = VIP (dr/tun) or its own (nat)."""
    local = lab.vip if lab.mode in ("dr", "tun") else lab.rs_addrs[rs]
    if getattr(lab, "ipv6", False):  # a dual-stack lab: the IPv6 VIP (dr) or address (nat) too
        local += ", " + (lab.vip6 if lab.mode in ("dr", "tun") else lab.rs_addrs6[rs])
    common = f"""\
    local_addrs = {local}
    pools = rs
    mobike = no
    unique = replace
    dpd_delay = {dpd_delay}
    proposals = {ike_proposals}
"""
    child = f"""\
        local_ts = {PROTECTED}/32
        esp_proposals = aes128gcm16,aes128-sha256,default
"""
    conns = f"""\
  psk {{
    version = 2
{common}    local {{
      auth = psk
      id = {SERVER_ID}
    }}
    remote {{
      auth = psk
      id = *@{PSK_DOMAIN}
    }}
    children {{
      psk {{
{child}      }}
    }}
  }}
  psk1 {{
    version = 1
{common}    local {{
      auth = psk
      id = {SERVER_ID}
    }}
    remote {{
      auth = psk
      id = *@{PSK_DOMAIN}
    }}
    children {{
      psk1 {{
{child}      }}
    }}
  }}
"""
    if pki is not None:
        conns += f"""\
  cert {{
    version = 2
{common}    local {{
      auth = pubkey
      certs = server.crt
      id = {SERVER_ID}
    }}
    remote {{
      auth = pubkey
      id = %any
    }}
    children {{
      cert {{
{child}      }}
    }}
  }}
"""
    return f"""\
connections {{
{conns}}}
pools {{
  rs {{
    addrs = {pool_of(rs)}
  }}
}}
secrets {{
  ike-lab {{
    secret = "{PSK}"
  }}
}}
"""


def client_swanctl(
    lab: Lab,
    role: str,
    *,
    kind: str = "psk",
    fragmentation: str = "yes",
    dpd_delay: str = "1s",
    cert: str | None = None,
    ike_proposals: str = "default",
    family: int = 4,
) -> str:
    """A road warrior toward the VIP (``family`` 6: the lab's IPv6 VIP, over IPv6; the tunnel's
    inner addresses stay IPv4): ``kind`` psk (IKEv2), psk1 (IKEv1 main mode) or cert (IKEv2
    with certificate ``cert``, see Pki.files_for). Conn and child are both named ``kind``.

    A virtual IP from the real server's pool, remote TS = PROTECTED; DPD every ``dpd_delay`` with
    ``dpd_action = restart`` and ``close_action = start``, ``keyingtries = 0``: the client keeps
    trying until it is back (what a real road warrior does after its server died).
    """
    version = 1 if kind == "psk1" else 2
    if kind in ("psk", "psk1"):
        local = f"      auth = psk\n      id = {role}@{PSK_DOMAIN}\n"
        remote = f"      auth = psk\n      id = {SERVER_ID}\n"
        secrets = f'secrets {{\n  ike-lab {{\n    secret = "{PSK}"\n  }}\n}}\n'
    elif kind == "cert":
        if not cert:
            raise ValueError("kind cert needs cert=<leaf name>")
        local = f"      auth = pubkey\n      certs = {cert}.crt\n      id = {cert_id(cert)}\n"
        remote = f"      auth = pubkey\n      id = {SERVER_ID}\n"
        secrets = ""
    else:
        raise ValueError(f"kind must be psk, psk1 or cert, not {kind!r}")
    extra = "    aggressive = no\n" if version == 1 else ""
    return f"""\
connections {{
  {kind} {{
    version = {version}
    remote_addrs = {lab.vip6 if family == 6 else lab.vip}
    vips = 0.0.0.0
    proposals = {ike_proposals}
    fragmentation = {fragmentation}
    dpd_delay = {dpd_delay}
    keyingtries = 0
{extra}    local {{
{local}    }}
    remote {{
{remote}    }}
    children {{
      {kind} {{
        remote_ts = {PROTECTED}/32
        esp_proposals = aes128gcm16,aes128-sha256,default
        dpd_action = restart
        close_action = start
      }}
    }}
  }}
}}
{secrets}"""


def cert_id(leaf: str) -> str:
    return f"{leaf}.cert.lab"


# -- lab pieces -----------------------------------------------------------------------------------


def add_clients(lab: Lab, n: int) -> list[str]:
    """Add ``n`` client namespaces c4, c5, ... on the wan bridge (198.18.0.24, .25, ...).

    They are registered with the lab (``lab.ns``, ``lab.client_addrs``) so ``lab.run/popen/socket``
    work there and ``lab.down()`` kills their processes and removes them. (``python -m director.lab
    down`` after a crash only knows the fixed roles: it would leave these behind.)
    """
    roles = []
    existing = [int(r[1:]) for r in lab.ns if re.fullmatch(r"c\d+", r)]
    first = max(existing + [3]) + 1
    for k in range(first, first + n):
        role = f"c{k}"
        name = f"{lab.prefix}-{role}"
        addr = f"198.18.0.{EXTRA_CLIENT_BASE + k}"
        lab.add_namespace(role)
        with IPRoute(netns=lab.ns["sw"], flags=0) as sw:
            wan = sw.link_lookup(ifname="wan")[0]
            sw.link("add", ifname=f"{role}-eth0", kind="veth", mtu=1500,
                    peer={"ifname": "eth0", "net_ns_fd": name, "mtu": 1500})  # fmt: skip
            idx = sw.link_lookup(ifname=f"{role}-eth0")[0]
            sw.link("set", index=idx, master=wan, state="up")
        with IPRoute(netns=name, flags=0) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            eth0 = ipr.link_lookup(ifname="eth0")[0]
            ipr.link("set", index=eth0, state="up")
            ipr.addr("add", index=eth0, address=addr, prefixlen=24)
        _write_sysctls(name, {"net/ipv4/conf/eth0/rp_filter": 0, "net/ipv4/conf/lo/rp_filter": 0})
        lab.client_addrs[role] = addr
        roles.append(role)
    return roles


def add_protected(lab: Lab) -> None:
    """PROTECTED/32 on every real server's lo: the inner destination of every tunnel."""
    for role in lab.rs_roles:
        lab.run(role, ["ip", "addr", "add", f"{PROTECTED}/32", "dev", "lo"])


# Inline (python -c): no project imports, so it is reading within a few ms. argv[1] is the ready
# file, created once the raw socket is open and decap0 attached.
_DECAP_SCRIPT = """
import fcntl, os, select, signal, socket, struct, sys
tun = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(tun, 0x400454CA, struct.pack("16sH22x", b"decap0", 0x0001 | 0x1000))
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, 4)
socks = [sock]
try:  # ip6ip6 (RFC 2473): an IPv6 raw socket gets the inner packet itself
    socks.append(socket.socket(socket.AF_INET6, socket.SOCK_RAW, 41))
except OSError:
    pass
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
open(sys.argv[1], "w").close()
while True:
    for s in select.select(socks, [], [])[0]:
        data = s.recv(65535)
        if s is sock:
            ihl = (data[0] & 0x0F) * 4
            inner = data[ihl:] if len(data) >= ihl + 20 and data[ihl] >> 4 == 4 else b""
        else:
            inner = data if len(data) >= 40 and data[0] >> 4 == 6 else b""
        if inner:
            try:
                os.write(tun, inner)
            except OSError:
                pass
"""


def start_decap(lab: Lab, timeout: float = 5.0) -> list[subprocess.Popen]:
    """TUN mode: a decapsulator per real server for fragmented IP-in-IP envelopes (see module doc).

    Returns once every one has its raw socket open: an envelope arriving earlier would be lost
    (seen: the first 5 KB certificate IKE_AUTH of a run retransmitted after 0.5 s).
    """
    procs = []
    for role in lab.rs_roles:
        ready = lab._tmp() / f"decap-{role}.ready"
        ready.unlink(missing_ok=True)
        p = lab.popen(role, [sys.executable, "-c", _DECAP_SCRIPT, str(ready)],
                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)  # fmt: skip
        procs.append((role, p, ready))
    deadline = time.monotonic() + timeout
    for role, p, ready in procs:
        while not ready.exists():
            if p.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"decapsulator in {role} did not start (rc={p.poll()})")
            time.sleep(0.01)
    return [p for _, p, _ in procs]


def start_responders(lab: Lab, *, pki: Pki | None = None, options: str | Callable[[int], str] = "",
                     ike_proposals: str = "default") -> list[Charon]:  # fmt: skip
    """Real servers: PROTECTED on lo, TUN-mode decapsulators, one loaded charon per rs (parallel).

    ``options``: extra charon settings (e.g. ``cookie_threshold = 1``), or a function of the real
    server's index giving each its own (e.g. its SPI label); ``ike_proposals``: theirs.
    """
    add_protected(lab)
    if lab.mode == "tun":
        start_decap(lab)
    servers = []
    for i, role in enumerate(lab.rs_roles):
        files = pki.files_for("server") if pki else {}
        conf = responder_swanctl(lab, i, pki=pki, ike_proposals=ike_proposals)
        servers.append(Charon(lab, role, conf, files=files, options=options(i) if callable(options) else options))
    for s in servers:
        s.start(wait=False)
    parallel([lambda s=s: (s.wait_ready(), s.load()) for s in servers])
    return servers


def ike_sa_of(server: Charon, ike_id: str) -> dict | None:
    """The ESTABLISHED IKE SA on ``server`` whose remote identity is ``ike_id`` (with an INSTALLED
    CHILD_SA); the newest if several."""
    found = [sa for sa in server.established() if sa.get("remote-id") == ike_id]
    return max(found, key=lambda sa: int(sa.get("uniqueid", 0))) if found else None


class Peers:
    """The real IPsec peers of one lab: three responders (``servers[i]`` in rs<i+1>) and clients.

    ``stop()`` stops clients first, then servers (else the servers' DELETEs make clients
    re-initiate during shutdown); ``lab.down()`` kills whatever is left anyway.
    """

    def __init__(self, lab: Lab, *, pki: Pki | None = None) -> None:
        self.lab = lab
        self.pki = pki
        self.servers: list[Charon] = []
        self.clients: dict[str, Charon] = {}

    def start_servers(self, **kw) -> list[Charon]:
        """See ``start_responders`` for ``options`` and ``ike_proposals``."""
        self.servers = start_responders(self.lab, pki=self.pki, **kw)
        return self.servers

    def client(self, role: str, kind: str = "psk", *, cert: str | None = None, fragmentation: str = "yes",
               dpd_delay: str = "1s", ike_proposals: str = "default", options: str = "",
               family: int = 4) -> Charon:  # fmt: skip
        """A (not yet started) road warrior in ``role``: see ``client_swanctl``; ``options`` are
        extra charon settings; ``family`` 6 connects to the IPv6 VIP of a dual-stack lab."""
        if role not in self.lab.ns:
            raise ValueError(f"no namespace for {role} (add_clients first)")
        files = {}
        if kind == "cert":
            if self.pki is None or cert is None:
                raise ValueError("a certificate client needs Peers(pki=...) and cert=<leaf>")
            self.pki.leaf(cert, cert_id(cert))
            files = self.pki.files_for(cert)
        conf = client_swanctl(self.lab, role, kind=kind, cert=cert, fragmentation=fragmentation,
                              dpd_delay=dpd_delay, ike_proposals=ike_proposals, family=family)  # fmt: skip
        c = Charon(self.lab, role, conf, files=files, options=options)
        c.conn = kind
        c.family = family
        c.ike_id = cert_id(cert) if kind == "cert" else f"{role}@{PSK_DOMAIN}"
        self.clients[role] = c
        return c

    def start_clients(self, clients: Iterable[Charon] | None = None) -> None:
        """Start and load clients (all by default) in parallel."""
        clients = list(self.clients.values() if clients is None else clients)
        for c in clients:
            c.start(wait=False)
        parallel([lambda c=c: (c.wait_ready(), c.load()) for c in clients])

    def connect(self, clients: Iterable[Charon] | None = None, timeout: float = 20.0) -> list[dict]:
        """Initiate (in parallel) and wait for ESTABLISHED + INSTALLED; the clients' IKE SAs."""
        clients = list(self.clients.values() if clients is None else clients)

        def one(c: Charon) -> dict:
            c.initiate(c.conn, timeout=timeout)
            return c.wait_established(c.conn, timeout=timeout)

        return parallel([lambda c=c: one(c) for c in clients])

    def stop(self) -> None:
        """Clients first, then servers; each group in parallel. Every one is tried; the first
        error (if any) is raised at the end."""
        errors: list[BaseException] = []

        def safe(fn: Callable[[], object]) -> Callable[[], None]:
            def run() -> None:
                try:
                    fn()
                except Exception as e:  # keep stopping the others
                    errors.append(e)
            return run

        parallel([safe(c.stop) for c in self.clients.values()])
        parallel([safe(s.stop) for s in self.servers])
        if errors:
            raise errors[0]

    # -- where is who -------------------------------------------------------------------------------

    def seen_as(self, role: str) -> str:
        """The client's address as the director sees it (c3 is behind the masquerading NAT)."""
        if getattr(self.clients.get(role), "family", 4) == 6:
            return self.lab.client_addrs6[role]
        return self.lab.nat_public if role == "c3" else self.lab.client_addrs[role]

    def server_of(self, role: str) -> int | None:
        """Index of the real server that has an established SA with this client (None: none)."""
        c = self.clients[role]
        for i, s in enumerate(self.servers):
            if s.running and ike_sa_of(s, c.ike_id) is not None:
                return i
        return None

    # -- traffic inside the tunnels -----------------------------------------------------------------

    def ping(self, role: str, count: int = 3, interval: float = 0.2, wait: float = 1.0) -> tuple[int, int]:
        """``ping`` PROTECTED from the client's virtual IP: (sent, received)."""
        vip = self.clients[role].virtual_ip(self.clients[role].conn)
        if vip is None:
            return count, 0
        out = self.lab.run(role, ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", str(wait),
                                  "-I", vip, PROTECTED], check=False).stdout  # fmt: skip
        m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        return (int(m.group(1)), int(m.group(2))) if m else (count, 0)

    def iperf(self, role: str, seconds: float = 2.0, port: int = 5201) -> dict:
        """A short TCP iperf3 run inside the client's tunnel to PROTECTED on its real server.

        Returns the ``end`` section of iperf3's JSON (``sum_received.bits_per_second``, ...).
        """
        rs = self.server_of(role)
        if rs is None:
            raise CharonError(f"{role} has no real server to run iperf3 against")
        rs_role = self.lab.rs_roles[rs]
        vip = self.clients[role].virtual_ip(self.clients[role].conn)
        quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        server = self.lab.popen(rs_role, ["iperf3", "-s", "-1", "-B", PROTECTED, "-p", str(port)], **quiet)
        try:
            deadline = time.monotonic() + 5.0
            while f"{PROTECTED}:{port}" not in self.lab.run(rs_role, ["ss", "-ltnH"]).stdout:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise CharonError(f"iperf3 server in {rs_role} did not listen (rc={server.poll()})")
                time.sleep(0.02)
            proc = self.lab.run(role, ["iperf3", "-c", PROTECTED, "-B", vip, "-p", str(port), "-t", str(seconds),
                                       "-J"], check=False, timeout=seconds + 20)  # fmt: skip
            try:
                result = json.loads(proc.stdout)
            except ValueError:
                raise CharonError(f"iperf3 in {role}: rc={proc.returncode} {proc.stdout} {proc.stderr}") from None
            if "error" in result:
                raise CharonError(f"iperf3 in {role}: {result['error']}")
            return result["end"]
        finally:
            if server.poll() is None:
                server.terminate()
            try:
                server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                server.kill()
