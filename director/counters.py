"""The one read model of packet and byte counters: user space's decisions plus the kernel's. Pure.

Two places forward a client's packets. The core (director.core) counts what it decides, per
service by (verdict, kind) and per real server by (direction, kind), and the new conversations
it gives each real server. The eBPF fast path forwards established clients' ESP, AH and
ESP-in-UDP in the kernel; those packets never reach user space and are counted in the pinned
``rs_stats`` map, per real server by kind (docs/fastpath.md). Every reader (vpnadm ``--stats``
and ``--rate``, the control API, Prometheus) reads :meth:`Counters.totals`, which adds the
kernel's per-server counts to the core's: to the server's "in" direction and to its service's
FORWARD verdict. The kernel keeps no per-service counter: a real server belongs to one service,
so its service's figure is the sum of its servers'. NAT replies rewritten in the kernel are
counted there in one total only (``replies`` of ``dp_stats``), not per server.

The kernel's counters outlive the daemon (pinned maps) and a real server's id can be given
again after it was removed, so they count from a baseline: taken when the fast path is attached,
when a real server appears, and when the operator zeroes counters (``vpnadm -Z``).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Callable, Iterable

from director.core import NK, RS_CONNS, Action, Director, rs_counter, svc_counter

#: What the kernel reports: real server id -> {"packets": [by Kind], "bytes": [by Kind]}.
KernelCounts = dict[int, dict[str, list[int]]]

IPVS_COLUMNS = ("conns", "inpkts", "outpkts", "inbytes", "outbytes")  # ipvsadm --stats, in its order
_IN = [(rs_counter(False, k), rs_counter(False, k, True)) for k in range(NK)]
_OUT = [(rs_counter(True, k), rs_counter(True, k, True)) for k in range(NK)]
_FWD = [(svc_counter(Action.FORWARD, k), svc_counter(Action.FORWARD, k, True)) for k in range(NK)]


def ipvs_stats(r: array) -> dict[str, int]:
    """A real server's totals (laid out as core.rs_counter says) as ipvsadm's --stats columns."""
    return {
        "conns": r[RS_CONNS],
        "inpkts": sum(r[p] for p, _ in _IN),
        "outpkts": sum(r[p] for p, _ in _OUT),
        "inbytes": sum(r[b] for _, b in _IN),
        "outbytes": sum(r[b] for _, b in _OUT),
    }


@dataclass(frozen=True, slots=True)
class Totals:
    """One reading of every counter. ``servers[rs_id]`` is laid out as ``core.rs_counter`` says,
    ``services[svc_id]`` as ``core.svc_counter`` says; both already include the kernel's."""

    servers: dict[int, array]
    services: dict[int, array]

    def server_stats(self, rs_id: int) -> dict[str, int]:
        return ipvs_stats(self.servers[rs_id])


class Counters:
    """Reads the core's counters and (once a fast path is attached) the kernel's, and adds them.

    ``kernel`` is a callable returning :data:`KernelCounts` (``FastPath.rs_stats``), injected so
    the read model is tested without a kernel. All calls come from one thread at a time (the
    daemon's loop, or a metrics scrape holding the views' lock).
    """

    def __init__(self, director: Director, kernel: Callable[[], KernelCounts] | None = None) -> None:
        self.director = director
        self.kernel = kernel
        self._base: dict[int, tuple[list[int], list[int]]] = {}  # rs_id -> kernel (packets, bytes) at baseline
        self._known: set[int] = self._server_ids()

    def _server_ids(self) -> set[int]:
        return {rs for svc in self.director.services.values() for rs in svc.servers}

    def _read_kernel(self) -> KernelCounts:
        return self.kernel() if self.kernel is not None else {}

    def attach(self, kernel: Callable[[], KernelCounts]) -> None:
        """A fast path started: what its maps counted before (a previous daemon's run) is not ours."""
        self.kernel = kernel
        self.rebase()

    def rebase(self, rs_ids: Iterable[int] | None = None) -> None:
        """The kernel's counts so far for these real servers (None: all) no longer count."""
        k = self._read_kernel()
        for rs_id in self._server_ids() if rs_ids is None else rs_ids:
            c = k.get(rs_id)
            self._base[rs_id] = (list(c["packets"]), list(c["bytes"])) if c else ([0] * NK, [0] * NK)

    def servers_changed(self) -> None:
        """After a config change: a new real server counts the kernel from now (its id may have been
        another server's); a removed one is forgotten."""
        now = self._server_ids()
        if self.kernel is not None and now - self._known:
            self.rebase(now - self._known)
        for gone in self._known - now:
            self._base.pop(gone, None)
        self._known = now

    def zeroed(self, rs_ids: Iterable[int]) -> None:
        """The core zeroed these servers' counters (vpnadm -Z): the kernel's count from zero too."""
        if self.kernel is not None:
            self.rebase(rs_ids)

    def totals(self) -> Totals:
        d = self.director
        kernel = self._read_kernel()
        servers: dict[int, array] = {}
        services: dict[int, array] = {}
        for svc in d.services.values():
            s = array("Q", d.svc_counters[svc.id])
            for rs_id in svc.servers:
                r = array("Q", d.rs_counters[rs_id])
                k = kernel.get(rs_id)
                if k is not None:
                    base_p, base_b = self._base.get(rs_id, ((0,) * NK, (0,) * NK))
                    kp, kb = k["packets"], k["bytes"]
                    for kind in range(min(NK, len(kp))):
                        dp = max(0, kp[kind] - base_p[kind])
                        db = max(0, kb[kind] - base_b[kind])
                        if dp or db:
                            (ip, ib), (fp, fb) = _IN[kind], _FWD[kind]
                            r[ip] += dp
                            r[ib] += db
                            s[fp] += dp
                            s[fb] += db
                servers[rs_id] = r
            services[svc.id] = s
        return Totals(servers, services)
