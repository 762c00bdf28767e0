"""vpnadm: the ipvsadm-like operator CLI, a thin client of vpn-director's control socket.

argv is tokenized (argparse, nothing more), the command/option combination is checked against
``COMMANDS_V_OPTIONS`` (one declarative table, one check), one control request is sent (see
director/control.py for the protocol) and its answer printed. There is no business logic here:
the daemon validates every change and answers with one line naming the field.

Exit status: 0 ok; 1 the daemon refused (its line is printed); 2 bad invocation; 3 daemon not
reachable.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from director import __version__
from director.config import DaemonConfig, ServiceConfig
from director.control_client import control_request
from director.schedulers import SCHEDULERS

PROG = "vpnadm"
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
DEFAULT_SOCKET = DaemonConfig().control_socket
DEFAULTS = ServiceConfig(vip="0.0.0.0")  # the daemon's defaults, to leave them out of -S lines
# ipvsadm's -b scheduler flags: flag -> (scheduler, the boolean option it turns on)
SCHED_FLAGS = {"sh-fallback": ("sh", "fallback"), "mh-fallback": ("mh", "fallback"), "mh-port": ("mh", "port")}


class UsageError(Exception):
    """A bad invocation (exit 2)."""


class Refused(Exception):
    """The daemon answered ``ok: false`` (exit 1); the message is its one line."""


class Unreachable(Exception):
    """The control socket did not answer (exit 3)."""


# -- what can be said ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Opt:
    key: str  # the column name in COMMANDS_V_OPTIONS
    flags: tuple[str, ...]
    kind: str = "flag"  # flag | str | int | u32 (decimal or 0x hex) | num (int or decimal seconds) | kv (KEY=VALUE, repeatable)
    metavar: str = ""
    help: str = ""

    @property
    def name(self) -> str:
        return self.flags[0]

    def usage(self) -> str:
        return f"{self.name} {self.metavar}" if self.metavar else self.name


@dataclass(frozen=True, slots=True)
class Cmd:
    key: str  # the row name in COMMANDS_V_OPTIONS
    flags: tuple[str, ...]
    help: str
    metavar: tuple[str, ...] = ()  # --set takes values


COMMANDS = (
    Cmd("-A", ("-A", "--add-service"), "add an IPsec virtual service"),
    Cmd("-E", ("-E", "--edit-service"), "edit a virtual service (only the options given change)"),
    Cmd("-D", ("-D", "--delete-service"), "delete a virtual service"),
    Cmd("-C", ("-C", "--clear"), "clear the whole table (every service)"),
    Cmd("-R", ("-R", "--restore"), "replace every service by the -A/-a lines on stdin, all or nothing"),
    Cmd("-S", ("-S", "--save"), "print the running services as -A/-a lines (input for -R)"),
    Cmd("-a", ("-a", "--add-server"), "add a real server to a service"),
    Cmd("-e", ("-e", "--edit-server"), "edit a real server (only the options given change)"),
    Cmd("-d", ("-d", "--delete-server"), "delete a real server"),
    Cmd("-L", ("-L", "-l", "--list"), "list the table (-c: the connection table)"),
    Cmd("-Z", ("-Z", "--zero"), "zero the counters of one service or of all"),
    Cmd("--drain", ("--drain",), "withdraw a VIP's BGP route (-V), or every VIP of this director; "
        "clients already here keep being forwarded (ipvsadm has no such command: -e -w 0 quiesces one "
        "real server, this quiesces the director for the routers)"),
    Cmd("--undrain", ("--undrain",), "announce again what --drain withdrew (the VIP, or the director)"),
    Cmd("--set", ("--set",), "set every service's timeouts in seconds, 0 = unchanged (ipvsadm's third "
        "value, if given, must be 0: nothing here uses it)", ("INIT", "ESTABLISHED")),
)

OPTIONS = (
    Opt("vip", ("-V", "--vip"), "str", "ADDRESS",
        "the virtual service: UDP 500, UDP 4500, ESP and AH of this VIP (the one way to name it: "
        "ipvsadm's -t/-u/-f do not apply)"),
    Opt("scheduler", ("-s", "--scheduler"), "str", "SCHED",
        f"one of {', '.join(sorted(SCHEDULERS))} (default {DEFAULTS.scheduler}); with -E it resets the "
        "scheduler's options unless --scheduler-option or -b is given"),
    Opt("scheduler-option", ("--scheduler-option",), "kv", "KEY=VALUE",
        "a scheduler option, e.g. table_size=251 (repeatable; numbers and true/false are typed)"),
    Opt("sched-flags", ("-b", "--sched-flags"), "str", "FLAG[,FLAG]",
        "ipvsadm's scheduler flags: " + ", ".join(f"{f} (= --scheduler-option {o}=true)"
                                                  for f, (_, o) in SCHED_FLAGS.items())),
    Opt("method", ("--method",), "str", "dr|tun|nat", f"the service's forwarding method (default {DEFAULTS.method.label})"),
    Opt("affinity", ("--affinity",), "str", "ip|ip-port",
        f"a client keeps its real server per address, or per address and NAT-T port (default {DEFAULTS.affinity})"),
    Opt("netmask", ("-M", "--netmask"), "str", "NETMASK|PREFIX",
        "ipvsadm's persistence mask, as a netmask (IPv4) or a prefix length (64 for IPv6): clients in one "
        "prefix follow one real server (--affinity ip per prefix; the whole address = --affinity ip)"),
    Opt("persistent", ("-p", "--persistent"), "num", "SECONDS",
        "the ESTABLISHED timeout: how long an entry keeps its client's real server "
        f"(default {DEFAULTS.established_timeout:g})"),
    Opt("init-timeout", ("--init-timeout",), "num", "SECONDS",
        f"the INIT timeout of an unanswered conversation (default {DEFAULTS.init_timeout:g})"),
    Opt("ah", ("--ah",), help="balance AH too (the default except for NAT; impossible with NAT)"),
    Opt("no-ah", ("--no-ah",), help="do not balance AH (the default for a NAT service)"),
    Opt("retransmit-threshold", ("--retransmit-threshold",), "int", "N",
        f"repeats of an unanswered initial message before it is rescheduled, 0 = never "
        f"(default {DEFAULTS.retransmit_threshold})"),
    Opt("soft-limit", ("--soft-limit",), "int", "N", "soft expiry: entries above which idle ones are reclaimed"),
    Opt("soft-grace", ("--soft-grace",), "num", "SECONDS", "soft expiry: idle time before reclaiming"),
    Opt("drained", ("--drained",), help="-A: the service starts drained (its VIP not announced; what -S prints "
        "for a service drained with --drain -V)"),
    Opt("expire-quiescent", ("--expire-quiescent",),
        help="a client whose live state is on a quiesced (weight 0) server gets its next new conversation "
             "scheduled afresh (IPVS's expire_quiescent_template, per service)"),
    Opt("no-expire-quiescent", ("--no-expire-quiescent",),
        help="such a client keeps following its live state to the quiesced server (the default)"),
    Opt("spi-label-mask", ("--spi-label-mask",), "str", "0xMASK",
        "SPI labels: the IKE SPI bits that name the real server, 64-bit hex as on the wire (0x0 = no "
        "labels); every real server then needs --spi-label"),
    Opt("return-path", ("--return-path",), "str", "direct|director",
        "DR/TUN: the real servers' replies go straight to the client, or through the director (their "
        f"default route; it forwards those of known conversations only) (default {DEFAULTS.return_path})"),
    Opt("ingress", ("--ingress",), "kv", "KEY=N",
        "per-source ingress limits in packets/s: esp_pps, ah_pps, ike_pps, and burst (repeatable; 0 = off; "
        "with -E only the keys given change)"),
    Opt("real-server", ("-r", "--real-server"), "str", "RIP", "the real server's address"),
    Opt("gatewaying", ("-g", "--gatewaying"), help="this real server by direct routing (dr)"),
    Opt("ipip", ("-i", "--ipip"), help="this real server by IP-in-IP tunnel (tun)"),
    Opt("masquerading", ("-m", "--masquerading"), help="this real server by NAT (nat)"),
    Opt("weight", ("-w", "--weight"), "int", "WEIGHT", "capacity of the real server, 0 = quiesced (default 1)"),
    Opt("u-threshold", ("-x", "--u-threshold"), "int", "UPPER", "upper threshold of connections (0 = none)"),
    Opt("l-threshold", ("-y", "--l-threshold"), "int", "LOWER", "lower threshold of connections"),
    Opt("spi-label", ("--spi-label",), "str", "0xLABEL",
        "SPI labels: this real server's label, 64-bit hex positioned under the service's mask "
        "(strongswan.conf's charon.spi_label)"),
    Opt("esp-spi-min", ("--esp-spi-min",), "u32", "SPI", "SPI labels: the lowest inbound ESP SPI this real "
        "server chooses (charon.spi_min)"),
    Opt("esp-spi-max", ("--esp-spi-max",), "u32", "SPI", "SPI labels: the highest (charon.spi_max)"),
    Opt("connection", ("-c", "--connection"), help="list the connection table"),
    Opt("client", ("--client",), "str", "IP", "-L -c: only this client's entries"),
    Opt("server", ("--server",), "str", "RIP", "-L -c: only entries on this real server"),
    Opt("stats", ("--stats",), help="Conns InPkts OutPkts InBytes OutBytes"),
    Opt("rate", ("--rate",), help="CPS InPPS OutPPS InBPS OutBPS"),
    Opt("thresholds", ("--thresholds",), help="Uthreshold Lthreshold ActiveConn InActConn"),
    Opt("timeout", ("--timeout",), help="each service's INIT and ESTABLISHED timeouts"),
    Opt("exact", ("-X", "--exact"), help="exact numbers (no K, M, G, T)"),
    Opt("json", ("--json",), help="the daemon's answer as JSON, for scripts"),
    Opt("sync", ("--sync",), help="the table sync: role, and per peer the last datagram's age and the "
        "datagrams rejected by cause"),
    Opt("drops", ("--drops",), help="packets dropped by reason since the daemon started (the kernel's "
        "included, also shown alone), e.g. INGRESS_ESP_LIMITED"),
    Opt("numeric", ("-n", "--numeric"), help="accepted for ipvsadm habits: addresses are always numeric"),
)
OPT = {o.key: o for o in OPTIONS}

# -- the one table: which options go with which command -------------------------------------------
REQ, ANY = "+", " "  # required, optional; any other value names a group of which at most one is given
_SERVICE = {
    "scheduler": ANY, "scheduler-option": ANY, "sched-flags": ANY, "method": ANY,
    "affinity": "affinity", "netmask": "affinity",
    "persistent": ANY, "init-timeout": ANY, "ah": "ah", "no-ah": "ah", "retransmit-threshold": ANY,
    "soft-limit": ANY, "soft-grace": ANY, "expire-quiescent": "quiescent", "no-expire-quiescent": "quiescent",
    "spi-label-mask": ANY, "ingress": ANY,
    "return-path": ANY,
}  # fmt: skip
_SERVER = {
    "gatewaying": "forward", "ipip": "forward", "masquerading": "forward",
    "weight": ANY, "u-threshold": ANY, "l-threshold": ANY,
    "spi-label": ANY, "esp-spi-min": ANY, "esp-spi-max": ANY,
}  # fmt: skip
COMMANDS_V_OPTIONS: dict[str, dict[str, str]] = {
    "-A": {"vip": REQ, **_SERVICE, "drained": ANY},
    "-E": {"vip": REQ, **_SERVICE},
    "-D": {"vip": REQ},
    "-C": {},
    "-R": {},
    "-S": {"numeric": ANY},
    "-a": {"vip": REQ, "real-server": REQ, **_SERVER},
    "-e": {"vip": REQ, "real-server": REQ, **_SERVER},
    "-d": {"vip": REQ, "real-server": REQ},
    "-L": {"vip": ANY, "numeric": ANY, "exact": ANY,
           "stats": "format", "rate": "format", "thresholds": "format", "timeout": "format", "json": "format",
           "sync": "format", "drops": "format"},
    "-L -c": {"connection": REQ, "client": ANY, "server": ANY, "numeric": ANY, "json": ANY},
    "-Z": {"vip": ANY},
    "--drain": {"vip": ANY},
    "--undrain": {"vip": ANY},
    "--set": {},
}  # fmt: skip


def check(command: str, given: Iterable[str]) -> None:
    """Raise UsageError unless ``given`` options are legal with ``command`` (COMMANDS_V_OPTIONS)."""
    row = COMMANDS_V_OPTIONS[command]
    given_set = set(given)
    given = [k for k in OPT if k in given_set]  # in OPTIONS order: messages do not depend on argv order
    for key in given:
        if key not in row:
            raise UsageError(f"illegal option combination: {command} with {OPT[key].name}")
    seen: dict[str, str] = {}
    for key in given:
        group = row[key]
        if group not in (REQ, ANY):
            if group in seen:
                raise UsageError(f"conflicting options: {OPT[seen[group]].name} and {OPT[key].name} with {command}")
            seen[group] = key
    for key, rule in row.items():
        if rule == REQ and key not in given:
            raise UsageError(f"missing option: {command} needs {OPT[key].usage()}")


# -- tokenizing -----------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # never exit from deep inside: the caller decides
        raise UsageError(message)


class _Command(argparse.Action):
    def __call__(self, parser, ns, values, option_string=None):
        if getattr(ns, "command", None) is not None:
            raise UsageError("multiple commands specified")
        ns.command, ns.command_values = self.const, values


class _Once(argparse.Action):
    def __call__(self, parser, ns, values, option_string=None):
        if hasattr(ns, self.dest):
            raise UsageError(f"multiple {OPT[self.dest].name} options specified")
        setattr(ns, self.dest, True if self.nargs == 0 else values)


class _Append(argparse.Action):
    def __call__(self, parser, ns, values, option_string=None):
        setattr(ns, self.dest, [*getattr(ns, self.dest, []), values])


class _Ipvsadm(argparse.Action):
    def __call__(self, parser, ns, values, option_string=None):
        raise UsageError(f"{option_string}: an IPsec virtual service covers UDP 500, UDP 4500, ESP and AH "
                         "of one address, so there is no protocol or port to give: use -V ADDRESS")


def _usage() -> str:
    """One usage line per row of COMMANDS_V_OPTIONS, so the help cannot disagree with the table."""
    lines = []
    for key, row in COMMANDS_V_OPTIONS.items():
        cmd = next(c for c in COMMANDS if c.key == key.split()[0])
        parts = ["|".join(f for f in cmd.flags if not f.startswith("--")) or cmd.flags[0], *cmd.metavar]
        if key == "--set":
            parts.append("[0]")
        groups: set[str] = set()
        for opt, rule in row.items():
            if rule == REQ:
                parts.append(OPT[opt].usage())
            elif rule == ANY:
                parts.append(f"[{OPT[opt].usage()}]" + ("..." if OPT[opt].kind == "kv" else ""))
            elif rule not in groups:
                groups.add(rule)
                parts.append("[" + " | ".join(OPT[o].usage() for o, r in row.items() if r == rule) + "]")
        if key == "-R":
            parts.append("< FILE")
        line = f"  {PROG}"
        for part in parts:  # wrap between parts, never inside one
            if len(line) + 1 + len(part) > 96:
                lines.append(line)
                line = " " * (len(PROG) + 5)
            line += " " + part
        lines.append(line)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG, add_help=False, allow_abbrev=False, argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter, usage=argparse.SUPPRESS,
        description=(
            f"{PROG} {__version__}: administer vpn-director's IPsec virtual services, as ipvsadm does IPVS.\n\n"
            f"Usage:\n{_usage()}\n  {PROG} -h\n\n"
            "An IPsec virtual service covers UDP 500, UDP 4500, ESP and AH of one VIP and is named by\n"
            "-V ADDRESS alone (ipvsadm's -t/-u/-f do not apply). Addresses are always numeric.\n"
            "Without a command, the table is listed (-L)."
        ),
        epilog=(
            "Exit status: 0 ok; 1 the daemon refused (its one-line reason is printed, nothing changed);\n"
            "2 bad invocation; 3 vpn-director not reachable."
        ),
    )
    cmds = p.add_argument_group("Commands")
    for c in COMMANDS:
        nargs = "+" if c.metavar else 0
        cmds.add_argument(*c.flags, action=_Command, const=c.key, nargs=nargs, help=c.help,
                          **({"metavar": "SECONDS"} if c.metavar else {}))
    cmds.add_argument("-h", "--help", action=_Command, const="-h", nargs=0, help="this help")
    opts = p.add_argument_group("Options")
    for o in OPTIONS:
        kw: dict[str, Any] = {"dest": o.key, "help": o.help}
        if o.kind == "flag":
            kw["nargs"] = 0
        else:
            kw["metavar"] = o.metavar
        opts.add_argument(*o.flags, action=_Append if o.kind == "kv" else _Once, **kw)
    opts.add_argument("--socket", dest="socket", metavar="PATH",
                      help=f"the daemon's control socket (default $VPNADM_SOCKET or {DEFAULT_SOCKET})")
    for flag in ("-t", "-u", "-f"):
        p.add_argument(flag, action=_Ipvsadm, help=argparse.SUPPRESS)
    return p


@dataclass(frozen=True, slots=True)
class Invocation:
    command: str  # a key of COMMANDS_V_OPTIONS, or "-h"
    args: dict[str, Any]  # option key -> typed value (only the options given)
    values: tuple = ()  # the command's own values (--set)
    socket: str = DEFAULT_SOCKET


def parse(argv: list[str]) -> Invocation:
    """Tokenize, check against the table, type the values. Raises UsageError."""
    ns = vars(build_parser().parse_args(argv))
    command = ns.pop("command", None)
    values = ns.pop("command_values", None) or ()
    path = ns.pop("socket", None) or os.environ.get("VPNADM_SOCKET") or DEFAULT_SOCKET
    if command == "-h":
        return Invocation("-h", {}, socket=path)
    if command is None:
        if ns:
            raise UsageError("no command given (one of " + ", ".join(c.key for c in COMMANDS) + ")")
        command = "-L"  # ipvsadm lists the table when called without arguments
    if command == "-L" and "connection" in ns:
        command = "-L -c"
    check(command, ns)
    args = {k: _typed(OPT[k], v) for k, v in ns.items()}
    if command == "--set":
        if len(values) not in (2, 3):
            raise UsageError("--set takes INIT ESTABLISHED (and an optional third value, 0)")
        values = tuple(_number("--set", v) for v in values)
        if len(values) == 3 and values[2] != 0:
            raise UsageError("--set: the third value (ipvsadm's udp timeout) is not used by vpn-director; "
                             "give 0 or leave it out")
    return Invocation(command, args, tuple(values), path)


def _typed(opt: Opt, v: Any) -> Any:
    if opt.kind == "int":
        try:
            return int(v, 10)
        except ValueError:
            raise UsageError(f"{opt.name}: not an integer: {v!r}") from None
    if opt.kind == "u32":
        try:
            n = int(v, 0)
        except ValueError:
            raise UsageError(f"{opt.name}: not an integer (decimal or 0x hex): {v!r}") from None
        if not 0 <= n <= 0xFFFFFFFF:
            raise UsageError(f"{opt.name}: must be 0..0xffffffff, got {v!r}")
        return n
    if opt.kind == "num":
        return _number(opt.name, v)
    if opt.kind == "kv":
        out: dict[str, Any] = {}
        for item in v:
            key, eq, text = item.partition("=")
            if not eq or not key:
                raise UsageError(f"{opt.name}: expected KEY=VALUE, got {item!r}")
            if key in out:
                raise UsageError(f"{opt.name}: {key} given twice")
            out[key] = _scalar(text)
        return out
    return v


def _number(name: str, v: str) -> int | float:
    try:
        return int(v, 10)
    except ValueError:
        pass
    try:
        f = float(v)
    except ValueError:
        f = math.nan
    if not math.isfinite(f):
        raise UsageError(f"{name}: not a number: {v!r}")
    return f


def _scalar(text: str) -> Any:
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# -- requests -------------------------------------------------------------------------------------
_FORWARD = {"gatewaying": "dr", "ipip": "tun", "masquerading": "nat"}
_FORWARD_FLAG = {"dr": "-g", "tun": "-i", "nat": "-m"}
_FORWARD_NAME = {"dr": "Route", "tun": "Tunnel", "nat": "Masq"}  # as ipvsadm prints them


def service_settings(a: dict[str, Any]) -> dict[str, Any]:
    """The control protocol's service settings for the options given (and nothing else)."""
    out: dict[str, Any] = {}
    for key, name in (("scheduler", "scheduler"), ("scheduler-option", "scheduler_options"),
                      ("method", "method"), ("affinity", "affinity"),
                      ("retransmit-threshold", "retransmit_threshold"), ("return-path", "return_path")):
        if key in a:
            out[name] = a[key]
    if "sched-flags" in a:
        opts = dict(out.get("scheduler_options", {}))
        for flag in a["sched-flags"].split(","):
            if flag not in SCHED_FLAGS:
                raise UsageError(f"-b {a['sched-flags']}: unknown scheduler flag {flag!r} "
                                 f"(known: {', '.join(SCHED_FLAGS)})")
            sched, opt = SCHED_FLAGS[flag]
            if "scheduler" in a and a["scheduler"] != sched:
                raise UsageError(f"-b {flag}: a flag of the {sched} scheduler, not of {a['scheduler']}")
            if opts.get(opt, True) is not True:
                raise UsageError(f"-b {flag} and --scheduler-option {opt}={_scalar_text(opts[opt])} disagree")
            opts[opt] = True
        out["scheduler_options"] = opts
    if "expire-quiescent" in a or "no-expire-quiescent" in a:
        out["expire_quiescent"] = "expire-quiescent" in a
    if "netmask" in a:
        out["affinity"] = "ip"
        out["affinity_prefix"] = _prefix_len(a["netmask"], a.get("vip", ""))
    if "ah" in a or "no-ah" in a:
        out["ah"] = "ah" in a
    if "drained" in a:
        out["drain"] = True
    timeouts = {k: a[o] for k, o in (("init", "init-timeout"), ("established", "persistent")) if o in a}
    if timeouts:
        out["timeouts"] = timeouts
    soft = {k: a[o] for k, o in (("limit", "soft-limit"), ("grace", "soft-grace")) if o in a}
    if soft:
        out["soft_expiry"] = soft
    if "spi-label-mask" in a:
        out["spi_label"] = {"mask": a["spi-label-mask"]}
    if "ingress" in a:
        out["ingress"] = a["ingress"]
    return out


def server_settings(a: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, method in _FORWARD.items():
        if key in a:
            out["method"] = method
    for key, name in (("weight", "weight"), ("u-threshold", "u_threshold"), ("l-threshold", "l_threshold"),
                      ("spi-label", "spi_label"), ("esp-spi-min", "esp_spi_min"), ("esp-spi-max", "esp_spi_max")):
        if key in a:
            out[name] = a[key]
    return out


def new_service(a: dict[str, Any]) -> dict[str, Any]:
    """-A: AH as --ah / --no-ah say, else the daemon's default (on, off for a NAT service)."""
    return {"vip": a["vip"], **service_settings(a)}


def parse_restore(text: str) -> list[dict]:
    """-R input (the lines -S prints) -> the services list of one ``restore`` request."""
    services: list[dict] = []
    by_vip: dict[str, dict] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            argv = shlex.split(line)
            if argv and argv[0] == PROG:
                argv = argv[1:]
            if "--socket" in argv or any(x.startswith("--socket=") for x in argv):
                raise UsageError("--socket has no place in restore input")
            inv = parse(argv)
        except (UsageError, ValueError) as e:
            raise UsageError(f"-R line {n}: {e}") from None
        a = inv.args
        if inv.command == "-A":
            svc = {**new_service(a), "server": []}
            services.append(svc)
            by_vip.setdefault(a["vip"], svc)
        elif inv.command == "-a":
            if a["vip"] not in by_vip:
                raise UsageError(f"-R line {n}: -a for {a['vip']} before its -A line")
            by_vip[a["vip"]]["server"].append({"address": a["real-server"], **server_settings(a)})
        else:
            raise UsageError(f"-R line {n}: only -A and -a lines can be restored, not {inv.command}")
    if not services:
        raise UsageError("-R: no -A line on stdin (restore replaces every service; to remove them all, use -C)")
    return services


# -- formatting -----------------------------------------------------------------------------------
def _secs(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _prefix_len(text: str, vip: str) -> int:
    """-M's value as ``affinity_prefix``: a prefix length, or an IPv4 netmask (255.255.255.0 = 24);
    the whole address (32 for an IPv4 VIP, 128 for IPv6) is 0, per-address affinity."""
    import ipaddress

    bits = 128 if ":" in vip else 32
    try:
        n = int(text) if text.isdigit() else ipaddress.IPv4Network(f"0.0.0.0/{text}").prefixlen
    except ValueError:
        raise UsageError(f"-M {text}: not a prefix length or a contiguous IPv4 netmask") from None
    if not 1 <= n <= bits:
        raise UsageError(f"-M {text}: a prefix length is 1..{bits} for this VIP")
    return 0 if n == bits else n


def _scalar_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return _secs(v) if isinstance(v, float) else str(v)


_SAVE_SERVICE_KEYS = {"vip", "scheduler", "scheduler_options", "method", "affinity", "affinity_prefix", "ah", "timeouts",
                      "retransmit_threshold", "soft_expiry", "expire_quiescent", "server", "drain", "spi_label",
                      "return_path", "ingress"}
_SAVE_SERVER_KEYS = {"address", "weight", "method", "u_threshold", "l_threshold", "spi_label", "esp_spi_min",
                     "esp_spi_max"}


def save_lines(services: list[dict]) -> Iterator[str]:
    """The ``save`` result as -A/-a lines: -s and -w always (as ipvsadm), other options when not default."""
    for s in services:
        unknown = sorted(set(s) - _SAVE_SERVICE_KEYS) + sorted(
            {k for r in s.get("server", []) for k in r} - _SAVE_SERVER_KEYS)
        if unknown:  # a setting -S cannot spell would be lost by -R: refuse rather than lose it
            raise Refused(f"save: {PROG} has no option for the daemon's setting {unknown[0]!r}; upgrade {PROG}")
        vip = s["vip"]
        parts = ["-A", "-V", vip, "-s", s["scheduler"]]
        flags = [f for f, (sched, opt) in SCHED_FLAGS.items()
                 if sched == s["scheduler"] and (s.get("scheduler_options") or {}).get(opt) is True]
        if flags:  # as ipvsadm -S prints them
            parts += ["-b", ",".join(flags)]
        for k, v in sorted((s.get("scheduler_options") or {}).items()):
            if (s["scheduler"], k) not in SCHED_FLAGS.values() or v is not True:
                parts += ["--scheduler-option", f"{k}={_scalar_text(v)}"]
        if s.get("method", DEFAULTS.method.label) != DEFAULTS.method.label:
            parts += ["--method", s["method"]]
        if s.get("affinity_prefix"):
            parts += ["-M", str(s["affinity_prefix"])]
        elif s.get("affinity", DEFAULTS.affinity) != DEFAULTS.affinity:
            parts += ["--affinity", s["affinity"]]
        if not s.get("ah", True):
            parts.append("--no-ah")
        t = s.get("timeouts", {})
        if t.get("init", DEFAULTS.init_timeout) != DEFAULTS.init_timeout:
            parts += ["--init-timeout", _secs(t["init"])]
        if t.get("established", DEFAULTS.established_timeout) != DEFAULTS.established_timeout:
            parts += ["-p", _secs(t["established"])]
        if s.get("retransmit_threshold", DEFAULTS.retransmit_threshold) != DEFAULTS.retransmit_threshold:
            parts += ["--retransmit-threshold", str(s["retransmit_threshold"])]
        soft = s.get("soft_expiry") or {}
        if soft.get("limit"):
            parts += ["--soft-limit", str(soft["limit"]), "--soft-grace", _secs(soft.get("grace", 0))]
        if s.get("drain"):
            parts.append("--drained")
        if s.get("expire_quiescent"):
            parts.append("--expire-quiescent")
        if (s.get("spi_label") or {}).get("mask"):
            parts += ["--spi-label-mask", s["spi_label"]["mask"]]
        for k, v in (s.get("ingress") or {}).items():
            parts += ["--ingress", f"{k}={_scalar_text(v)}"]
        if s.get("return_path", DEFAULTS.return_path) != DEFAULTS.return_path:
            parts += ["--return-path", s["return_path"]]
        yield " ".join(shlex.quote(p) for p in parts)
        for r in s.get("server", []):
            parts = ["-a", "-V", vip, "-r", r["address"]]
            if r.get("method"):
                parts.append(_FORWARD_FLAG.get(r["method"], r["method"]))
            parts += ["-w", str(r.get("weight", 1))]
            if r.get("u_threshold"):
                parts += ["-x", str(r["u_threshold"])]
            if r.get("l_threshold"):
                parts += ["-y", str(r["l_threshold"])]
            if r.get("spi_label") is not None:
                parts += ["--spi-label", r["spi_label"]]
            for k in ("esp_spi_min", "esp_spi_max"):
                if r.get(k) is not None:
                    parts += ["--" + k.replace("_", "-"), f"{r[k]:#010x}"]
            yield " ".join(shlex.quote(p) for p in parts)


def largenum(i: float, exact: bool = False) -> str:
    """ipvsadm's print_largenum: 9 columns, K/M/G/T above 100 million unless exact."""
    i = int(i)
    if exact:
        s = str(i)
        return s.rjust(9 if len(s) <= 8 else len(s) + 1)
    if i < 100_000_000:
        return f"{i:9d}"
    for limit, div, unit in ((10**9, 10**3, "K"), (10**11, 10**6, "M"), (10**14, 10**9, "G")):
        if i < limit:
            return f"{i // div:8d}{unit}"
    return f"{i // 10**12:8d}T"


_STATS = ("conns", "inpkts", "outpkts", "inbytes", "outbytes")
_RATES = ("cps", "inpps", "outpps", "inbps", "outbps")
_COLUMNS = {"stats": ("Conns", "InPkts", "OutPkts", "InBytes", "OutBytes"),
            "rate": ("CPS", "InPPS", "OutPPS", "InBPS", "OutBPS")}


def format_services(services: list[dict], fmt: str = "", exact: bool = False) -> str:
    """ipvsadm -L, --stats, --rate, --thresholds; --timeout per service (ipvsadm's is global)."""
    out = [f"IPsec Virtual Server (vpn-director {__version__})"]
    if fmt in _COLUMNS:
        out.append("%-33s %8s %8s %8s %8s %8s" % ("Prot LocalAddress", *_COLUMNS[fmt]))
        out.append("  -> RemoteAddress")
    elif fmt == "thresholds":
        out.append("%-33s %-10s %-10s %-10s %-10s" % ("Prot LocalAddress", "Uthreshold", "Lthreshold",
                                                       "ActiveConn", "InActConn"))
        out.append("  -> RemoteAddress")
    elif fmt == "timeout":
        out.append("%-33s %8s %12s" % ("Prot LocalAddress", "Init", "Established"))
    else:
        out.append("Prot LocalAddress Scheduler Flags")
        out.append("  -> RemoteAddress                Forward Weight ActiveConn InActConn")
    for s in services:
        name = f"IPSEC  {s['vip']}"
        if fmt in _COLUMNS:
            keys, block = (_STATS, "stats") if fmt == "stats" else (_RATES, "rates")
            out.append(f"{name:<33s}" + "".join(largenum(s[block][k], exact) for k in keys))
            for r in s["servers"]:
                out.append(f"  -> {r['address']:<28s}" + "".join(largenum(r[block][k], exact) for k in keys))
            continue
        if fmt == "timeout":
            t = s["timeouts"]
            out.append("%-33s %8s %12s" % (name, _secs(t["init"]), _secs(t["established"])))
            continue
        sched = s["scheduler"]
        opts = s.get("scheduler_options") or {}
        on = [f for f, (sc, opt) in SCHED_FLAGS.items() if sc == sched and opts.get(opt) is True]
        if on:  # as ipvsadm -L: "mh (mh-fallback,mh-port)"
            sched += f" ({','.join(on)})"
        prefix = f"/{s['affinity_prefix']}" if s.get("affinity_prefix") else ""
        flags = f" affinity {s['affinity']}{prefix} {_secs(s['timeouts']['established'])}"
        if s.get("expire_quiescent"):
            flags += " expire-quiescent"
        ann = s.get("announcement")  # route health injection: announced, or withdrawn and why
        if ann is not None:
            flags += " announced" if ann["announced"] else f" withdrawn({ann['reason'] or 'pending'})"
        out.append(f"{name} {sched}{flags}{'' if s['ah'] else ' no-ah'}")
        for r in s["servers"]:
            if fmt == "thresholds":
                out.append("  -> %-28s %-10d %-10d %-10d %-10d" % (r["address"], r["u_threshold"], r["l_threshold"],
                                                                    r["active"], r["inactive"]))
            else:
                forward = _FORWARD_NAME.get(r["method"], r["method"])
                line = "  -> %-28s %-7s %-6d %-10d %-10d" % (r["address"], forward, r["weight"],
                                                             r["active"], r["inactive"])
                out.append(line + ("" if r.get("up", True) else " down"))  # marked down by health checks
    sessions = next((s["bgp_sessions"] for s in services if "bgp_sessions" in s), None)
    if sessions is not None and not fmt:
        out.append("BGP sessions: " + (", ".join(f"{p} {st}" for p, st in sorted(sessions.items())) or "none"))
    return "".join(line.rstrip() + "\n" for line in out)


def _expire(seconds: float) -> str:
    s = max(0, int(seconds))
    return f"{s // 60:02d}:{s % 60:02d}"


def format_connections(conns: list[dict], vips: dict[int, str]) -> str:
    """ipvsadm -L -c with IPsec columns: the ISAKMP cookies and the NAT-T flag."""
    row = "%-5s %-6s %-11s %-21s %-15s %-15s %-16s %-16s %s"
    out = ["IPsec connection entries",
           row % ("pro", "expire", "state", "source", "virtual", "destination", "initiator-cookie",
                  "responder-cookie", "nat-t")]
    for c in conns:
        source = f"[{c['client']}]:{c['port']}" if ":" in c["client"] else f"{c['client']}:{c['port']}"  # RFC 5952 s. 6
        out.append(row % ("IPSEC", _expire(c["expires_in"]), c["state"], source,
                          vips.get(c["svc"], "?"), c["rs_address"] or "-", c["spi_i"], c["spi_r"],
                          "yes" if c["natt"] else "no"))
    return "".join(line.rstrip() + "\n" for line in out)


def format_sync(st: dict | None) -> str:
    """-L --sync: the table sync's state, one line per configured peer."""
    if st is None:
        raise Refused("sync: not configured (no [daemon.sync] table)")
    out = [f"Table sync: role {st['role'] or '-'}, {'synced' if st['synced'] else 'not synced'}, "
           f"bind {st.get('bind', '-')}, epoch {st.get('epoch', '-')}",
           f"sent {st['sent']} (records {st['records_sent']}, snapshots {st['snapshots_sent']}), "
           f"received {st['received']}, applied {st['applied']}, dropped by the kernel {st.get('dropped_kernel', 0)}, "
           f"send errors {st['send_errors']}"]
    row = "%-15s %9s %9s %9s %8s %8s %9s"
    out.append(row % ("Peer", "LastSeen", "Received", "Accepted", "BadMAC", "Replay", "Malformed"))
    for p in st.get("peers", []):
        age = "never" if p["last_age"] is None else f"{p['last_age']:.1f}s"
        out.append(row % (p["peer"], age, p["received"], p["accepted"], p["rejected_mac"], p["rejected_replay"],
                          p["malformed"]))
    return "".join(line.rstrip() + "\n" for line in out)


def format_drops(st: dict) -> str:
    """-L --drops: every reason with a count, all paths together and the eBPF programs' part."""
    from director.drop_reasons import DropReason

    kernel = st.get("fastpath", {}).get("drops", {})
    row = "%-24s %4s %12s %12s"
    out = [row % ("Reason", "Code", "Packets", "InKernel")]
    for name, n in sorted(st.get("drops", {}).items(), key=lambda kv: DropReason[kv[0]].value):
        out.append(row % (name, DropReason[name].value, n, kernel.get(name, 0)))
    return "".join(line.rstrip() + "\n" for line in out)


# -- running one invocation -----------------------------------------------------------------------
Call = Callable[..., Any]  # call(cmd, **arguments) -> result; raises Refused / Unreachable


def socket_caller(path: str) -> Call:
    def call(cmd: str, **kw: Any) -> Any:
        try:
            answer = control_request(path, {"cmd": cmd, **kw})
        except OSError as e:
            raise Unreachable(f"cannot reach vpn-director at {path}: {e.strerror or e}") from None
        except ValueError:
            raise Unreachable(f"cannot reach vpn-director at {path}: no answer (connection closed)") from None
        if not isinstance(answer, dict):
            raise Unreachable(f"cannot reach vpn-director at {path}: not a vpn-director answer: {answer!r}")
        if answer.get("ok") is True:
            return answer.get("result")
        raise Refused(str(answer.get("error") or "refused, without a reason"))
    return call


def _json(result: Any) -> str:
    return json.dumps(result, indent=2, sort_keys=False) + "\n"


def execute(inv: Invocation, call: Call, stdin=None) -> str:
    """Send the request(s) for ``inv``; return what to print on stdout."""
    a, c = inv.args, inv.command
    if c == "-A":
        call("add-service", service=new_service(a))
    elif c == "-E":
        changes = service_settings(a)
        if "scheduler" in changes and "scheduler_options" not in changes:
            changes["scheduler_options"] = {}  # options belong to a scheduler: a new one starts bare
        call("edit-service", vip=a["vip"], changes=changes)
    elif c == "-D":
        call("del-service", vip=a["vip"])
    elif c == "-C":
        call("clear")
    elif c == "-a":
        call("add-server", vip=a["vip"], server={"address": a["real-server"], **server_settings(a)})
    elif c == "-e":
        call("edit-server", vip=a["vip"], address=a["real-server"], changes=server_settings(a))
    elif c == "-d":
        call("del-server", vip=a["vip"], address=a["real-server"])
    elif c == "-Z":
        call("zero", **({"vip": a["vip"]} if "vip" in a else {}))
    elif c in ("--drain", "--undrain"):
        return str(call(c[2:], **({"vip": a["vip"]} if "vip" in a else {}))) + "\n"
    elif c == "--set":
        values = {k: v for k, v in zip(("init", "established"), inv.values) if v != 0}
        if values:  # 0 0 = nothing to change, as ipvsadm
            call("set-timeouts", **values)
    elif c == "-S":
        return "".join(line + "\n" for line in save_lines(call("save")))
    elif c == "-R":
        call("restore", services=parse_restore((stdin or sys.stdin).read()))
    elif c == "-L" and "sync" in a:
        if "vip" in a:
            raise UsageError("illegal option combination: -L --sync with -V (the sync covers every service)")
        return format_sync(call("status").get("sync"))
    elif c == "-L" and "drops" in a:
        if "vip" in a:
            raise UsageError("illegal option combination: -L --drops with -V (drops are counted per director)")
        return format_drops(call("status"))
    elif c == "-L":
        services = call("services")
        if "vip" in a:
            services = [s for s in services if s["vip"] == a["vip"]]
            if not services:
                raise Refused(f"vip: no service {a['vip']}")
        if "json" in a:
            return _json(services)
        fmt = next((k for k in ("stats", "rate", "thresholds", "timeout") if k in a), "")
        return format_services(services, fmt, exact="exact" in a)
    elif c == "-L -c":
        conns = call("connections", **{k: a[k] for k in ("client", "server") if k in a})
        if "json" in a:
            return _json(conns)
        vips = {s["id"]: s["vip"] for s in call("status")["services"]}
        return format_connections(conns, vips)
    return ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        inv = parse(argv)
        if inv.command == "-h":
            sys.stdout.write(build_parser().format_help())
            return EXIT_OK
        sys.stdout.write(execute(inv, socket_caller(inv.socket)))
        sys.stdout.flush()
        return EXIT_OK
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Refused as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except Unreachable as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except BrokenPipeError:  # vpnadm -L | head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
