"""Route health injection, glued: the pure decision (director/announce.py) applied by a BGP speaker.

:class:`RouteInjector` is what the daemon calls after anything that can change an announcement
(a health change, a drain, a reload, the dataplane going up or down, shutdown). It decides,
applies only when the wanted set differs from what the speaker runs (or the last attempt
failed), and never raises for a speaker that refuses or is unreachable: the error is kept for
views and logs, the previous announcement stays, and the next ``update`` retries. The speaker is
injected (``director/dataplane/bgp.py``'s ``Bird``, or anything with its three methods).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

from director.announce import Announcement, DirectorState, ServiceState, Withdrawn, decide
from director.dataplane.bgp import BirdError

log = logging.getLogger(__name__)

__all__ = ["RouteInjector", "Speaker", "VipStatus"]


class Speaker(Protocol):
    def plan(self, announce: set[str], known: set[str]) -> Any: ...

    def apply(self, plan: Any) -> None: ...

    def sessions(self) -> dict[str, str]: ...


@dataclass(frozen=True, slots=True)
class VipStatus:
    """One VIP for views: whether it is wanted, whether the speaker runs it, and why not."""

    vip: str
    wanted: bool
    announced: bool  # as last applied successfully
    reason: Withdrawn | None  # why it is not wanted (None when wanted)


class RouteInjector:
    def __init__(self, speaker: Speaker) -> None:
        self.speaker = speaker
        self.decision: Announcement | None = None
        self.applied: tuple[frozenset[str], frozenset[str]] | None = None  # (announced, known)
        self.error: str | None = None
        self.session_states: dict[str, str] = {}  # as last read by sessions()
        self.drifts = 0  # times the speaker was found running something else than applied

    def update(self, director: DirectorState, services: list[ServiceState]) -> Announcement:
        """Decide and, if that changes what the speaker runs, apply; returns the decision."""
        decision = decide(director, services)
        self.decision = decision
        wanted = (decision.announce, decision.known)
        if wanted == self.applied and self.error is None:
            return decision
        try:
            self.speaker.apply(self.speaker.plan(set(decision.announce), set(decision.known)))
        except (BirdError, OSError) as e:
            if self.error != str(e):
                log.warning("route_injection.apply_failed %s", e)
            self.error = str(e)
            return decision
        if self.error is not None:
            log.info("route_injection.recovered")
        self.error = None
        self.applied = wanted
        withdrawn = ",".join(f"{v}:{r.name}" for v, r in sorted(decision.withdrawn.items())) or "-"
        log.info("route_injection.applied announce=%s withdrawn=%s",
                 ",".join(sorted(decision.announce)) or "-", withdrawn)  # fmt: skip
        return decision

    def status(self) -> list[VipStatus]:
        """Every known VIP (wanted or last applied), sorted."""
        if self.decision is None:
            return []
        announced = self.applied[0] if self.applied else frozenset()
        known = self.decision.known | (self.applied[1] if self.applied else frozenset())
        return [
            VipStatus(vip, vip in self.decision.announce, vip in announced, self.decision.withdrawn.get(vip))
            for vip in sorted(known)
        ]

    def sessions(self) -> dict[str, str]:
        """BGP session states by peer (empty, with ``error`` set, when the speaker cannot say).

        A speaker that reports ``drift`` (it runs some VIP otherwise than applied: BIRD
        restarted, or an operator's ``birdc enable/disable/configure``) is re-applied in full by
        the next ``update``: the director's decision wins within one tick."""
        try:
            self.session_states = self.speaker.sessions()
        except (BirdError, OSError) as e:
            self.error = str(e)
            self.session_states = {}
            return self.session_states
        drift = getattr(self.speaker, "drift", None)
        if drift:
            log.warning("route_injection.drift vips=%s (re-applying)", ",".join(sorted(drift)))
            self.drifts += 1
            self.speaker.forget()
            self.applied = None
        return self.session_states
