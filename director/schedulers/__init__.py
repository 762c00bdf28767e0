"""Schedulers by name: importing this package registers every one of them.

``make_scheduler("wlc")`` builds one; ``SCHEDULERS`` lists them. See ``base.Scheduler`` for the
interface and each module for its algorithm (IPVS semantics unless the module says otherwise).
"""

from director.schedulers import dh, fo, lc, mh, nq, ovf, rr, sed, sh, twos, wlc, wrr  # noqa: F401  (registration)
from director.schedulers.base import SCHEDULERS, RealServer, Scheduler, make_scheduler

__all__ = ["RealServer", "SCHEDULERS", "Scheduler", "make_scheduler"]
