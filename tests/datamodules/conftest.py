"""Fixtures: a tiny synthetic world generated once per test session."""

from __future__ import annotations

import pytest

from datamodules.write_shards import ensure_world

TINY_WORLD = dict(scenes=[12, 4], images=[8, 4], identities=2, clips_per_identity=[2, 1], edits=[6, 2],
                  stickers=[4, 2], shard_size=4, sizes=[[32, 32], [32, 48]], durations=[1.0, 2.0])


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory):
    """(data_dir, world overrides, world folder) of a tiny generated world."""
    data_dir = tmp_path_factory.mktemp("data")
    return data_dir, TINY_WORLD, ensure_world(data_dir, TINY_WORLD, progress=False)
