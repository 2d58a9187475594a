"""Splitting a shard list over nodes, ranks and workers: the seeded shard schedule of each slot, the default
epoch length, and the process's rank and world size.

Shard schedule: the endless sequence P_0 P_1 P_2 ... of permutations of the shard list, P_p seeded by
(seed, epoch, p) (identity order when shuffle is off). Slot s = rank * W + worker of S = world * W slots
reads positions s, s + S, s + 2S, ... of that sequence. Within one pass every shard goes to exactly one slot,
so ranks and workers read disjoint samples as long as an epoch does not outrun a pass; when a slot's share
is used up it continues with the next pass (a resampled stream), never stalls, and fewer shards than slots is
fine (but then slots share shards: use at least world x workers shards for disjoint samples). `epoch_batches`
gives the default epoch length: the longest for which no worker outruns its share of a pass.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch


def mix_seed(*parts: Any) -> int:
    """A 64-bit seed from any tuple of ints/strings: blake2b(repr(parts))."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def shard_schedule(
    num_shards: int, seed: int, epoch: int, slot: int, num_slots: int, shuffle: bool
) -> Iterator[tuple[int, int]]:
    """Endless (pass, shard index) for one slot: positions slot, slot + S, ... of P_0 P_1 ... (see module doc)."""
    position = slot
    cached: tuple[int, list[int]] = (-1, [])
    while True:
        pass_index, offset = divmod(position, num_shards)
        if cached[0] != pass_index:
            order = list(range(num_shards))
            if shuffle:
                random.Random(mix_seed(seed, epoch, pass_index, "shards")).shuffle(order)
            cached = (pass_index, order)
        yield pass_index, cached[1][offset]
        position += num_slots


def epoch_batches(counts: Sequence[int], world: int, workers: int, batch_size: float, weight: float = 1.0) -> int:
    """Default batches per rank per epoch so that no worker outruns its share of a pass (samples disjoint).

    With S = world * workers slots and n >= S shards, the worst-placed slot gets the floor(n / S) smallest
    shards, m samples, and can fill floor(m / batch_size) batches; a rank then yields workers times that,
    divided by the source's share of batches (`weight`). With fewer shards than slots: one pass over the
    ranks, floor(sum(counts) / (world * batch_size * weight)). At least 1.
    """
    slots = world * max(1, workers)
    if len(counts) >= slots:
        share = sum(sorted(counts)[: len(counts) // slots])
        batches = max(1, workers) * math.floor(share / batch_size) / weight
    else:
        batches = sum(counts) / (world * batch_size * weight)
    return max(1, math.floor(batches))


def dist_info() -> tuple[int, int]:
    """(rank, world size) from torch.distributed if initialised, else RANK / WORLD_SIZE (default 0 / 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
