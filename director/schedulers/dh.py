"""Destination hashing (IPVS ``dh``): the VIP picks one of 256 weighted buckets.

With one VIP per service every new client goes to the same server; dh is meant for services that
span many destination addresses (IPVS's cache clusters). Same table and forward-walking fallback as
``sh`` (default on here; plain IPVS dh has no fallback and returns no server, ``fallback=False``).
"""

from __future__ import annotations

from director.schedulers.base import register
from director.schedulers.hashing import SEED_DH, BucketHashScheduler


@register
class DestinationHashScheduler(BucketHashScheduler):
    name = "dh"
    seed = SEED_DH

    def _key(self, client: int, vip: int) -> int:
        return vip
