"""The media datamodules: batch keys and shapes, Lightning checkpoint resume, and 2 DDP ranks x 2 workers."""

from __future__ import annotations

import csv
import json
import os

import lightning as L
import pytest
import torch

from datamodules.audio import AudioDataModule
from datamodules.image import ImageDataModule
from datamodules.video import AudioVideoDataModule, VideoDataModule
from tests.datamodules.helpers import good_shards
from tests.helpers import spawn_gloo


def _first(dm):
    dm.prepare_data()
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_datamodules_yield_the_convention_keys(world_dir):
    data_dir, world, _ = world_dir
    common = dict(data_dir=data_dir, world=world, batch_size=2, num_workers=0)
    video = _first(VideoDataModule(sizes=[[32, 32], [32, 48]], frames=[8], with_masks=True, fps_in_caption=True,
                                   **common))
    b = video["video"].shape[0]
    assert video["video"].dtype == torch.float32 and video["video"].shape[1:3] == (3, 8)
    assert -1 <= video["video"].min() and video["video"].max() <= 1
    assert video["labels"].shape == (b, *video["video"].shape[2:]) and video["labels"].dtype == torch.int64
    assert video["text"][0].startswith("FPS-8 ") and video["fps"].tolist() == [8.0] * b
    assert len(video["key"]) == len(video["meta"]) == b and "objects" in video["meta"][0]
    ids = {o["id"] for o in video["meta"][0]["objects"]}
    assert set(video["labels"][0].unique().tolist()) <= ids | {0}

    av = _first(AudioVideoDataModule(sizes=[[32, 32]], frames=[8], fps=8, sample_rate=8000, **common))
    assert av["audio"].shape == (av["video"].shape[0], 1, 8000) and av["sample_rate"] == 8000

    image = _first(ImageDataModule(sizes=[[32, 32]], with_masks=True, **common))
    assert image["video"].shape[1:3] == (3, 1) and (image["fps"] == 0).all() and image["labels"].shape[1] == 1

    audio = _first(AudioDataModule(durations=[0.5, 1.0], sample_rate=8000, **common))
    assert audio["audio"].shape[1] == 1 and audio["audio"].shape[2] in (4000, 8000)
    assert audio["text"][0].startswith(("Tones of", "Silence"))

    edits = _first(VideoDataModule(sizes=[[32, 32]], frames=[8], world_kind="edits", with_target=True,
                                   with_masks=True, **common))
    assert edits["target_video"].shape == edits["video"].shape and "edit" in edits["meta"][0]
    assert edits["text"][0] == edits["meta"][0]["edit"]["instruction"]
    # the target's label maps: the edited object is where the clips differ (outside it, the same pixels)
    assert edits["target_labels"].shape == edits["labels"].shape
    edited = [int(m["edit"]["object"]) for m in edits["meta"]]
    ids = torch.tensor(edited).view(-1, 1, 1, 1)
    outside = (edits["labels"] != ids) & (edits["target_labels"] != ids)
    assert (edits["video"] - edits["target_video"]).abs().amax(1)[outside].mean() < 0.05

    stickers = _first(VideoDataModule(sizes=[[32, 32]], frames=[8], world_kind="stickers", **common))
    assert stickers["text"][0].startswith("A sticker of")


def _fit_module(**kwargs) -> VideoDataModule:
    dm = VideoDataModule(**kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _cached_and_plain(world_dir, **options) -> tuple[VideoDataModule, VideoDataModule, dict]:
    """(a module with an 8 MB decode cache, the same without, their common arguments): the tiny world, 3
    batches of 4 an epoch."""
    data_dir, world, _ = world_dir
    common = dict(data_dir=data_dir, world=world, frames=[8], batch_size=4, num_workers=0, epoch_batches=3, seed=5,
                  **options)
    return _fit_module(decode_cache_mb=8, **common), _fit_module(**common), common


def test_decode_cache_gives_the_same_batches_and_decodes_each_clip_once(world_dir):
    """`decode_cache_mb`: two epochs equal an uncached module's, batch for batch, and every clip of the second
    epoch comes from the cache (the world's 1 s clips always start at 0); a budget under one clip keeps none."""
    cached, plain, common = _cached_and_plain(world_dir, sizes=[[32, 32]], random_crop=False)
    one_s = {k for b in plain.train_dataloader() for k, m in zip(b["key"], b["meta"]) if m["duration"] <= 1.0}
    plain._train_loader = None
    cache = cached.train_dataloader().dataset.sources[0].handler.cache
    for epoch in range(2):
        misses = cache.misses
        for a, b in zip(cached.train_dataloader(), plain.train_dataloader()):
            assert a["key"] == b["key"] and torch.equal(a["video"], b["video"])
        if epoch == 1:
            assert cache.misses - misses <= 12 - len(one_s) and cache.hits >= len(one_s) > 0
    tiny = _fit_module(decode_cache_mb=1e-6, **common)
    next(iter(tiny.train_dataloader()))
    assert not tiny.train_dataloader().dataset.sources[0].handler.cache.entries


def test_decode_cache_keeps_the_resized_crops(world_dir):
    """The cache also keeps each clip's crop resized to the training size, keyed by the crop box: with random
    crops of clips that already have the target's aspect (every offset selects the whole frame) the batches equal
    an uncached module's, and the second epoch decodes and resizes nothing for the 1 s clips."""
    cached, plain, _ = _cached_and_plain(world_dir, sizes=[[16, 16]], random_crop=True)
    cache = cached.train_dataloader().dataset.sources[0].handler.cache
    for epoch in range(2):
        misses = cache.misses
        seen = set()
        for a, b in zip(cached.train_dataloader(), plain.train_dataloader()):
            assert a["key"] == b["key"] and a["video"].shape[-2:] == (16, 16) and torch.equal(a["video"], b["video"])
            seen |= {k for k, m in zip(a["key"], a["meta"]) if m["duration"] <= 1.0 and m["width"] == m["height"]}
        resized = [k for k in cache.entries if len(k) == 8]
        assert all(k[6] == (16, 16) and k[7][2:] == (32, 32) for k in resized)  # the whole 32x32 frame, to 16x16
        if epoch == 1:
            # a square 1 s clip misses neither its decode nor its resize; longer clips (random starts) and
            # 32x48 ones (random boxes) can
            assert cache.misses - misses <= 2 * (12 - len(seen)) and len(seen) > 0


class _Recorder(L.LightningModule):
    """Trains a scalar on the mean pixel and records which samples each step saw."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.keys: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        assert "_receipt" not in batch
        self.keys.append(list(batch["key"]))
        return (self.w - batch["video"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, shards, max_steps, ckpt_path=None, name="run"):
    dm = VideoDataModule(shards=shards, frames=[8], sizes=[[32, 32]], batch_size=2, num_workers=1, epoch_batches=4,
                         seed=3)
    model = _Recorder()
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=3,
                                                      save_top_k=-1, filename="{step}")
    trainer = L.Trainer(max_steps=max_steps, max_epochs=100, accelerator="cpu", logger=L.pytorch.loggers.CSVLogger(
        tmp_path / name), callbacks=[checkpoints], enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=2, num_sanity_val_steps=0)
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return model.keys, trainer


def test_lightning_resume_continues_the_data_stream(tmp_path):
    shards = good_shards(tmp_path / "shards", 3, 4)
    reference, _ = _fit(tmp_path, shards, 10, name="reference")
    first, _ = _fit(tmp_path, shards, 5, name="first")
    assert first == reference[:5]
    resumed, trainer = _fit(tmp_path, shards, 10, ckpt_path=tmp_path / "first" / "step=3.ckpt", name="resumed")
    assert resumed == reference[3:10]  # steps 4..10 see what the uninterrupted run saw (crossing epoch 0 -> 1)
    state = torch.load(tmp_path / "first" / "step=3.ckpt", weights_only=False)["loops"]["fit_loop"]
    assert state["state_dict"]["combined_loader"][0]["ranks"][0]["position"] == 3
    rows = list(csv.DictReader(open(next((tmp_path / "resumed").rglob("metrics.csv")))))
    assert any(row.get("data/seen") for row in rows)  # skip counters reach the logger


def _rank(rank: int, world: int, shards: list[str], out: str) -> None:
    dm = VideoDataModule(shards=shards, frames=[8], sizes=[[32, 32]], batch_size=2, num_workers=2, seed=7)
    dm.setup("fit")
    loader = dm.train_dataloader()
    keys = [b["key"] for b in loader]
    state = loader.state_dict()
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, {"keys": keys, "len": len(loader), "state": state})
    if rank == 0:
        with open(out, "w") as handle:
            json.dump(gathered, handle)


def test_two_ranks_with_two_workers_get_equal_batches_and_disjoint_samples(tmp_path):
    shards = good_shards(tmp_path / "shards", 5, 4)  # 5 shards for 4 slots: uneven on purpose
    out = tmp_path / "result.json"
    spawn_gloo(_rank, 2, 2, shards, str(out))
    result = json.loads(out.read_text())
    counts = [len(r["keys"]) for r in result]
    # 4 slots, 5 shards of 4: the worst-placed worker has 1 shard = 2 batches -> 2 workers x 2 per rank
    assert counts[0] == counts[1] == result[0]["len"] == 4
    per_rank = [{k for batch in r["keys"] for k in batch} for r in result]
    assert sum(len(k) for k in per_rank) == 2 * counts[0] * 2  # no repeats within a rank
    assert not per_rank[0] & per_rank[1]  # disjoint across ranks
    assert len(result[0]["state"]["ranks"]) == 2  # checkpoints hold every rank's position


@pytest.mark.slow
def test_default_world_is_created_on_first_use(tmp_path):
    dm = VideoDataModule(data_dir=tmp_path, num_workers=0)
    dm.prepare_data()
    dm.setup()
    assert next(iter(dm.train_dataloader()))["video"].shape[1:] == (3, 8, 64, 64)


class _RankRecorder(_Recorder):
    """_Recorder that writes each rank's keys to <folder>/rank<r>.json at the end of training."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    def on_train_end(self) -> None:
        with open(os.path.join(self.folder, f"rank{self.global_rank}.json"), "w") as handle:
            json.dump(self.keys, handle)


def _ddp_fit(folder, shards, max_steps, ckpt_path=None):
    os.makedirs(folder, exist_ok=True)
    dm = VideoDataModule(shards=shards, frames=[8], sizes=[[32, 32]], batch_size=2, num_workers=1, seed=5)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_top_k=-1,
                                                      filename="{step}")
    trainer = L.Trainer(max_steps=max_steps, max_epochs=100, accelerator="cpu", devices=2, strategy="ddp_spawn",
                        logger=False, callbacks=[checkpoints], enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(_RankRecorder(str(folder)), dm, ckpt_path=ckpt_path)
    return [json.load(open(os.path.join(folder, f"rank{r}.json"))) for r in range(2)]


@pytest.mark.slow
def test_lightning_ddp_resume_restores_every_rank(tmp_path):
    shards = good_shards(tmp_path / "shards", 4, 4)  # 2 slots x 2 shards: 4 batches per rank per epoch
    reference = _ddp_fit(tmp_path / "reference", shards, 6)
    assert all(len(keys) == 6 for keys in reference)
    assert not {k for b in reference[0][:2] for k in b} & {k for b in reference[1][:2] for k in b}
    # from step 2 of epoch 0 through the epoch boundary at step 4
    resumed = _ddp_fit(tmp_path / "resumed", shards, 6, ckpt_path=tmp_path / "reference" / "step=2.ckpt")
    assert resumed[0] == reference[0][2:] and resumed[1] == reference[1][2:]
