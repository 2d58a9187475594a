"""Training text-to-video on a TAE latent cache: a real cache of a tiny TAE, batches bucketed by latent shape,
exact resume, corrupt latents skipped and counted (and never unpickled), the module bound to the cache's
statistics, a missing cache encoded with the codec's TAE, a short DiT run that lowers the loss, the configs."""

from __future__ import annotations

import io
import json
import math
import shutil
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback

from callbacks.media import MediaLogger
from datamodules.latent_cache import LATENT_MEMBER, encode_cache, is_cache, read_latent_arrays
from datamodules.latents import LatentDataModule
from datamodules.shards import read_shard
from datamodules.stream_dataset import BadDataError
from datamodules.video import VideoDataModule
from datamodules.write_shards import write_world
from lightning_modules.conditioning import Text
from lightning_modules.evaluation.base import Evaluator
from lightning_modules.evaluation.probe import ProbeEvaluator
from lightning_modules.generation import GenerationModule
from lightning_modules.latent_codec import tae_codec
from lightning_modules.nn.codecs import TAECodec
from lightning_modules.nn.dit import DiT
from lightning_modules.nn.tae import TAE
from lightning_modules.nn.text import ByteEncoder, TextConditioner
from tests.datamodules.helpers import write_tar
from tests.helpers import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


# Two aspect ratios x two durations at 8 fps -> four latent shapes: 4 x {2, 4} x 8 x {8, 12}.
WORLD = {"seed": 4, "max_objects": 1, "scenes": [16, 8], "images": [1, 1], "sizes": [[32, 32], [32, 48]],
         "durations": [1.0, 2.0], "fps": [8.0], "shard_size": 8}
SHAPES = {(4, 2, 8, 8), (4, 2, 8, 12), (4, 4, 8, 8), (4, 4, 8, 12)}


def tae() -> TAE:
    torch.manual_seed(0)
    return TAE(latent_channels=4, base_channels=8, channel_mults=(1, 2, 2), temporal_down=(True, True),
               num_res_blocks=1, norm_groups=4)


def source(world: Path) -> VideoDataModule:
    """The pixels the cache encodes (as tae_tiny's data: evaluation-mode clips of each aspect / duration)."""
    return VideoDataModule(shards=str(world / "scenes" / "train"), val_shards=str(world / "scenes" / "val"),
                           sizes=[[32, 32], [32, 48]], frames=[8, 16], fps=8.0, num_workers=0, seed=0)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_world(tmp_path_factory.mktemp("world"), WORLD, kinds=["scenes"], progress=False)


@pytest.fixture(scope="module")
def cache(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real cache: the world's train and val splits encoded by a tiny TAE (the code of task=encode)."""
    folder = tmp_path_factory.mktemp("cache") / "latents"
    encode_cache(tae(), source(world), folder, batch_size=4, maxcount=8)
    return folder


def cached_samples(folder: Path) -> dict[str, dict]:
    return {s["__key__"]: s for url in sorted(folder.glob("*.tar")) for s in read_shard(str(url))}


def latents(folder: Path, **kwargs) -> LatentDataModule:
    return LatentDataModule(**{"cache_dir": folder, "batch_size": 2, "num_workers": 0, "seed": 0} | kwargs)


def test_batches_are_bucketed_by_latent_shape(cache: Path) -> None:
    samples = cached_samples(cache / "train")
    stored = {k: torch.from_numpy(read_latent_arrays(s[LATENT_MEMBER])["latent"]) for k, s in samples.items()}
    assert {tuple(v.shape) for v in stored.values()} == SHAPES

    dm = latents(cache, epoch_batches=12)
    dm.setup("fit")
    sizes = {b.name: b.batch_size for b in dm.table.buckets.values()}
    # the largest bucket gets batch_size, the others floor(batch_size * V_max / V), capped at 4 * batch_size
    assert sizes == {"4x4x8x12": 2, "4x4x8x8": 3, "4x2x8x12": 4, "4x2x8x8": 6}
    seen = set()
    for batch in dm.train_dataloader():
        assert set(batch) == {"latent", "text", "fps", "meta", "key"}
        shape = tuple(batch["latent"].shape[1:])
        seen.add(shape)
        assert batch["latent"].dtype == torch.float32 and len(batch["key"]) == sizes["x".join(map(str, shape))]
        assert batch["fps"].tolist() == [8.0] * len(batch["key"])
        for key, latent, text, meta in zip(batch["key"], batch["latent"], batch["text"], batch["meta"]):
            assert torch.equal(latent, stored[key])  # the cached posterior mean, untouched
            assert text == samples[key]["txt"].decode() and text
            assert meta["latent"] == {"shape": list(shape), "frames": 4 * shape[1], "height": 32,
                                      "width": 4 * shape[3], "fps": 8.0}
    assert len(seen) >= 2, seen
    val = next(iter(dm.val_dataloader()))
    assert tuple(val["latent"].shape[1:]) in SHAPES and val["text"][0]

    # a validation batch size of its own scales its buckets the same way, from 4 instead of 2
    dm = latents(cache, epoch_batches=12, val_batch_size=4)
    full = 0
    for batch in dm.val_dataloader():  # every bucket's batches are full but for the pass's last ones
        wanted = 2 * sizes["x".join(map(str, batch["latent"].shape[1:]))]
        assert len(batch["key"]) <= wanted
        full += len(batch["key"]) == wanted
    assert full >= 1


def test_resume_is_exact_and_caption_dropout_is_seeded(cache: Path) -> None:
    first = latents(cache, epoch_batches=6, caption_dropout=0.5)
    loader = first.train_dataloader()
    batches = [b["key"] for b in loader]
    loader = latents(cache, epoch_batches=6, caption_dropout=0.5).train_dataloader()
    iterator = iter(loader)
    done = [next(iterator)["key"] for _ in range(3)]
    state = loader.state_dict()
    resumed = latents(cache, epoch_batches=6, caption_dropout=0.5).train_dataloader()
    resumed.load_state_dict(state)
    assert done + [b["key"] for b in resumed] == batches
    texts = [t for b in latents(cache, epoch_batches=6, caption_dropout=0.5).train_dataloader() for t in b["text"]]
    assert 0 < texts.count("") < len(texts)  # about half the captions dropped, the same ones every time
    again = [t for b in latents(cache, epoch_batches=6, caption_dropout=0.5).train_dataloader() for t in b["text"]]
    assert texts == again


class Unpickled:
    """Unpickling this object creates `marker` (a pickle payload inside an npz)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_corrupt_latents_are_skipped_counted_and_never_unpickled(cache: Path, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    shutil.copytree(cache / "train", tmp_path / "train")
    shard = sorted((tmp_path / "train").glob("*.tar"))[0]
    samples = [{k: v for k, v in s.items() if k != "__url__"} for s in read_shard(str(shard))]
    pickled, nan = io.BytesIO(), io.BytesIO()
    np.savez(pickled, latent=np.array([Unpickled(marker)], dtype=object))
    np.savez(nan, latent=np.full((4, 2, 8, 8), np.nan, dtype=np.float32))
    bad = {samples[0]["__key__"]: b"not an npz", samples[1]["__key__"]: pickled.getvalue(),
           samples[2]["__key__"]: nan.getvalue()}
    for sample in samples:
        sample[LATENT_MEMBER] = bad.get(sample["__key__"], sample[LATENT_MEMBER])
    write_tar(shard, samples)

    dm = latents(None, shards=str(tmp_path / "train"), epoch_batches=10, max_bad_fraction=0.5)
    loader = dm.train_dataloader()
    keys = [k for batch in loader for k in batch["key"]]
    metrics = loader.metrics()
    assert not set(bad) & set(keys) and keys
    assert metrics["data/skipped/bad_latent"] >= 3 and metrics["data/bad"] == metrics["data/skipped/bad_latent"]
    assert not marker.exists()

    strict = latents(None, shards=str(tmp_path / "train"), epoch_batches=10, max_bad_fraction=0.01, min_samples=4)
    with pytest.raises(BadDataError, match=r"shard .*shard-000000\.tar key .*bad_latent"):
        list(strict.train_dataloader())


def generator(codec: torch.nn.Module, lr: float = 3e-3, probe: bool = False) -> GenerationModule:
    torch.manual_seed(0)
    net = DiT(in_channels=4, dim=32, depth=2, heads=4, ffn_dim=64, max_t=4, max_h=4, max_w=6)
    text = Text(TextConditioner({"byte": ByteEncoder(dim=32, depth=1, heads=4, max_length=128)}, dim=32),
                dropout=0.1)
    return GenerationModule(net, codec, {"text": text}, optimizer=partial(torch.optim.AdamW, lr=lr),
                            sampler=dict(steps=2, guidance={"text": 3.0}), media=dict(steps=2, max_samples=2),
                            evaluators={"probe": ProbeEvaluator()} if probe else {})


def trainer(max_steps: int, **kwargs) -> L.Trainer:
    options = dict(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    return L.Trainer(**{**options, **kwargs})


class Losses(Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(outputs["loss"]))


def test_short_training_on_the_cache_lowers_the_loss(cache: Path, tmp_path: Path) -> None:
    model = generator(TAECodec(tae()))  # the TAE that encoded the cache decodes the samples
    losses, media = Losses(), MediaLogger(on_validation=True, max_samples=2)
    dm = latents(cache, batch_size=4, epoch_batches=80, val_batches=1)
    L.seed_everything(0)
    t = trainer(160, limit_val_batches=1, check_val_every_n_epoch=2, callbacks=[losses, media],
                default_root_dir=tmp_path)
    t.fit(model, dm)
    index = json.loads((cache / "train" / "index.json").read_text())["latent"]
    torch.testing.assert_close(model.latent_mean.flatten(), torch.tensor(index["channel_mean"]))  # bound in setup
    torch.testing.assert_close(model.latent_std.flatten(), torch.tensor(index["channel_std"]))
    first, last = np.mean(losses.values[:10]), np.mean(losses.values[-10:])
    print(f"train/loss: first 10 steps {first:.3f}, last 10 steps {last:.3f}")
    assert len(losses.values) == 160 and last < 0.8 * first, (first, last)
    assert math.isfinite(float(t.callback_metrics["val/loss"]))
    # validation media of a latent batch: generated clips decoded by the TAE, no "real" clip
    names = sorted(p.name for p in media.logged)
    assert names and all(n.startswith("sample") for n in names), names


def test_a_missing_cache_is_encoded_with_the_codec_tae(world: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "tae.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in tae().state_dict().items()}}, checkpoint)
    folder = tmp_path / "latents"
    dm = latents(folder, source=source(world), encode={"batch_size": 4, "keep_logvar": True}, epoch_batches=2)
    model = generator(tae_codec(tae(), str(checkpoint)))
    trainer(2).fit(model, dm)
    assert is_cache(folder) and (folder / "val" / "index.json").is_file()
    info = json.loads((folder / "cache.json").read_text())
    assert info["tae_checkpoint"] == str(checkpoint) and info["splits"] == {"train": 16, "val": 8}
    stats = json.loads((folder / "train" / "index.json").read_text())["latent"]["channel_mean"]
    torch.testing.assert_close(model.latent_mean.flatten(), torch.tensor(stats))
    # with the log-variance kept, sample_posterior trains on z ~ q(z|x); validation keeps the mean
    means = {k: read_latent_arrays(s[LATENT_MEMBER])["latent"] for split in ("train", "val")
             for k, s in cached_samples(folder / split).items()}
    posterior = latents(folder, sample_posterior=True, epoch_batches=1)
    batch, val = next(iter(posterior.train_dataloader())), next(iter(posterior.val_dataloader()))
    assert not np.allclose(batch["latent"][0].numpy(), means[batch["key"][0]])
    np.testing.assert_array_equal(val["latent"][0].numpy(), means[val["key"][0]])

    # a TAE without trained weights never writes the cache; a fast_dev_run encodes a throwaway one in its run dir
    untrained = tae_codec(tae(), str(tmp_path / "no_such_run"), missing_ok=True)
    assert untrained.checkpoint is None
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError, match="refusing to write a cache from a random TAE"):
        trainer(1).fit(generator(untrained), latents(fresh, source=source(world)))
    run_dir = tmp_path / "run"
    trainer(1, fast_dev_run=True, default_root_dir=run_dir).fit(generator(untrained), latents(fresh, source=source(world)))
    assert not fresh.exists() and is_cache(run_dir / "latents_untrained")
    with pytest.raises(FileNotFoundError, match="experiment=tae_tiny task=encode"):
        trainer(1).fit(generator(untrained), latents(fresh))  # no cache, nothing to encode it from


def test_the_codec_must_match_the_cache_and_the_probe_is_warned_of(cache: Path) -> None:
    with pytest.warns(UserWarning, match="probe=null"):  # the probe trains on pixel clips: warned before training
        trainer(1).fit(generator(TAECodec(tae()), probe=True), latents(cache, epoch_batches=1))
    wrong = TAE(latent_channels=4, base_channels=16, channel_mults=(1, 2, 2), temporal_down=(True, True),
                num_res_blocks=1, norm_groups=4)
    with pytest.raises(ValueError, match=r"base_channels \(cache 8, codec 16\)"):
        trainer(1).fit(generator(TAECodec(wrong)), latents(cache))


def test_configs(tmp_path: Path) -> None:
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        data = compose("train", overrides=["data=latents", f"paths.data_dir={tmp_path}"]).data
        cfg = compose("train", overrides=["experiment=t2v_latents_tiny", f"paths.data_dir={tmp_path}",
                                          f"paths.log_dir={tmp_path}/outputs"])
    dm = instantiate(data, _convert_="object")
    assert isinstance(dm, LatentDataModule) and dm.cache_dir == tmp_path / "latents" / "tae_tiny" and dm.source is None
    dm = instantiate(cfg.data, _convert_="object")
    assert isinstance(dm.source, VideoDataModule) and dm.source.sizes == [[32, 32]] and dm.source.frames == [8]
    assert cfg.model.net.in_channels == cfg.model.codec.net.latent_channels == 8
    assert cfg.model.evaluators.probe is not None  # trained on data.source's pixel clips
    with pytest.raises(InstantiationException, match="no TAE checkpoint.*experiment=tae_tiny"):
        instantiate(cfg.model.codec, _convert_="object")  # no tae_tiny run under this log_dir


class DecodedReals(Evaluator):
    """Keeps the real clips the module hands its evaluators (the interface of lightning_modules/evaluation)."""

    def __init__(self) -> None:
        self.batches: list[dict] = []

    def update(self, generated: torch.Tensor, batch: dict, extras: dict) -> None:
        self.batches.append(batch)


def test_the_test_loop_scores_latent_samples_with_the_probe(cache: Path, world: Path, tmp_path: Path) -> None:
    """With a `source` datamodule, the probe trains on the cache's pixel clips and scores the held-out samples; the
    real clips beside them (the ceiling) are the held-out latents decoded by the cache's TAE."""
    model = generator(TAECodec(tae()))
    reals = DecodedReals()
    model.evaluators = {"probe": ProbeEvaluator(cache_dir=str(tmp_path / "probes"), steps=4, clips=8, batch=4,
                                                floor_clips=4), "reals": reals}
    dm = latents(cache, source=source(world), val_batches=1)
    t = trainer(1, limit_test_batches=1, default_root_dir=tmp_path)
    t.test(model, dm)
    metrics = {k: float(v) for k, v in t.callback_metrics.items()}
    for name in ("alignment_colour", "alignment_real_colour", "alignment_real_shape", "fd", "fd_real_floor"):
        assert math.isfinite(metrics[f"test/{name}"]), name
    assert list((tmp_path / "probes").glob("probe-*.pt")), "the probe trained on the source's pixel clips"
    (batch,) = reals.batches
    torch.testing.assert_close(batch["video"], model.from_latent(model.to_latent(batch), batch["video"].shape[2]))
    assert batch["video"].shape[1] == 3 and batch["latent"].shape[1] == 4
