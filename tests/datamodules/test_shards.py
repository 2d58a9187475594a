"""The shard pipeline on real tar shards: URL kinds, no unpickling, bad samples, buckets, mixing, seeds, resume."""

from __future__ import annotations

import functools
import http.server
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.audio import AudioDataModule
from datamodules.shards import ShardCache, ShardReadError, expand_shards, read_shard
from datamodules.stream_dataset import BadDataError
from datamodules.stream_loader import convert_batch
from datamodules.video import AudioVideoDataModule, VideoDataModule
from datamodules.write_shards import ShardSink
from tests.datamodules.helpers import good_shards, video_sample, write_tar


def test_shards_round_trip_through_paths_braces_pipes_and_http(tmp_path):
    samples = [video_sample(f"k{i}", i) for i in range(7)]
    sink = ShardSink(tmp_path / "set", maxcount=3)
    for sample in samples:
        sink.write(sample)
    index = sink.close()
    assert [s["num_samples"] for s in index["shards"]] == [3, 3, 1] and index["num_samples"] == 7
    urls = expand_shards(tmp_path / "set")
    assert urls == expand_shards(str(tmp_path / "set" / "shard-{000000..000002}.tar"))
    read = [s for url in urls for s in read_shard(url)]
    assert [s["__key__"] for s in read] == [f"k{i}" for i in range(7)]
    with tarfile.open(urls[0]) as tar:  # plain ustar members: a pax header each would double the reading time
        assert all(m.mtime == 0 and not m.pax_headers for m in tar.getmembers())
    assert all(r["mp4"] == s["mp4"] and r["wav"] == s["wav"] for r, s in zip(read, samples))
    assert [s["__key__"] for s in read_shard(f"pipe:cat {urls[0]}")] == ["k0", "k1", "k2"]
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "set"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/shard-000001.tar"
        assert [s["__key__"] for s in read_shard(url)] == ["k3", "k4", "k5"]
    finally:
        server.shutdown()


def test_batches_convert_arrays_and_pass_the_json_metadata_through():
    meta = [{"objects": [{"track": [[0.5, 0.5]], "motion": "still"}]}]
    batch = convert_batch({"video": np.zeros((1, 3, 2, 4, 4), np.uint8), "fps": [np.float32(8.0)], "meta": meta})
    assert isinstance(batch["video"], torch.Tensor) and batch["video"].dtype == torch.uint8
    assert isinstance(batch["fps"][0], torch.Tensor)
    assert batch["meta"] is meta


class _Trap:
    """Unpickling this touches a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_shard_data_is_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    sample = video_sample("trap", 0)
    sample["pyd"] = pickle.dumps(_Trap(marker))
    sample["pickle"] = sample["pyd"]
    shard = write_tar(tmp_path / "trap.tar", [sample, video_sample("ok", 1)])
    read = list(read_shard(str(shard)))
    assert "pyd" not in read[0] and "pickle" not in read[0]
    dm = VideoDataModule(shards=[str(shard)], frames=[8], sizes=[[32, 32]], batch_size=2, num_workers=0,
                         epoch_batches=2)
    dm.setup()
    batches = list(dm.train_dataloader())
    assert len(batches) == 2 and not marker.exists()


def test_missing_shard_fails_before_training_naming_it(tmp_path):
    shards = good_shards(tmp_path, 1, 2)
    missing = str(tmp_path / "nope-000001.tar")
    dm = VideoDataModule(shards=shards + [missing], num_workers=0)
    with pytest.raises(FileNotFoundError, match="nope-000001.tar"):
        dm.setup("fit")


def _cut_inside_last_member(path: Path) -> Path:
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    data = path.read_bytes()
    path.write_bytes(data[: last.offset_data + last.size // 2])
    return path


def _corrupt_shards(folder: Path) -> list[str]:
    """Shard A: a0..a3 then a cut-off sample; shard B: good b0..b3 between every kind of bad sample."""
    first = write_tar(folder / "a.tar", [video_sample(f"a{i}", i) for i in range(4)] + [video_sample("cut", 9)])
    _cut_inside_last_member(first)
    garbage = b"\x00\x01not an mp4" * 100
    corrupt_with_json = video_sample("corrupt_json", 20)
    corrupt_with_json["mp4"] = garbage  # json says fine: fails at decode time
    corrupt_no_json = video_sample("corrupt_probe", 21, meta=False)
    corrupt_no_json["mp4"] = garbage  # fails at the container probe
    empty = video_sample("empty_mp4", 22, meta=False)
    empty["mp4"] = b""
    zero_meta = video_sample("zero_frames", 23)
    zero_meta["json"]["num_frames"] = 0
    second = write_tar(folder / "b.tar", [
        corrupt_with_json, video_sample("b0", 10), corrupt_no_json, video_sample("nocap", 24, caption=False),
        video_sample("b1", 11), empty, zero_meta, video_sample("short", 25, frames=4), video_sample("b2", 12),
        video_sample("b3", 13),
    ])
    return [str(first), str(second)]


def test_each_kind_of_bad_input_is_skipped_and_counted(tmp_path):
    shards = _corrupt_shards(tmp_path)
    dm = VideoDataModule(shards=shards, val_shards=shards, frames=[8], sizes=[[32, 32]], batch_size=2,
                         num_workers=0, val_batches=4, max_bad_fraction=1.0)
    dm.setup()
    loader = dm.val_dataloader()  # unshuffled: reads a.tar then b.tar once
    keys = [k for batch in loader for k in batch["key"]]
    assert keys == ["a0", "a1", "a2", "a3", "b0", "b1", "b2", "b3"]
    m = loader.metrics()
    assert m["data/skipped/bad_shard"] == 1  # the truncated tar
    assert m["data/skipped/undecodable"] == 2  # corrupt mp4, at decode and at probe
    assert m["data/skipped/no_caption"] == 1
    assert m["data/skipped/zero_length"] == 2  # empty mp4 and a clip of 0 frames
    assert m["data/skipped/too_short"] == 1 and m["data/filtered"] == 1
    assert m["data/bad"] == 6 and m["data/seen"] == 4 + 1 + 10
    assert m["data/skipped"] == 7


def test_filtered_samples_never_trip_the_bad_data_stop(tmp_path):
    """Twelve too-short clips in a row are filtered, not bad: with min_samples=4 and max_bad_fraction=5% the run
    reads on; twelve undecodable clips in the same places stop it (so the stop rule is live at these settings)."""
    good = [video_sample(f"g{i}", i) for i in range(8)]
    short = [video_sample(f"short{i}", 30 + i, frames=4) for i in range(12)]
    broken = [{**video_sample(f"broken{i}", 50 + i), "mp4": b"\x00not an mp4" * 50} for i in range(12)]

    def loader(samples: list[dict], name: str):
        shard = str(write_tar(tmp_path / name, samples))
        dm = VideoDataModule(shards=[shard], val_shards=[shard], frames=[8], sizes=[[32, 32]], batch_size=2,
                             num_workers=0, val_batches=4, max_bad_fraction=0.05, min_samples=4)
        dm.setup()
        return dm.val_dataloader()

    filtered = loader(short + good, "short.tar")
    assert [k for batch in filtered for k in batch["key"]] == [f"g{i}" for i in range(8)]
    m = filtered.metrics()
    assert m["data/filtered"] == 12 and m["data/skipped/too_short"] == 12 and m["data/bad"] == 0
    with pytest.raises(BadDataError, match="broken"):
        list(loader(broken + good, "broken.tar"))


def test_undecodable_audio_is_skipped_and_counted(tmp_path):
    bad = video_sample("badaudio", 5)
    bad["wav"] = b"RIFF\x00\x00garbage" * 20
    shard = write_tar(tmp_path / "av.tar", [video_sample("g0", 0), bad, video_sample("g1", 1)])
    av_dm = AudioVideoDataModule(shards=[str(shard)], val_shards=[str(shard)], frames=[8], sizes=[[32, 32]],
                                 batch_size=2, num_workers=0, val_batches=1, max_bad_fraction=1.0, sample_rate=8000)
    av_dm.setup()
    batch = next(iter(av_dm.val_dataloader()))
    assert batch["key"] == ["g0", "g1"] and batch["audio"].shape == (2, 1, 8000) and batch["sample_rate"] == 8000
    assert av_dm.val_dataloader().metrics()["data/skipped/undecodable_audio"] == 1
    audio_dm = AudioDataModule(shards=[str(shard)], val_shards=[str(shard)], durations=[0.5], batch_size=2,
                               num_workers=0, val_batches=1, max_bad_fraction=1.0, sample_rate=8000)
    audio_dm.setup()
    batch = next(iter(audio_dm.val_dataloader()))
    assert batch["key"] == ["g0", "g1"] and batch["audio"].shape == (2, 1, 4000)
    assert audio_dm.val_dataloader().metrics()["data/skipped/undecodable_audio"] == 1


def test_too_many_bad_samples_stop_the_run_naming_shard_and_key(tmp_path):
    shards = _corrupt_shards(tmp_path)
    dm = VideoDataModule(shards=shards, frames=[8], sizes=[[32, 32]], batch_size=2, num_workers=2,
                         epoch_batches=20, max_bad_fraction=0.2, min_samples=4)
    dm.setup()
    with pytest.raises(BadDataError) as error:
        list(dm.train_dataloader())
    message = str(error.value)
    assert "max_bad_fraction=20.0%" in message
    assert any(f"shard {s}" in message for s in shards)
    assert any(f"key {k}" in message for k in ("corrupt_json", "corrupt_probe", "nocap", "empty_mp4",
                                               "zero_frames", "cut", "None"))


def test_buckets_never_mix_shapes_and_have_their_batch_sizes(tmp_path):
    shapes = [(32, 32, 8), (32, 48, 8), (48, 32, 16), (32, 32, 16), (32, 40, 12), (40, 32, 9)]
    samples = [video_sample(f"v{i}", i, height=h, width=w, frames=t) for i, (h, w, t) in enumerate(shapes * 4)]
    shard_a = write_tar(tmp_path / "a.tar", samples[::2])
    shard_b = write_tar(tmp_path / "b.tar", samples[1::2])
    dm = VideoDataModule(shards=[str(shard_a), str(shard_b)], sizes=[[32, 32], [32, 48], [48, 32]],
                         frames=[8, 16], batch_size=1, max_batch_size=2, num_workers=2, epoch_batches=10)
    dm.setup()
    loader = dm.train_dataloader()
    table = dm.table([8, 16])
    source = {s["__key__"]: s["json"] for s in samples}
    seen_buckets = set()
    for batch in loader:
        b, c, t, h, w = batch["video"].shape
        bucket = table.pick(w, h, t)
        seen_buckets.add(bucket.name)
        assert b == bucket.batch_size and (bucket.height, bucket.width, bucket.frames) == (h, w, t)
        for key in batch["key"]:  # each sample's own size and length map to this batch's bucket
            meta = source[key]
            assert table.pick(meta["width"], meta["height"], meta["num_frames"]) == bucket
    assert len(seen_buckets) >= 3
    assert {b.batch_size for b in table.buckets.values()} == {1, 2}  # 16-frame buckets 1, 8-frame buckets 2


def test_validation_keeps_its_own_batch_size(tmp_path):
    samples = [video_sample(f"v{i}", i, height=32, width=32, frames=8) for i in range(24)]
    shard = str(write_tar(tmp_path / "a.tar", samples))
    dm = VideoDataModule(shards=shard, val_shards=shard, sizes=[[32, 32]], frames=[8], batch_size=5,
                         batch_sizes={"32x32x8": 3}, val_batch_size=8, num_workers=0, epoch_batches=4)
    dm.setup()
    assert {b["video"].shape[0] for b in dm.train_dataloader()} == {3}  # batch_sizes still rule training
    val = list(dm.val_dataloader())
    assert [b["video"].shape[0] for b in val] == [8, 8, 8]  # one pass over the 24 clips in batches of 8
    assert sorted(k for b in val for k in b["key"]) == sorted(s["__key__"] for s in samples)
    assert dm.test_dataloader() is dm.val_dataloader()


def test_images_mix_in_at_the_configured_ratio(world_dir):
    data_dir, world, _ = world_dir
    dm = VideoDataModule(data_dir=data_dir, world=world, sizes=[[32, 32], [32, 48]], frames=[8], batch_size=2,
                         num_workers=0, image_ratio=0.3, epoch_batches=60)
    dm.setup()
    batches = list(dm.train_dataloader())
    image = [b["video"].shape[2] == 1 for b in batches]
    assert 0.15 <= sum(image) / len(image) <= 0.45
    for batch in batches:
        is_image = batch["video"].shape[2] == 1
        assert all(k.startswith("images-" if is_image else "scenes-") for k in batch["key"])
        assert (batch["fps"] == 0).all() == is_image


def _run(loader, epochs: int = 1) -> list[tuple[list[str], float]]:
    return [(b["key"], float(b["video"].sum())) for _ in range(epochs) for b in loader]


def test_stream_is_seeded_by_seed_and_epoch(tmp_path):
    shards = good_shards(tmp_path, 4, 4)
    make = lambda seed: VideoDataModule(shards=shards, frames=[8], sizes=[[32, 32]], batch_size=2,
                                        num_workers=2, seed=seed, shuffle_buffer=4)
    first, second, other = make(0), make(0), make(1)
    for dm in (first, second, other):
        dm.setup()
    a, b = _run(first.train_dataloader(), 2), _run(second.train_dataloader(), 2)
    assert a == b  # same seed: same keys and the same crops
    assert [k for k, _ in a[:8]] != [k for k, _ in a[8:]]  # epochs differ
    assert [k for k, _ in _run(other.train_dataloader())] != [k for k, _ in a[:8]]
    assert sorted(k for keys, _ in a[:8] for k in keys) == sorted(f"s{s}-{i}" for s in range(4) for i in range(4))


def test_shard_cache_reads_each_shard_from_disk_once(tmp_path):
    urls = good_shards(tmp_path, 3, 2)
    cache = ShardCache(max_mb=16)
    first = [s for url in urls for s in cache.read(url)]
    assert cache.misses == 3 and cache.hits == 0
    first[0]["added"] = 1  # what a reader adds to a sample does not stay in the cache
    for url in urls:
        Path(url).unlink()
    again = [s for url in urls for s in cache.read(url)]
    assert cache.hits == 3 and "added" not in again[0]
    assert [s["__key__"] for s in again] == [s["__key__"] for s in first]
    assert all(a["mp4"] == b["mp4"] and a["json"] == b["json"] for a, b in zip(again, first))


def test_shard_cache_keeps_only_whole_shards_within_its_size(tmp_path):
    urls = good_shards(tmp_path, 3, 2)
    size = sum(len(v) for s in read_shard(urls[0]) for v in s.values() if isinstance(v, bytes))
    cut = ShardCache(max_mb=16)
    next(iter(cut.read(urls[0])))  # a read cut off after one sample is not kept
    assert urls[0] not in cut.entries
    small = ShardCache(max_mb=1.5 * size / 2**20)  # room for one shard: the least recently read goes
    for url in urls:
        list(small.read(url))
    assert list(small.entries) == [urls[2]] and small.bytes == small.sizes[urls[2]]
    Path(urls[0]).unlink()
    with pytest.raises(ShardReadError):
        list(small.read(urls[0]))


def test_stream_with_a_shard_cache_gives_the_same_batches(tmp_path):
    shards = good_shards(tmp_path, 3, 4)
    make = lambda mb: VideoDataModule(shards=shards, frames=[8], sizes=[[32, 32]], batch_size=2, num_workers=0,
                                      seed=0, shuffle_buffer=4, epoch_batches=6, shard_cache_mb=mb)
    plain_dm, cached_dm = make(0), make(16)
    for dm in (plain_dm, cached_dm):
        dm.setup()
    assert _run(cached_dm.train_dataloader(), 3) == _run(plain_dm.train_dataloader(), 3)
    cache = cached_dm.train_dataloader().dataset.shard_cache
    assert cache.hits > 0 and set(cache.entries) == set(shards)  # every shard is kept once read to its end


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_stream_exactly(tmp_path, workers):
    shards = good_shards(tmp_path, 3, 5)
    broken = video_sample("broken", 99)
    broken["mp4"] = b"\x00garbage" * 64  # fails at decode time: resume must know to drop it
    shards.append(str(write_tar(tmp_path / "extra.tar", [video_sample("x0", 50), broken, video_sample("x1", 51)])))

    def loader():
        dm = VideoDataModule(shards=shards, frames=[8], sizes=[[32, 32]], batch_size=2, num_workers=workers,
                             epoch_batches=7, shuffle_buffer=3, max_bad_fraction=1.0)
        dm.setup()
        return dm.train_dataloader()

    def take(source, n: int) -> list:
        out = []
        while len(out) < n:
            out += _run(source)[: n - len(out)]
        return out

    reference_loader = loader()
    reference = take(reference_loader, 18)
    assert reference_loader.metrics()["data/skipped/undecodable"] >= 1
    for stop in (3, 7, 10):  # mid-epoch, at an epoch end, mid second epoch
        first = loader()
        iterator, seen = iter(first), []
        while len(seen) < stop:
            try:
                seen += _run([next(iterator)])
            except StopIteration:
                iterator = iter(first)
        state = first.state_dict()
        torch.save(state, tmp_path / "state.pt")
        del iterator
        resumed = loader()
        resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
        assert seen + take(resumed, len(reference) - stop) == reference, stop
        assert resumed.metrics() == reference_loader.metrics()  # counters continue too
