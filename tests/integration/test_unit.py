"""The shipped systemd unit, applied the way systemd applies it, runs the fast path from a built wheel.

systemd is not PID 1 on the machines this suite runs on (``ps -p 1`` names another init), so there
is no service manager to hand deploy/vpn-director.service to. This test reads the unit file and
applies its settings itself:

- ExecStartPre=, ExecStart=, ExecReload= (one accepted, one refused reload) as written ("+" lines without the sandbox, the others
  inside it), with TimeoutStartSec= / TimeoutStopSec= as the bounds of start and stop;
- Type=notify: a notify socket in $NOTIFY_SOCKET that must receive READY=1, RELOADING=1 then
  READY=1 around the reload, and STOPPING=1;
- User=, CapabilityBoundingSet=, AmbientCapabilities=, NoNewPrivileges= with setpriv, and the
  filesystem and kernel protections in a private mount namespace (unit_sandbox.py says how each
  one is done), ProtectHostname= with a private UTS namespace, UMask=, Environment=,
  MemoryDenyWriteExecute= with prctl(PR_SET_MDWE).

Not applied: the settings systemd enforces with seccomp filters (RestrictAddressFamilies=,
RestrictNamespaces=, RestrictRealtime=, RestrictSUIDSGID=, LockPersonality=,
SystemCallArchitectures=, ProtectClock=) and the restart policy; ``systemd-analyze verify``
checks their syntax. A [Service] key the test neither applies nor lists as not applied fails it,
so a new setting in the unit cannot go unnoticed.

The unit's own paths move under a scratch root R = /run/<lab prefix>-unit (/opt/vpn-director ->
R/opt/vpn-director, /etc/vpn-director -> R/etc/vpn-director, /run/vpn-director ->
R/run/vpn-director) and its pin directory to /sys/fs/bpf/<lab prefix>-unit, so the machine's own
directories are never touched. R is not under /tmp: PrivateTmp= hides /tmp from the daemon. The
package is a wheel built from this repository (pip wheel, pip's cache reused), installed into a
new virtualenv at R/opt/vpn-director/.venv made with Debian's /usr/bin/python3, as
docs/operations.md says (a Python under /root or /home, such as pyenv's, would be hidden by
ProtectHome=): no source tree on the daemon's path. The sandbox helper runs on that Python too.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from test_fastpath import assert_esp_stays_in_the_kernel

from director.control_client import control_request
from director.lab.director_proc import lab_config
from director.lab.netns import REPO

UNIT = REPO / "deploy" / "vpn-director.service"
SANDBOX = Path(__file__).with_name("unit_sandbox.py")
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's python3 (+ python3-venv), outside ProtectHome='s reach
APPLIED = {
    "Type", "ExecStartPre", "ExecStart", "ExecReload", "TimeoutStartSec", "TimeoutStopSec", "Environment",
    "User", "CapabilityBoundingSet", "AmbientCapabilities", "NoNewPrivileges", "ProtectSystem",
    "RuntimeDirectory", "RuntimeDirectoryMode", "ReadWritePaths", "ProtectHome", "PrivateTmp", "UMask",
    "ProtectKernelModules", "ProtectKernelTunables", "ProtectKernelLogs", "ProtectControlGroups",
    "PrivateDevices", "MemoryDenyWriteExecute", "ProtectHostname",
}
NOT_APPLIED = {
    "Restart", "RestartSec", "RestartPreventExitStatus",  # supervision: systemd's own
    "RestrictAddressFamilies", "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID",  # seccomp
    "LockPersonality", "SystemCallArchitectures", "ProtectClock",  # seccomp
}
UNIT_DIRS = ("/opt/vpn-director", "/etc/vpn-director", "/run/vpn-director", "/sys/fs/bpf/vpn-director")
CAP_BITS = {"CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd's syntax: [Section], Key=value, repeated keys accumulate, an empty value resets,
    '#'/';' comments, trailing-backslash continuations."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = (pending + " " + raw.strip()).strip() if pending else raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1].strip()
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"{UNIT.name}: cannot parse {line!r}"
        key, _, value = line.partition("=")
        values = current.setdefault(key.strip(), [])
        if value.strip():
            values.append(value.strip())
        else:
            values.clear()
    return sections


def one(svc: dict[str, list[str]], key: str, default: str = "") -> str:
    values = svc.get(key, [])
    assert len(values) <= 1, f"{key}= given {len(values)} times"
    return values[0] if values else default


def words(svc: dict[str, list[str]], key: str) -> list[str]:
    return [w for v in svc.get(key, []) for w in v.split()]


def yes(svc: dict[str, list[str]], key: str) -> bool:
    return one(svc, key, "no").lower() in ("yes", "true", "1", "on")


class Mapper:
    """The unit's directories moved under a scratch root (and its pin directory to the lab's)."""

    def __init__(self, root: Path, pin_dir: str) -> None:
        self.table = {d: str(root) + d for d in UNIT_DIRS}
        self.table["/sys/fs/bpf/vpn-director"] = pin_dir
        alt = "|".join(re.escape(d) for d in UNIT_DIRS)
        self.pattern = re.compile(rf"(?<![\w./-])({alt})(?=/|\s|$)")

    def __call__(self, text: str) -> str:
        return self.pattern.sub(lambda m: self.table[m.group(1)], text)


def exec_line(value: str, mapper: Mapper) -> tuple[set[str], list[str]]:
    """(systemd's prefixes such as "+" and "-", argv with the unit's paths moved)."""
    prefixes = set()
    while value and value[0] in "+-@!:":
        prefixes.add(value[0])
        value = value[1:]
    return prefixes, shlex.split(mapper(value))


def sandbox_spec(svc: dict[str, list[str]], mapper: Mapper, argv: list[str], env: dict[str, str]) -> str:
    runtime = [mapper("/run/" + d) for d in words(svc, "RuntimeDirectory")]
    return json.dumps({
        "argv": argv,
        "user": one(svc, "User"),
        "bounding": words(svc, "CapabilityBoundingSet"),
        "ambient": words(svc, "AmbientCapabilities"),
        "no_new_privileges": yes(svc, "NoNewPrivileges"),
        "protect_system": one(svc, "ProtectSystem", "no"),
        "read_write_paths": sorted({mapper(p.lstrip("-")) for p in words(svc, "ReadWritePaths")} | set(runtime)),
        "private_tmp": yes(svc, "PrivateTmp"),
        "protect_home": one(svc, "ProtectHome", "no") == "yes",
        "private_devices": yes(svc, "PrivateDevices"),
        "protect_kernel_modules": yes(svc, "ProtectKernelModules"),
        "protect_kernel_logs": yes(svc, "ProtectKernelLogs"),
        "protect_kernel_tunables": yes(svc, "ProtectKernelTunables") or yes(svc, "ProtectControlGroups"),
        "memory_deny_write_execute": yes(svc, "MemoryDenyWriteExecute"),
        "umask": one(svc, "UMask", "0022"),
        "environment": env,
    })


def sandboxed(svc, mapper, argv, env) -> list[str]:
    uts = ["--uts"] if yes(svc, "ProtectHostname") else []
    return ["unshare", "--mount", *uts, "--propagation", "private", "--",
            SYSTEM_PYTHON, str(SANDBOX), sandbox_spec(svc, mapper, argv, env)]


def source_copy(dest: Path) -> Path:
    """The repository's files as git sees them (tracked, and new ones not ignored): what a clone
    holds, without .venv, build/ or ebpf/build, so the wheel's eBPF objects are compiled by the
    package build itself, not picked up from a developer's tree."""
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():  # a tracked file deleted in the work tree is left out
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def install_wheel(venv: Path, work: Path) -> None:
    """A wheel built from the repository, installed into a new virtualenv (no source tree in it)."""
    wheels = work / "wheels"
    quiet = {"check": True, "capture_output": True, "text": True, "timeout": 300}
    try:
        src = source_copy(work / "src")
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(src)],
                       **quiet)
        subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(venv)], **quiet)
        (wheel,) = wheels.glob("vpn_director-*.whl")
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)], **quiet)
    except subprocess.CalledProcessError as e:
        raise AssertionError(f"{e.cmd} failed:\n{e.stdout}\n{e.stderr}") from None


class Notify:
    """The Type=notify end: a datagram socket the daemon's sd_notify writes to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.got: list[str] = []

    def wait_for(self, state: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
        deadline = time.monotonic() + timeout
        while state not in self.got:
            left = deadline - time.monotonic()
            assert left > 0, f"no {state} within {timeout}s (got {self.got}):\n{log.read_text() if log else ''}"
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"the daemon exited with {proc.returncode} before {state}:\n{log.read_text()}")
            self.sock.settimeout(min(left, 0.2))
            try:
                self.got.extend(self.sock.recv(4096).decode().split("\n"))
            except TimeoutError:
                pass

    def close(self) -> None:
        self.sock.close()


class Control:
    """Enough of DirectorProcess for the shared fast-path check: status() and connections()."""

    def __init__(self, path: str) -> None:
        self.path = path

    def request(self, cmd: str) -> dict:
        answer = control_request(self.path, {"cmd": cmd})
        assert answer["ok"], answer
        return answer["result"]

    def status(self) -> dict:
        return self.request("status")

    def connections(self) -> list[dict]:
        return self.request("connections")


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|)", value)
    assert m, f"cannot read the timespan {value!r}"
    return float(m.group(1)) * (60 if m.group(2) == "min" else 1)


def cap_mask(names: list[str]) -> int:
    return sum(1 << CAP_BITS[n] for n in names)


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def test_unit_keys_are_all_accounted_for():
    svc = parse_unit(UNIT.read_text())["Service"]
    unknown = set(svc) - APPLIED - NOT_APPLIED
    assert not unknown, f"{UNIT.name}: this test neither applies nor lists {sorted(unknown)}"


def test_unit_runs_the_fast_path_from_a_built_wheel(make_lab, tmp_path):
    unit = parse_unit(UNIT.read_text())
    svc = unit["Service"]
    assert one(svc, "Type") == "notify"
    lab = make_lab("dr")
    root = Path(f"/run/{lab.prefix}-unit")
    pin_dir = f"/sys/fs/bpf/{lab.prefix}-unit"
    mapper = Mapper(root, pin_dir)
    try:
        venv = Path(mapper("/opt/vpn-director")) / ".venv"
        install_wheel(venv, tmp_path)

        # systemd-analyze verify: the unit as shipped, its paths moved to where the wheel went.
        mapped_unit = tmp_path / "vpn-director.service"
        mapped_unit.write_text(mapper(UNIT.read_text()))
        verify = subprocess.run(["systemd-analyze", "verify", str(mapped_unit)], capture_output=True, text=True)
        assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr

        # What systemd prepares: the runtime directory; what the operator installs: the config.
        for d in words(svc, "RuntimeDirectory"):
            Path(mapper("/run/" + d)).mkdir(mode=int(one(svc, "RuntimeDirectoryMode", "0755"), 8), parents=True)
        etc = Path(mapper("/etc/vpn-director"))
        etc.mkdir(parents=True)
        control = mapper("/run/vpn-director/control.sock")
        config = etc / "config.toml"
        config.write_text(lab_config(lab, Path(control), metrics="127.0.0.1:9816", pin_dir=pin_dir))
        config.chmod(0o600)
        notify = Notify(root / "notify.sock")
        env = dict(kv.split("=", 1) for v in svc.get("Environment", []) for kv in shlex.split(v))
        env["NOTIFY_SOCKET"] = str(notify.path)

        for value in svc.get("ExecStartPre", []):
            prefixes, argv = exec_line(value, mapper)
            cmd = argv if "+" in prefixes else sandboxed(svc, mapper, argv, env)
            r = lab.run("director", cmd, check=False, nsenter=True)
            assert r.returncode == 0 or "-" in prefixes, f"ExecStartPre {argv}: {r.returncode}\n{r.stdout}{r.stderr}"

        (start,) = svc["ExecStart"]
        prefixes, argv = exec_line(start, mapper)
        assert not prefixes and argv[0].startswith(str(venv)), argv
        log_path = tmp_path / "daemon.log"
        with open(log_path, "wb") as log:
            proc = lab.popen("director", sandboxed(svc, mapper, argv, env), nsenter=True, stdout=log, stderr=log)
        try:
            notify.wait_for("READY=1", seconds(one(svc, "TimeoutStartSec", "90")), proc, log_path)
            d = Control(control)
            st = d.status()
            assert st["dataplane"] == "ebpf", st

            # The process holds what the unit grants and nothing more, and runs the installed package.
            ps = proc_status(proc.pid)
            assert int(ps["CapBnd"], 16) == cap_mask(words(svc, "CapabilityBoundingSet")), ps["CapBnd"]
            assert int(ps["CapEff"], 16) == cap_mask(words(svc, "CapabilityBoundingSet")), ps["CapEff"]
            assert int(ps["CapAmb"], 16) == cap_mask(words(svc, "AmbientCapabilities")), ps["CapAmb"]
            assert ps["NoNewPrivs"].strip() == ("1" if yes(svc, "NoNewPrivileges") else "0")
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
            assert cmdline[1].decode() == str(venv / "bin" / "vpn-director"), cmdline
            maps = Path(f"/proc/{proc.pid}/maps").read_text()
            assert f"{venv}/lib/" in maps  # extension modules from the new virtualenv

            assert_esp_stays_in_the_kernel(lab, d)

            # ExecReload: a weight changed in the file reaches the running director.
            config.write_text(lab_config(lab, Path(control), metrics="127.0.0.1:9816", pin_dir=pin_dir,
                                         weights=(3, 1, 1)))
            notify.got.clear()
            for value in svc["ExecReload"]:
                prefixes, argv = exec_line(value, mapper)
                r = lab.run("director", sandboxed(svc, mapper, argv, env), check=False, nsenter=True)
                assert r.returncode == 0, f"ExecReload {argv}: {r.returncode}\n{r.stdout}{r.stderr}"
            notify.wait_for("READY=1", 5, proc, log_path)
            assert notify.got.index("RELOADING=1") < notify.got.index("READY=1"), notify.got
            weights = [s["weight"] for s in d.request("services")[0]["servers"]]
            assert sorted(weights) == [1, 1, 3], weights
            assert d.status()["dataplane"] == "ebpf"

            # A refused reload ([daemon] cannot change at run time) fails ExecReload; nothing changes.
            config.write_text(lab_config(lab, Path(control), metrics="127.0.0.1:9817", pin_dir=pin_dir,
                                         weights=(5, 1, 1)))
            for value in svc["ExecReload"]:
                prefixes, argv = exec_line(value, mapper)
                r = lab.run("director", sandboxed(svc, mapper, argv, env), check=False, nsenter=True)
                assert r.returncode != 0 and "daemon.metrics" in r.stderr, (r.returncode, r.stdout, r.stderr)
            weights = [s["weight"] for s in d.request("services")[0]["servers"]]
            assert sorted(weights) == [1, 1, 3] and proc.poll() is None, weights

            # Stop as systemd does (SIGTERM to the main process), within TimeoutStopSec.
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=seconds(one(svc, "TimeoutStopSec", "90")))
            assert rc == 0, log_path.read_text()
            notify.wait_for("STOPPING=1", 1, None, log_path)
            assert "daemon.stopped" in log_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
            notify.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
