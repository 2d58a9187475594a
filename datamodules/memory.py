"""`MemoryLRU`: values kept in memory up to a number of MB, the least recently used dropped first.

The one bounded store behind the loaders' in-memory caches (`samples.ClipCache`: decoded clips;
`shards.ShardCache`: read shards). It lives in the process that fills it: with `num_workers: 0` the training
process, for the whole run; a loader's workers are restarted every epoch, and their caches with them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Any


class MemoryLRU:
    """entries[key] = value with its size in bytes; `bytes` <= max_mb · 2²⁰ after every `put`."""

    def __init__(self, max_mb: float) -> None:
        self.max_bytes = int(max_mb * 2**20)
        self.entries: OrderedDict[Hashable, Any] = OrderedDict()
        self.sizes: dict[Hashable, int] = {}
        self.bytes = self.hits = self.misses = 0

    def get(self, key: Hashable) -> Any | None:
        """The value of `key` (now the most recently used), or None; counts a hit or a miss."""
        if key not in self.entries:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return self.entries[key]

    def put(self, key: Hashable, value: Any, size: int) -> None:
        """Keep `value`, then drop the least recently used entries until the total fits; a value larger than
        the whole budget is not kept."""
        if size > self.max_bytes:
            return
        self.entries[key], self.sizes[key] = value, size
        self.bytes += size
        while self.bytes > self.max_bytes:
            old, _ = self.entries.popitem(last=False)
            self.bytes -= self.sizes.pop(old)
