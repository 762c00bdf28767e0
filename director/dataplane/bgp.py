"""Make the local BIRD 2 announce exactly a set of VIPs, and read its BGP sessions' states.

BIRD is the director's BGP speaker (and BFD); this adapter talks to its control socket directly,
in BIRD's own text protocol (``doc/reply_codes`` in BIRD's sources): every reply line starts with
a four-digit code and ``-`` when more lines follow or a space on the last one; a line starting
with a space continues the previous code. ``0xxx`` = done, ``1xxx`` = table row, ``2xxx`` =
table heading, ``8xxx`` = run-time error, ``9xxx`` = parse error. No subprocess per change.

Each VIP the adapter manages is one static protocol ``vip_<a>_<b>_<c>_<d>`` holding the VIP /32,
kept in a generated include file that BIRD's own config includes (``include "<vips.conf>";``). A
VIP is announced while its protocol is enabled; the BGP protocol exports static routes only.
The include always states the desired ``disabled`` flag of every protocol, so a restarted BIRD
comes back announcing what was last applied (and a ``configure`` puts a protocol back to its
configured state: BIRD compares the new ``disabled`` flag with the running one). An IPv6 VIP's
/128 is in an ``ipv6`` channel: BIRD's BGP sessions need one to carry it.

Changes follow ``director/reconcile.py``: :meth:`Bird.plan` computes the whole change, and
:meth:`Bird.apply` writes the include and makes BIRD match it, with ``enable``/``disable``
when only the announced set changes and ``configure`` when the set of known VIPs changes. If
BIRD refuses any step, the previous include is restored (and re-configured) and the error raised:
the previous announcement stays.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["Bird", "BirdError", "BirdPlan", "Protocol", "Reply", "parse_protocols", "parse_reply",
           "proto_name", "render_include"]  # fmt: skip


class BirdError(RuntimeError):
    """BIRD refused a command or could not be reached; the message carries BIRD's own words."""


@dataclass(frozen=True, slots=True)
class Reply:
    """One complete answer: the final code and every (code, text) line, continuation lines folded
    under the code they continue."""

    code: int
    lines: tuple[tuple[int, str], ...]

    @property
    def ok(self) -> bool:
        return self.code < 8000

    @property
    def codes(self) -> set[int]:
        return {c for c, _ in self.lines}

    def text(self) -> str:
        return "\n".join(t for _, t in self.lines)


def parse_reply(raw: str) -> tuple[Reply | None, str]:
    """Parse the first complete reply in ``raw``; returns (reply or None if incomplete, rest).

    Spontaneous lines (``+``) are dropped: the adapter never asks for them.
    """
    lines: list[tuple[int, str]] = []
    code = 0
    pos = 0
    while True:
        nl = raw.find("\n", pos)
        if nl < 0:
            return None, raw
        line = raw[pos:nl]
        pos = nl + 1
        if line.startswith("+"):
            continue
        if line.startswith(" "):
            lines.append((code, line[1:]))
            continue
        if len(line) < 5 or not line[:4].isdigit() or line[4] not in "- ":
            raise BirdError(f"unexpected line from BIRD: {line!r}")
        code = int(line[:4])
        lines.append((code, line[5:]))
        if line[4] == " ":
            return Reply(code, tuple(lines)), raw[pos:]


@dataclass(frozen=True, slots=True)
class Protocol:
    """One row of ``show protocols``: ``state`` is BIRD's (up/down/start/stop), ``info`` the
    protocol's own (for BGP: Established, Idle, Connect, Active, OpenSent, OpenConfirm, ...)."""

    name: str
    proto: str
    state: str
    info: str

    @property
    def bgp_state(self) -> str:
        return self.info.split()[0] if self.info else ""


def parse_protocols(reply: Reply) -> list[Protocol]:
    """Rows of a ``show protocols`` reply (code 1002; the 2002 heading is skipped)."""
    rows = []
    for code, text in reply.lines:
        if code != 1002 or not text.strip():
            continue
        # name proto table state since [info...]; "since" is one token in BIRD's default format.
        parts = text.split(None, 5)
        if len(parts) < 4:
            continue
        rows.append(Protocol(parts[0], parts[1], parts[3], parts[5].strip() if len(parts) > 5 else ""))
    return rows


def proto_name(vip: str) -> str:
    """The static protocol that holds ``vip``: vip_192_0_2_1, or vip6_2001_db8__1 for an IPv6 VIP
    (its RFC 5952 text; BIRD symbols cannot hold dots or colons)."""
    a = ipaddress.ip_address(vip)
    if a.version == 6:
        return "vip6_" + str(a).replace(":", "_")
    return "vip_" + str(a).replace(".", "_")


def render_include(known: dict[str, bool]) -> str:
    """The generated include: one static protocol per known VIP, enabled iff it is announced; an
    IPv6 VIP's /128 in an ipv6 channel (the BGP sessions need an ipv6 channel exporting
    RTS_STATIC to carry it: docs/scale-out.md)."""
    out = ["# Generated by vpn-director (director/dataplane/bgp.py): one protocol per VIP.\n"]
    for vip in sorted(known, key=lambda v: (ipaddress.ip_address(v).version, ipaddress.ip_address(v))):
        a = ipaddress.ip_address(vip)
        out.append(
            f"protocol static {proto_name(vip)} {{\n"
            f"    disabled {'no' if known[vip] else 'yes'};\n"
            f"    ipv{a.version};\n"
            f"    route {a}/{a.max_prefixlen} blackhole;\n"
            f"}}\n"
        )
    return "".join(out)


@dataclass
class BirdPlan:
    """What :meth:`Bird.apply` will do; empty when BIRD already announces the wanted set."""

    known: dict[str, bool]  # every VIP's protocol in the new include, True = announced
    reconfigure: bool  # the set of protocols changes: a `configure` is needed
    enable: list[str] = field(default_factory=list)
    disable: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.reconfigure or self.enable or self.disable)


class Bird:
    """One BIRD instance's control socket and the include file it reads the VIP protocols from.

    ``known`` VIPs are those the director serves (announced or not); ``plan``/``apply`` take the
    set to announce (from :func:`director.announce.announced`) and the set of known VIPs.
    """

    def __init__(self, socket_path: str | os.PathLike, include_path: str | os.PathLike,
                 timeout: float = 5.0) -> None:  # fmt: skip
        self.socket_path = str(socket_path)
        self.include_path = Path(include_path)
        self.timeout = timeout
        self.applied: dict[str, bool] = {}  # what BIRD runs, as last applied (empty: unknown)
        self.drift: set[str] = set()  # VIPs whose protocol BIRD runs otherwise than applied (last read)

    # -- the control socket -----------------------------------------------------------------------

    def command(self, cmd: str) -> Reply:
        """Send one command, return its reply; a BIRD error (8xxx/9xxx) raises BirdError."""
        reply = self._exchange(cmd)
        if not reply.ok:
            raise BirdError(f"bird: {cmd!r} -> {reply.code} {reply.text()}")
        return reply

    def _exchange(self, cmd: str) -> Reply:
        # One connection per command: BIRD serves each CLI connection in turn and these are rare
        # (a change of announcement, a status read), so no connection state to keep right.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.timeout)
            try:
                s.connect(self.socket_path)
            except OSError as e:
                raise BirdError(f"bird: cannot connect to {self.socket_path}: {e.strerror or e}") from None
            buf = ""
            welcome, buf = self._read(s, buf)
            if welcome.code != 1:
                raise BirdError(f"bird: unexpected greeting {welcome.code} {welcome.text()}")
            s.sendall(cmd.encode() + b"\n")
            reply, _ = self._read(s, buf)
            return reply

    @staticmethod
    def _read(s: socket.socket, buf: str) -> tuple[Reply, str]:
        while True:
            reply, rest = parse_reply(buf)
            if reply is not None:
                return reply, rest
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                raise BirdError("bird: no complete reply before the timeout") from None
            if not chunk:
                raise BirdError("bird: control socket closed mid-reply")
            buf += chunk.decode(errors="replace")

    # -- reading ----------------------------------------------------------------------------------

    def protocols(self) -> list[Protocol]:
        return parse_protocols(self.command("show protocols"))

    def sessions(self) -> dict[str, str]:
        """Each BGP protocol's session state by name (Established, Idle, Connect, Active, ...).

        The same reading also sets ``drift``: the VIPs whose static protocol BIRD runs otherwise
        than last applied (up where it should be down or the reverse, or missing): someone
        enabled, disabled or reconfigured BIRD behind the director's back, or BIRD restarted
        from another include."""
        protos = self.protocols()
        running = {p.name: p.state == "up" for p in protos}
        self.drift = {v for v, on in self.applied.items() if running.get(proto_name(v)) != on}
        return {p.name: p.bgp_state or p.state for p in protos if p.proto == "BGP"}

    def forget(self) -> None:
        """Take nothing BIRD runs for granted: the next plan rewrites the include and reconfigures."""
        self.applied = {}
        self.drift = set()

    def withdraw_all(self, known: set[str]) -> None:
        """At daemon start, before the dataplane is up: every known VIP's protocol disabled, in
        the include and (if BIRD runs) in BIRD. A route a previous run left announced (it
        crashed, so it never withdrew) goes now, not once the new run is ready; and a BIRD that
        starts after this reads nothing to announce. Raises BirdError if BIRD cannot be told (the
        include stays written: unlike ``apply``, nothing is restored)."""
        for vip in known:
            proto_name(vip)  # raises ValueError on a bad address, before anything changes
        self.applied = {}
        self._write(render_include({v: False for v in known}))
        self._configure()
        self.applied = {v: False for v in known}
        log.info("bgp.withdrawn_at_start vips=%s", ",".join(sorted(known)) or "-")

    def announcing(self) -> set[str]:
        """The VIPs whose static protocol is up in BIRD right now (read back, not remembered)."""
        names = {proto_name(v): v for v in self.applied}
        return {names[p.name] for p in self.protocols() if p.name in names and p.state == "up"}

    # -- changing ---------------------------------------------------------------------------------

    def plan(self, announce: set[str], known: set[str]) -> BirdPlan:
        """The whole change from what was applied to ``announce`` (a subset of ``known``)."""
        stray = announce - known
        if stray:
            raise ValueError(f"announce: VIPs not among the known ones: {sorted(stray)}")
        for vip in known:
            proto_name(vip)  # raises ValueError on a bad address, before anything changes
        wanted = {v: v in announce for v in known}
        reconfigure = set(wanted) != set(self.applied) or not self.include_path.exists()
        plan = BirdPlan(wanted, reconfigure)
        if not reconfigure:
            plan.enable = sorted(v for v, on in wanted.items() if on and not self.applied[v])
            plan.disable = sorted(v for v, on in wanted.items() if not on and self.applied[v])
        return plan

    def apply(self, plan: BirdPlan) -> None:
        """Write the include and make BIRD match it; on any refusal restore the previous state."""
        if plan.empty:
            return
        old_text = self.include_path.read_text() if self.include_path.exists() else None
        old_applied = dict(self.applied)
        self._write(render_include(plan.known))
        try:
            if plan.reconfigure:
                self._configure()
            else:
                for vip in plan.disable:
                    self._switch("disable", vip)
                for vip in plan.enable:
                    self._switch("enable", vip)
        except BirdError:
            log.warning("bgp.apply_failed restoring previous announcement")
            if old_text is None:
                self._write(render_include({}))
            else:
                self._write(old_text)
            try:
                self._configure()
            except BirdError as e:  # BIRD itself is gone: the next apply retries
                log.warning("bgp.restore_failed %s", e)
            self.applied = old_applied
            raise
        self.applied = dict(plan.known)
        log.info("bgp.applied announce=%s", ",".join(sorted(v for v, on in plan.known.items() if on)) or "-")

    def _write(self, text: str) -> None:
        tmp = self.include_path.with_name(self.include_path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.include_path)

    def _configure(self) -> None:
        reply = self.command("configure")
        # 0003 Reconfigured, 0004 in progress, 0005 queued, 0019/0020: nothing to do / OK; the
        # final line may be a bare 0000 after them.
        if not reply.codes & {3, 4, 5, 19, 20}:
            raise BirdError(f"bird: configure -> {reply.code} {reply.text()}")

    def _switch(self, verb: str, vip: str) -> None:
        reply = self.command(f"{verb} {proto_name(vip)}")
        # 0008 already disabled, 0009 disabled, 0010 already enabled, 0011 enabled (one line per
        # protocol, then a bare 0000)
        if not reply.codes & ({8, 9} if verb == "disable" else {10, 11}):
            raise BirdError(f"bird: {verb} {vip} -> {reply.code} {reply.text()}")
