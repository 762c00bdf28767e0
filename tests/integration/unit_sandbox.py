"""Apply a systemd unit's sandbox to one command, the way systemd would, without systemd.

Run as root inside a fresh mount namespace (``unshare --mount --propagation private``), with one
argument: a JSON object from ``test_unit.sandbox_spec``. It changes this namespace's mounts, then
executes ``setpriv`` with the unit's capability sets and NoNewPrivileges, which executes the
command. Nothing here outlives the namespace. What it applies, in systemd's terms:

- ProtectSystem=strict: every mount read-only, except /dev, /proc and the writable paths below
- ReadWritePaths= (and the RuntimeDirectory=): bound on themselves first, so they stay writable
- PrivateTmp=yes: fresh tmpfs on /tmp and /var/tmp
- ProtectHome=yes: /home, /root and /run/user replaced by empty read-only tmpfs
- PrivateDevices=yes: /dev is a tmpfs with null, zero, full, random, urandom, tty only
- ProtectKernelTunables=yes, ProtectControlGroups=yes: /proc/sys read-only (and /sys, as all mounts)
- ProtectKernelModules=yes: /usr/lib/modules replaced by an empty read-only tmpfs
- ProtectKernelLogs=yes: /proc/kmsg covered (and /dev/kmsg absent from the private /dev)
- MemoryDenyWriteExecute=yes: prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN), kept across execve
- UMask=, Environment=
- CapabilityBoundingSet=, AmbientCapabilities= (also made inheritable, as ambient ones must be),
  NoNewPrivileges=: setpriv's --bounding-set, --ambient-caps, --no-new-privs
(ProtectHostname=yes is the caller's: ``unshare --uts``.)
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1
DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9), "tty": (5, 0)}


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def mount_points() -> list[tuple[str, str]]:
    """(mount point, per-mount options) of this namespace, parents before children."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            out.append((fields[4].encode().decode("unicode_escape"), fields[5]))
    return out


def under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def main() -> None:
    spec = json.loads(sys.argv[1])
    writable = list(spec["read_write_paths"])
    for p in writable:
        mount("--bind", p, p)
    if spec["private_tmp"]:
        for p in ("/tmp", "/var/tmp"):
            mount("-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs", p)
            writable.append(p)
    if spec["protect_home"]:
        for p in ("/home", "/root", "/run/user"):
            if os.path.isdir(p):
                mount("-t", "tmpfs", "-o", "ro,mode=0755,nosuid,nodev,noexec", "tmpfs", p)
    if spec["private_devices"]:
        mount("-t", "tmpfs", "-o", "mode=0755,nosuid,noexec", "tmpfs", "/dev")
        for name, (major, minor) in DEVICES.items():
            os.mknod(f"/dev/{name}", 0o20666, os.makedev(major, minor))
            os.chmod(f"/dev/{name}", 0o666)
        for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
            os.symlink(target, f"/dev/{name}")
        mount("-o", "remount,ro,nosuid,noexec", "/dev")
    if spec["protect_kernel_modules"] and os.path.isdir("/usr/lib/modules"):
        mount("-t", "tmpfs", "-o", "ro,mode=0755", "tmpfs", "/usr/lib/modules")
    if spec["protect_kernel_logs"] and os.path.exists("/proc/kmsg"):
        mount("--bind", "/dev/null", "/proc/kmsg")
    if spec["protect_kernel_tunables"]:
        mount("--bind", "/proc/sys", "/proc/sys")
        mount("-o", "remount,bind,ro", "/proc/sys")
    if spec["protect_system"] == "strict":
        for mp, opts in mount_points():
            if mp in writable or under(mp, "/proc") or under(mp, "/dev"):
                continue
            keep = [o for o in opts.split(",") if o in ("nosuid", "nodev", "noexec", "noatime", "relatime")]
            r = subprocess.run(["mount", "-o", ",".join(["remount", "bind", "ro", *keep]), mp],
                               capture_output=True, text=True)
            # Another namespace's file (a /run/netns/* of a lab being torn down meanwhile) may vanish
            # between reading mountinfo and here: its mount is then out of reach by path anyway.
            if r.returncode and os.path.lexists(mp):
                raise SystemExit(f"unit_sandbox: read-only remount of {mp} failed: {r.stderr.strip()}")
    elif spec["protect_system"] not in ("", "no"):
        raise SystemExit(f"unit_sandbox: ProtectSystem={spec['protect_system']} is not emulated")
    os.umask(int(spec["umask"], 8))
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", **spec["environment"]}
    if spec["memory_deny_write_execute"]:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
            raise SystemExit(f"unit_sandbox: PR_SET_MDWE: {os.strerror(ctypes.get_errno())}")
    def caps(names: list[str]) -> str:
        return ",".join(["-all", *(f"+{c.lower().removeprefix('cap_')}" for c in names)])

    argv = ["setpriv", f"--bounding-set={caps(spec['bounding'])}", f"--inh-caps={caps(spec['ambient'])}",
            f"--ambient-caps={caps(spec['ambient'])}"]
    if spec["user"] not in ("", "root"):  # the unit runs as root with a reduced bounding set
        raise SystemExit(f"unit_sandbox: User={spec['user']} is not emulated (setpriv would need keep-caps)")
    if spec["no_new_privileges"]:
        argv.append("--no-new-privs")
    os.execvpe("setpriv", [*argv, "--", *spec["argv"]], env)


if __name__ == "__main__":
    main()
