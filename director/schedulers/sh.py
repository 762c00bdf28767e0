"""Source hashing (IPVS ``sh``): the client address picks one of 256 weighted buckets.

The same client always lands on the same server while the table is unchanged, even with no table
entry left (useful when a client returns after its state expired). Fallback on (IPVS's sh-fallback
flag, here the default): if the bucket's server is down, overloaded or quiesced, the next available
server walking forward through the buckets takes the client. Table and layout: see
``hashing.bucket_table``.
"""

from __future__ import annotations

from director.schedulers.base import register
from director.schedulers.hashing import SEED_SH, BucketHashScheduler


@register
class SourceHashScheduler(BucketHashScheduler):
    name = "sh"
    seed = SEED_SH

    def _key(self, client: int, vip: int) -> int:
        return client
