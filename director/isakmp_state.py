"""The two-state ISAKMP entry: states, events, the one transition table, and timeouts.

An entry follows one ISAKMP/IKE conversation (the rules that move it: director/core.py):

    (none) --INITIAL--> INIT --RESPONDER_SEEN--> ESTABLISHED
                        |  ^                      |  ^
                        |  +--INITIAL / REPLY     |  +--RESPONDER_SEEN / REPLY / INITIAL
                        +--EXPIRE/REMOVE--> FREE  +--EXPIRE/REMOVE--> FREE

INIT is the state of a conversation whose responder cookie/SPI the initiator has not yet echoed: it
has a short timeout so a spoofed IKE flood cannot fill the table. It survives IKEv2 COOKIE and
INVALID_KE_PAYLOAD retries (the client resends IKE_SA_INIT with the responder SPI still zero).
ESTABLISHED starts when the initiator sends the same initiator cookie with a non-zero responder
cookie; its timeout must outlive the rekey interval. Everything here is pure: time is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class State(IntEnum):
    FREE = 0  # slot unused (table-internal)
    INIT = 1
    ESTABLISHED = 2


class Event(IntEnum):
    INITIAL = 1  # client packet, known initiator cookie, responder cookie zero (retransmit or retry)
    RESPONDER_SEEN = 2  # client packet carrying a non-zero responder cookie
    REPLY = 3  # NAT mode: the real server's reply passed the director (records its responder SPI)
    EXPIRE = 4  # idle timeout ran out
    REMOVE = 5  # operator, real server removal, or drop-entry reclaim


TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.FREE, Event.INITIAL): State.INIT,
    (State.INIT, Event.INITIAL): State.INIT,
    (State.INIT, Event.REPLY): State.INIT,
    (State.INIT, Event.RESPONDER_SEEN): State.ESTABLISHED,
    (State.INIT, Event.EXPIRE): State.FREE,
    (State.INIT, Event.REMOVE): State.FREE,
    # A late retransmit of the first message never downgrades an established conversation.
    (State.ESTABLISHED, Event.INITIAL): State.ESTABLISHED,
    (State.ESTABLISHED, Event.REPLY): State.ESTABLISHED,
    (State.ESTABLISHED, Event.RESPONDER_SEEN): State.ESTABLISHED,
    (State.ESTABLISHED, Event.EXPIRE): State.FREE,
    (State.ESTABLISHED, Event.REMOVE): State.FREE,
}


class IllegalTransition(ValueError):
    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"illegal transition: {state.name} on {event.name}")
        self.state = state
        self.event = event


# TRANSITIONS as a list of lists indexed by plain ints: the same table, four times cheaper to read
# on the per-packet path than a dict keyed by enum pairs (measured by bench/bench_core.py).
_NEXT: list[list[State | None]] = [[None] * (max(Event) + 1) for _ in range(max(State) + 1)]
for (_s, _e), _n in TRANSITIONS.items():
    _NEXT[_s][_e] = _n


def transition(state: int, event: int) -> State:
    """The only place a state changes: look the pair up in TRANSITIONS or refuse it."""
    nxt = _NEXT[state][event] if 0 <= state < len(_NEXT) and 0 <= event < len(_NEXT[0]) else None
    if nxt is None:
        raise IllegalTransition(State(state), Event(event))
    return nxt


# strongSwan's default IKE SA rekey_time is 4 h (swanctl.conf); the ESTABLISHED idle timeout must
# outlive it, or an idle tunnel's rekey arrives after its entry is gone.
DEFAULT_INIT_TIMEOUT = 30.0
DEFAULT_ESTABLISHED_TIMEOUT = 4.5 * 3600.0


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-service idle timeouts in seconds; any IKE packet (and ESP) of the entry refreshes it."""

    init: float = DEFAULT_INIT_TIMEOUT
    established: float = DEFAULT_ESTABLISHED_TIMEOUT

    def __post_init__(self) -> None:
        if not self.init > 0:
            raise ValueError(f"timeouts.init: must be > 0, got {self.init}")
        if not self.established > 0:
            raise ValueError(f"timeouts.established: must be > 0, got {self.established}")

    def for_state(self, state: int) -> float:
        return self.established if state == State.ESTABLISHED else self.init
