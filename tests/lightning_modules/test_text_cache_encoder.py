"""Training with precomputed text embeddings: a text-embedding cache written by `experiments/make_shards.py
text_encoder=...` from real shards of the synthetic world with the tiny T5, read back by `CachedTextEncoder`.
The cache holds the prompts the Text conditioner forms (the "FPS-<fps> " prefix of videos at the datamodule's
rate, images bare, the null prompt ""), served with the live encoder's tokens; a prompt the cache lacks is an
error naming it, or goes to the fallback encoder; and the generation core's loss (and a step) through the config
a user writes equals the live encoder's, also when the model is built on the meta device."""

from __future__ import annotations

import json
import re
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from datamodules.shards import read_shard
from datamodules.text_cache import NULL_KEY, read_text_cache
from datamodules.video import VideoDataModule
from datamodules.write_shards import write_world
from experiments.compose import compose_config
from experiments.make_shards import main as make_shards
from lightning_modules.conditioning.text import Text
from lightning_modules.nn.text import ByteEncoder, CachedTextEncoder, HFTextEncoder, TextConditioner
from lightning_modules.parallel import has_meta_tensors, meta_build_guard, meta_init_config
from tests.lightning_modules.test_text_encoders import t5_dir  # noqa: F401 - the tiny T5 fixture

pytestmark = pytest.mark.usefixtures("one_thread")

T5 = "+model.conditioners.text.encoder.encoders.t5"
FPS = 4.0  # the datamodule samples the world's 8 fps clips at 4 fps: the prompts say FPS-4, not the json's 8


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Scenes (1 s at 8 fps, 32 x 32) and images of the synthetic world."""
    config = {"seed": 4, "scenes": [4, 1], "images": [2, 1], "sizes": [[32, 32]], "durations": [1.0], "fps": [8.0],
              "shard_size": 4}
    return write_world(tmp_path_factory.mktemp("world"), config, kinds=["scenes", "images"], progress=False)


@pytest.fixture(scope="module")
def cache(world: Path, t5_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """The cache of the scenes' and images' prompts, as the command line writes it (fps_in_text by default)."""
    output = tmp_path_factory.mktemp("text_cache")
    shards = f"shards=[{world / 'scenes' / 'train'},{world / 'images' / 'train'}]"
    assert make_shards([f"text_encoder={t5_dir}", shards, f"output={output}", "max_length=32", f"fps={FPS}",
                        "batch_size=4", "progress=false"]) == 0
    return output


def video_batch(world: Path) -> dict:
    """A real batch of the video datamodule (4 frames of 16 x 16 at 4 fps), with "frames" as the core sets it."""
    dm = VideoDataModule(shards=str(world / "scenes" / "train"), val_shards=str(world / "scenes" / "train"),
                         sizes=[[16, 16]], frames=[4], fps=FPS, batch_size=4, num_workers=0, seed=0)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    return {**batch, "frames": batch["video"].shape[2]}


def captions(folder: Path) -> list[str]:
    return [sample["txt"].decode() for shard in sorted(folder.glob("*.tar")) for sample in read_shard(str(shard))]


def test_the_cache_serves_the_conditioners_prompts_with_the_live_tokens(world: Path, cache: Path,
                                                                        t5_dir: Path) -> None:  # noqa: F811
    index = json.loads((cache / "index.json").read_text())
    entry = index["text_embedding"]
    assert entry["fps_in_text"] is True and entry["fps"] == FPS and entry["null_key"] == NULL_KEY
    assert index["num_samples"] == 4 + 2 + 1 and index["stats"]["kinds"]["null_prompt"] == 1

    cached = CachedTextEncoder(str(cache))
    live = HFTextEncoder(str(t5_dir), max_length=32)
    assert (cached.dim, cached.max_length, cached.fps_in_text) == (32, 32, True)
    assert not list(cached.parameters()) and not cached.state_dict(), "nothing to train or checkpoint"

    # The prompts the Text conditioner forms from a real batch (videos: "FPS-4 <caption>"), an image's prompt
    # (bare) and the null prompt of guidance dropout: all in the cache.
    text = Text(TextConditioner({"t5": cached}, dim=16))
    batch = video_batch(world)
    prompts = text.inputs(batch, None, (3, 4, 16, 16), train=True)
    assert all(p.startswith("FPS-4 ") for p in prompts) and len(prompts) == 4
    (image_caption, *_) = captions(world / "images" / "train")
    (image_prompt,) = text.prompts([image_caption], torch.zeros(1), 1)
    assert image_prompt == image_caption
    prompts = [*prompts, image_prompt, *text.null(prompts[:1])]
    assert set(prompts) <= set(read_text_cache(cache).tokens)

    tokens, mask = cached(prompts)
    expected, expected_mask = live(prompts)
    assert tokens.dtype == torch.float32 and tokens.shape == expected.shape == (6, expected.shape[1], 32)
    assert torch.equal(mask, expected_mask) and mask[-1].sum() == 1  # the null prompt: EOS alone
    torch.testing.assert_close(tokens[mask], expected[mask], atol=1e-5, rtol=1e-5)
    assert not tokens[~mask].any()
    assert (cached.hits, cached.misses) == (6, 0)

    # The same tokens through the conditioner as through it with the live encoder.
    text_live = Text(TextConditioner({"t5": live}, dim=16))
    text_live.load_state_dict(text.state_dict())
    with torch.no_grad():
        (p, m), (p_live, m_live) = text(prompts), text_live(prompts)
    assert torch.equal(m, m_live)
    torch.testing.assert_close(p[m], p_live[m], atol=1e-5, rtol=1e-5)


def test_a_prompt_not_in_the_cache_is_an_error_or_goes_to_the_fallback(world: Path, cache: Path,
                                                                      t5_dir: Path) -> None:  # noqa: F811
    (caption, *_) = captions(world / "scenes" / "train")
    known = f"FPS-4 {caption}"
    cached = CachedTextEncoder(str(cache))
    with pytest.raises(ValueError, match=rf"^CachedTextEncoder: prompt 'a held-out prompt' is not in the "
                                         rf"text-embedding cache {re.escape(str(cache))} \(1 of 2 prompts"):
        cached([known, "a held-out prompt"])
    with pytest.raises(ValueError, match=re.escape(repr(caption))):  # without the prefix training adds: a miss
        cached([caption])
    assert cached.misses == 0  # nothing was served

    live = HFTextEncoder(str(t5_dir), max_length=32)
    with_fallback = CachedTextEncoder(str(cache), encoder=HFTextEncoder(str(t5_dir), max_length=32))
    prompts = [known, "a held-out prompt", "", "FPS-8 an 8 fps prompt that is much longer than the others"]
    tokens, mask = with_fallback(prompts)
    expected, expected_mask = live(prompts)
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(tokens[mask], expected[mask], atol=1e-5, rtol=1e-5)
    assert (with_fallback.hits, with_fallback.misses) == (2, 2)

    with pytest.raises(ValueError, match=r"fallback encoder's \(dim, max_length\) = \(32, 16\) are not the cache's "
                                         r"\(32, 32\)"):
        CachedTextEncoder(str(cache), encoder=HFTextEncoder(str(t5_dir), max_length=16))
    with pytest.raises(ValueError, match="fallback encoder has trainable parameters"):
        CachedTextEncoder(str(cache), encoder=ByteEncoder(dim=32, depth=0, max_length=32))
    with pytest.raises(FileNotFoundError, match="no text-embedding cache at .* run merge|make_shards.py text_encoder"):
        CachedTextEncoder(str(cache / "absent"))


def test_loss_and_a_step_through_the_config_equal_the_live_encoders(world: Path, cache: Path, t5_dir: Path,  # noqa: F811
                                                                   outputs: Path) -> None:
    """The quickstart model (word encoder + T5) configured as a user would: the T5 live, or from the cache (built
    the meta-device way); the same weights give the same loss with guidance dropout, and a step trains the
    projection of the cached T5."""
    small = ["experiment=quickstart", "model.net.dim=32", "model.net.depth=1", "model.net.heads=2",
             "model.net.ffn_dim=64", "model.conditioners.text.encoder.encoders.word.depth=1",
             "model.conditioners.text.dropout=0.5"]
    live_cfg = compose_config([*small, f"{T5}._target_=lightning_modules.nn.text.HFTextEncoder", f"{T5}.path={t5_dir}",
                               f"{T5}.max_length=32"], outputs / "live")
    live = hydra.utils.instantiate(live_cfg.model, _convert_="object")
    cached_cfg = compose_config([*small, f"{T5}._target_=lightning_modules.nn.text.CachedTextEncoder",
                                 f"{T5}.cache={cache}"], outputs / "cached")
    model_cfg = meta_init_config(OmegaConf.to_container(cached_cfg.model, resolve=True))
    with meta_build_guard():
        model = hydra.utils.instantiate(OmegaConf.create(model_cfg), _convert_="object")
    assert has_meta_tensors(model.net)
    model.configure_model()  # materialise on the CPU; the cached encoder was never on meta
    assert not has_meta_tensors(model)
    encoder = model.conditioners["text"].encoder.encoders["t5"]
    assert isinstance(encoder, CachedTextEncoder) and not list(encoder.parameters())
    with torch.no_grad():  # off the zero init (adaLN-Zero, zero output layer), so that the loss depends on the text
        for p in live.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = video_batch(world)
    # the quickstart's PCA codec, as setup fits it for a few steps' budget; basis and refiner go with the state
    live.codec.fit([batch["video"]], max_refine_steps=2)
    model.load_state_dict(live.state_dict())  # strict: neither T5 has state of its own

    t = torch.full((4,), 0.7)
    losses = []
    for module in (live, model):
        torch.manual_seed(3)  # the same dropout and noise draws
        losses.append(module.loss(batch, t=t, train=True))
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    assert encoder.misses == 0 and encoder.hits >= 4

    projection = model.conditioners["text"].encoder.projections["t5"][0].weight
    before = projection.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.loss(batch, t=t, train=True).backward()
    assert projection.grad is not None and projection.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(projection, before) and encoder.misses == 0
