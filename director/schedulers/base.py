"""The scheduler interface, the RealServer record it reads, and the registry by name."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Sequence, TypeVar

from director.forwarding.method import Method


@dataclass(slots=True, eq=False)
class RealServer:
    """A real server as the schedulers and the table see it.

    ``id`` is the stable index the connection table stores (never the object). ``active`` counts
    ESTABLISHED entries and ``inactive`` INIT entries, kept up to date by the table, like IPVS's
    activeconns/inactconns. ``weight`` 0 means quiesced: no new clients, existing ones stay.
    ``up`` is False when a health check (or the operator) marks the server down.
    """

    id: int
    addr: int  # address as an int (IPv4 below 2**32, IPv6 above: director.packet)
    weight: int = 1
    active: int = 0
    inactive: int = 0
    up: bool = True
    method: Method | None = None  # None: the service's method
    u_threshold: int = 0  # 0 = no upper threshold (ipvsadm -x)
    l_threshold: int = 0  # 0 = no lower threshold (ipvsadm -y)
    overloaded: bool = False

    @property
    def available(self) -> bool:
        """May take a new client: up, weight > 0 and not above its upper threshold."""
        return self.up and self.weight > 0 and not self.overloaded

    def update_overload(self) -> None:
        """IPVS semantics: overloaded above u_threshold, cleared once below l_threshold."""
        conns = self.active + self.inactive
        if self.u_threshold and conns >= self.u_threshold:
            self.overloaded = True
        elif self.overloaded:
            low = self.l_threshold or (self.u_threshold * 3) // 4
            if not self.u_threshold or conns < low:
                self.overloaded = False


class Scheduler(ABC):
    """Chooses the real server for a new ISAKMP conversation; one instance per virtual service.

    The service calls ``update()`` whenever membership, a weight, or up/overloaded state changes.
    The scheduler keeps the servers it was given (live objects: ``active``/``inactive`` move between
    calls without ``update()``) and rebuilds its derived state in ``_rebuild()``. ``pick()`` only
    ever returns a server whose ``available`` is True at the time of the call, or None.
    Existing clients never come here: the table keeps them on their server (weight 0 included).
    """

    name: ClassVar[str]

    def __init__(self) -> None:
        self._servers: tuple[RealServer, ...] = ()

    @property
    def servers(self) -> tuple[RealServer, ...]:
        return self._servers

    def update(self, servers: Sequence[RealServer]) -> None:
        """Take the current server list (order kept) and rebuild derived state."""
        self._servers = tuple(servers)
        self._rebuild()

    def _rebuild(self) -> None:
        """Recompute derived state from ``self._servers``; stateless schedulers keep the default."""

    @abstractmethod
    def pick(self, client: int, vip: int, port: int = 0) -> RealServer | None:
        """The real server for a new conversation from ``client`` to ``vip`` (IPv4 as int).

        ``port`` is the client's UDP source port (500, or the NAT-T port its NAT chose); only
        schedulers that hash it (``mh`` with ``port``) read it.
        """

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} servers={[s.id for s in self._servers]}>"


SCHEDULERS: dict[str, type[Scheduler]] = {}

_S = TypeVar("_S", bound=type[Scheduler])


def register(cls: _S) -> _S:
    """Class decorator: make ``cls`` reachable by ``make_scheduler(cls.name)``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__} has no scheduler name")
    other = SCHEDULERS.get(name)
    if other is not None and other is not cls:
        raise ValueError(f"scheduler name {name!r} already taken by {other.__qualname__}")
    SCHEDULERS[name] = cls
    return cls


def scheduler_options(cls: type[Scheduler]) -> tuple[str, ...]:
    """The keyword options a scheduler's constructor accepts, in declaration order."""
    params = inspect.signature(cls.__init__).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def make_scheduler(name: str, **options: object) -> Scheduler:
    """A new, empty scheduler by name; unknown names and options raise ValueError.

    Option values are checked by the scheduler itself, which raises ValueError for bad ones.
    """
    cls = SCHEDULERS.get(name)
    if cls is None:
        known = ", ".join(sorted(SCHEDULERS))
        raise ValueError(f"unknown scheduler {name!r} (known: {known})")
    accepted = scheduler_options(cls)
    for opt in options:
        if opt not in accepted:
            hint = ", ".join(accepted) if accepted else "none"
            raise ValueError(f"scheduler {name!r} has no option {opt!r} (options: {hint})")
    return cls(**options)


def check_int_option(scheduler: str, option: str, value: object, minimum: int) -> int:
    """Validate an integer option (bool is not an int here) and return it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"scheduler {scheduler!r}: option {option!r} must be an integer, got {value!r}"
        )
    if value < minimum:
        raise ValueError(
            f"scheduler {scheduler!r}: option {option!r} must be >= {minimum}, got {value}"
        )
    return value


def check_bool_option(scheduler: str, option: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(
            f"scheduler {scheduler!r}: option {option!r} must be true or false, got {value!r}"
        )
    return value
