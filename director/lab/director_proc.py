"""Run the real vpn-director daemon inside a Lab's director namespace (tests and the demo)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from director.control_client import control_request
from director.lab.netns import REPO, Lab, stop_process


def lab_config(lab: Lab, control: Path, *, scheduler: str = "rr", weights=(1, 1, 1),
               init_timeout: float = 30.0, extra_service: str = "", metrics: str = "",
               pin_dir: str = "", daemon_extra: str = "") -> str:
    """A TOML config for the lab: one service on the VIP, the three real servers, the lab's mode;
    in a dual-stack lab (``lab.ipv6``) a second service on the IPv6 VIP with the servers' IPv6
    addresses and the same settings (``extra_service`` included)."""
    def service(vip: str, addrs) -> str:
        servers = "".join(f'\n[[service.server]]\naddress = "{a}"\nweight = {w}\n' for a, w in zip(addrs, weights))
        return f"""
[[service]]
vip = "{vip}"
scheduler = "{scheduler}"
method = "{lab.mode}"
ah = {"false" if lab.mode == "nat" else "true"}
timeouts = {{ init = {init_timeout}, established = 3600 }}
{extra_service}
{servers}"""

    services = service(lab.vip, lab.rs_addrs)
    if getattr(lab, "ipv6", False):
        services += service(lab.vip6, lab.rs_addrs6)
    return f"""
[daemon]
client_interface = "eth0"
server_interface = "eth1"
queue = 0
control_socket = "{control}"
metrics = "{metrics}"
bpf_pin_dir = "{pin_dir or f'/sys/fs/bpf/{lab.prefix}-director'}"
{daemon_extra}
{services}"""


class DirectorProcess:
    """The daemon as a child process in the lab; ``request`` talks to its control socket."""

    def __init__(self, lab: Lab, name: str = "director", *, dataplane: str | None = None,
                 role: str = "director", capabilities: list[str] | None = None, **config_kw) -> None:
        """``dataplane``: auto, ebpf or nfqueue; default $VPN_DIRECTOR_DATAPLANE, else nfqueue.
        ``role``: the lab namespace to run in ("director2": the second director of a failover lab).
        ``capabilities``: run with only these (e.g. ["CAP_BPF", ...]) as the capability bounding set,
        as a systemd unit's CapabilityBoundingSet= would; default: root's full set."""
        self.lab = lab
        self.role = role
        self.capabilities = capabilities
        self.dataplane = dataplane or os.environ.get("VPN_DIRECTOR_DATAPLANE", "nfqueue")
        config_kw.setdefault("pin_dir", f"/sys/fs/bpf/{lab.prefix}-{name}")
        self.pin_dir = Path(config_kw["pin_dir"])
        self.dir = lab._tmp()
        self.control = self.dir / f"{name}.sock"
        self.config_path = self.dir / f"{name}.toml"
        self.config_path.write_text(lab_config(lab, self.control, **config_kw))
        self.log_path = self.dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> "DirectorProcess":
        log = open(self.log_path, "ab")
        try:
            self.proc = self.lab.popen(
                self.role,
                [*self._setpriv(), sys.executable, "-m", "director.main", "run", "--config",
                 str(self.config_path), "--dataplane", self.dataplane],
                stdout=log, stderr=log, cwd=str(REPO),
                nsenter=True,  # `ip netns exec` remounts /sys: the eBPF pins would vanish with the process
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vpn-director exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.request("status")["ok"]:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"vpn-director did not answer on {self.control}:\n{self.log()}")
            time.sleep(0.05)

    def _setpriv(self) -> list[str]:
        if self.capabilities is None:
            return []
        keep = ",".join(["-all", *(f"+{c.lower().removeprefix('cap_')}" for c in self.capabilities)])
        return ["setpriv", f"--bounding-set={keep}", f"--inh-caps={keep}", "--"]

    def request(self, cmd: str, **kw) -> dict:
        return control_request(str(self.control), {"cmd": cmd, **kw})

    def status(self) -> dict:
        return self.request("status")["result"]

    def connections(self) -> list[dict]:
        return self.request("connections")["result"]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return 0
        return stop_process(self.proc, timeout)


def fastpath_line(status: dict) -> str:
    """What the eBPF fast path did, from the daemon's status (empty without a fast path)."""
    fp = status.get("fastpath")
    if fp is None:
        return ""
    return (f"  eBPF fast path: forwarded in the kernel {fp['forwarded'] or 0}, passed up {fp['passed'] or 0}, "
            f"clients in the map {fp['clients']}\n")
