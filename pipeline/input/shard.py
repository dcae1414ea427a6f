"""Which lines a shard runs: those whose id hashes to it.

`--shard K/N` (K from 1 to N) runs the lines whose `custom_id` hashes to K, by a hash that is
the same on every machine and Python version (BLAKE2b, not Python's salted `hash`). A line
without an id is sharded by the id derived from its bytes, before the `-n` of its copies, so
identical lines land together and number their copies alike everywhere. A line that cannot
be read is reported by shard 1 only, so that each appears once across the shards.
"""

from __future__ import annotations

import hashlib
import re
from typing import NamedTuple

from pipeline.errors import SettingsError


class Shard(NamedTuple):  # (as a frozen dataclass, 2.8 million instructions more of every start)
    k: int  # from 1
    n: int

    @property
    def folder(self) -> str:
        return f"shard-{self.k}-of-{self.n}"

    @property
    def reports_bad_lines(self) -> bool:
        return self.k == 1

    def owns(self, key: str) -> bool:
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.n == self.k - 1

    def __str__(self) -> str:
        return f"{self.k}/{self.n}"


def parse_shard(text: str) -> Shard:
    """`K/N`, as Jest and Playwright write it: shard K of N, K from 1."""
    found = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not found:
        raise SettingsError(f"shard {text!r} is not K/N (such as 2/4: the second of four shards)")
    k, n = int(found.group(1)), int(found.group(2))
    if not 1 <= k <= n:
        raise SettingsError(f"shard {text!r}: K must be from 1 to N (1/{n} to {n}/{n})")
    return Shard(k, n)
