"""The generation core on real shards of the shapes world, configured as text-to-video and as the upsampler: a
training step, text dropout and fps prompts, deterministic sampling, a short run that lowers the loss, the
upsampler's windows and its task=sample on an mp4, and the quickstart end to end (fit, held-out samples and
probe metrics in MLflow, then task=sample and task=evaluate from its checkpoint)."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from einops import rearrange
from mlflow.tracking import MlflowClient

from datamodules.video import VideoDataModule
from datamodules.write_shards import write_world
from experiments.compose import compose_config
from experiments.runner import run
from lightning_modules.conditioning import LowResolutionVideo, Text, fps_prompt, resize_video
from lightning_modules.evaluation import Fidelity, psnr
from lightning_modules.evaluation.probe import (
    ProbeConfig,
    VideoProbe,
    attribute_targets,
    probe_from_datamodule,
    topk_alignment,
)
from lightning_modules.generation import GenerationModule, TimeSampler
from lightning_modules.nn.codecs import PCACodec, PixelCodec
from lightning_modules.nn.dit import DiT
from lightning_modules.nn.text import ByteEncoder, TextConditioner
from tests.helpers import fixed_loss, sqlite_uri

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


WORLD = {"seed": 5, "max_objects": 1, "scenes": [32, 8], "images": [1, 1], "sizes": [[16, 16]], "durations": [1.0],
         "fps": [8.0]}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_world(tmp_path_factory.mktemp("world"), WORLD, kinds=["scenes"], progress=False)


def datamodule(world: Path, batch_size: int = 8) -> VideoDataModule:
    return VideoDataModule(shards=str(world / "scenes" / "train"), val_shards=str(world / "scenes" / "val"),
                           sizes=[[16, 16]], frames=[4], fps=8.0, batch_size=batch_size, num_workers=0, seed=0)


def module(lr: float = 3e-3, upsampler: bool = False, text_dropout: float = 0.1, **kwargs) -> GenerationModule:
    """Text-to-video on 4x4 space-to-depth pixels; with `upsampler`, the low-resolution video concatenated."""
    torch.manual_seed(0)
    net = DiT(in_channels=48, dim=32, depth=2, heads=4, ffn_dim=64, max_t=4, max_h=4, max_w=4,
              cond_channels=48 if upsampler else 0)
    text = Text(TextConditioner({"byte": ByteEncoder(dim=32, depth=1, heads=4, max_length=128)}, dim=32),
                dropout=text_dropout)
    conditioners = {"text": text}
    sampler = dict(steps=4, guidance={"text": 3.0})
    if upsampler:
        conditioners["low_res"] = LowResolutionVideo(channels=48, scale=2)
        sampler = dict(steps=4, guidance={"text": 1.0}, window=2, overlap=1)
    options = dict(latent_std=0.5, sampler=sampler, media=dict(steps=2, max_samples=2)) | kwargs
    return GenerationModule(net, PixelCodec(4), conditioners, optimizer=partial(torch.optim.AdamW, lr=lr), **options)


def trainer(max_steps: int, **kwargs) -> L.Trainer:
    options = dict(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    return L.Trainer(**{**options, **kwargs})


def held_out(world: Path) -> dict:
    dm = datamodule(world)
    dm.setup("validate")
    return next(iter(dm.val_dataloader()))


def test_training_step_with_text_dropout_and_fps_prompts(world: Path) -> None:
    model = module(text_dropout=0.5)
    seen: list[list[str]] = []
    model.conditioners["text"].encoder.register_forward_pre_hook(lambda _, args: seen.append(list(args[0])))
    torch.manual_seed(1)
    trainer(3).fit(model, datamodule(world))
    prompts = [p for batch in seen for p in batch]
    assert len(prompts) == 24
    assert 4 <= prompts.count("") <= 20, prompts  # about half dropped to the empty prompt
    assert all(p.startswith("FPS-8 A ") for p in prompts if p)
    assert fps_prompt("a cat", 16.0, 1) == "a cat" and fps_prompt("a cat", 24.0, 8) == "FPS-24 a cat"


def test_batch_transfer_moves_tensors_and_passes_meta_through(world: Path) -> None:
    """The batch's "meta" (each clip's json) comes back as the very same objects, not walked and rebuilt; the rest
    goes through Lightning's transfer (watched: it never sees "meta"); the keys keep their order."""
    batch = held_out(world)
    model = module()
    moved = model.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    assert list(moved) == list(batch) and moved["meta"] is batch["meta"]
    assert torch.equal(moved["video"], batch["video"]) and moved["text"] == batch["text"]
    seen = []
    original = L.LightningModule.transfer_batch_to_device
    try:
        L.LightningModule.transfer_batch_to_device = lambda self, b, d, i: seen.append(b) or original(self, b, d, i)
        model.transfer_batch_to_device(batch, torch.device("cpu"), 0)
        model.transfer_batch_to_device({"x": torch.ones(2)}, torch.device("cpu"), 0)
    finally:
        L.LightningModule.transfer_batch_to_device = original
    assert "meta" not in seen[0] and set(seen[0]) == set(batch) - {"meta"} and "x" in seen[1]


def test_sampling_is_deterministic_for_a_seed(world: Path) -> None:
    model = module()
    with torch.no_grad():  # random non-zero weights everywhere, so that samples depend on everything
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    prompts = ["A small red circle bounces around.", "A small blue star sits still."]
    ask = lambda texts: {"text": texts, "fps": 8.0}
    a = model.generate(ask(prompts), 4, 16, 16, seed=7)
    assert a.shape == (2, 3, 4, 16, 16) and a.abs().max() <= 1.0
    assert torch.equal(a, model.generate(ask(prompts), 4, 16, 16, seed=7))
    assert not torch.allclose(a, model.generate(ask(prompts), 4, 16, 16, seed=8))
    # sample i uses seed + i: the second prompt alone with seed 8 is the same video
    assert torch.allclose(a[1:], model.generate(ask(prompts[1:]), 4, 16, 16, seed=8), atol=1e-5)
    # the prompt and the guidance scale matter
    assert not torch.allclose(a[:1], model.generate(ask(prompts[1:]), 4, 16, 16, seed=7))
    assert not torch.allclose(a, model.generate(ask(prompts), 4, 16, 16, seed=7, guidance_scales={"text": 1.0}))
    image = model.generate(ask(prompts[:1]), 1, 16, 16, seed=7)
    assert image.shape == (1, 3, 1, 16, 16)
    # a guidance interval that holds no solver time ([1, 1]: the solver never evaluates at t = 1) is guidance 1;
    # one that holds them all is guidance everywhere
    model.sampler.guidance_interval = [1.0, 1.0]
    assert torch.allclose(model.generate(ask(prompts), 4, 16, 16, seed=7),
                          model.generate(ask(prompts), 4, 16, 16, seed=7, guidance_scales={"text": 1.0}), atol=1e-5)
    model.sampler.guidance_interval = [0.0, 1.0]
    assert torch.allclose(model.generate(ask(prompts), 4, 16, 16, seed=7), a, atol=1e-6)
    with pytest.raises(ValueError, match=r"model.sampler.guidance_interval=\[0.8, 0.2\]"):
        module(sampler=dict(steps=4, guidance={"text": 3.0}, guidance_interval=[0.8, 0.2]))


def test_frame_correlated_noise_in_sampling_and_training(world: Path) -> None:
    """`objective.frame_correlation`: 0 draws what `torch.randn` draws from seed + i (the seeds of earlier runs
    keep their samples); 3 makes the frames of each sample's noise correlate by 0.9 (9 / 10), in the sampler's
    noise and in the training loss's, and the images' noise [C, H, W] is left alone."""
    plain, mixed = module(), module(objective=dict(frame_correlation=3.0))
    shape = (48, 4, 4, 4)
    noise = plain.noise(shape, seed=5, count=2)
    assert torch.equal(noise[1], torch.randn(shape, generator=torch.Generator().manual_seed(6)))
    frames = mixed.noise((48, 4, 8, 8), seed=5, count=64)
    assert torch.corrcoef(frames[:, :, [0, 3]].transpose(0, 2).flatten(1))[0, 1].item() == pytest.approx(0.9, abs=0.02)
    assert mixed.noise((48, 4, 4), seed=5, count=2).shape == (2, 48, 4, 4)
    batch = next(iter(datamodule(world).train_dataloader()))
    drawn = []
    original = mixed.objective.path.sample
    mixed.objective.path.sample = lambda x1, t, noise=None: drawn.append(noise) or original(x1, t, noise)
    mixed.loss(batch, train=True)
    x0 = drawn[0]
    assert torch.corrcoef(x0[:, :, [0, -1]].transpose(0, 2).flatten(1))[0, 1].item() == pytest.approx(0.9, abs=0.05)
    # the progressive prior (a = 3: neighbours correlate by 3 / sqrt(10) = 0.949, frames 3 apart by 0.949³ = 0.854)
    progressive = module(objective=dict(frame_correlation=3.0, frame_noise="progressive"))
    frames = progressive.noise((48, 4, 8, 8), seed=5, count=64).transpose(0, 2).flatten(1)
    rho = 3.0 / math.sqrt(10.0)
    assert torch.corrcoef(frames[[0, 1]])[0, 1].item() == pytest.approx(rho, abs=0.02)
    assert torch.corrcoef(frames[[0, 3]])[0, 1].item() == pytest.approx(rho**3, abs=0.02)
    with pytest.raises(ValueError, match="frame_noise"):
        module(objective=dict(frame_correlation=3.0, frame_noise="ar1"))


def test_pca_codec_reconstructs_as_sklearn_pca_does(world: Path) -> None:
    """PCACodec against scikit-learn's PCA on the same patches (4 frames x 4x4 pixels x 3 = 192 values): the same
    reconstruction with 24 components; coefficients of unit RMS; exact with all 192; a clear error unfitted."""
    from sklearn.decomposition import PCA

    dm = datamodule(world)
    dm.setup("fit")
    clips = [b["video"] for b in dm.train_dataloader()]  # 32 clips, 16x16, 4 frames
    codec = PCACodec(components=24, spatial=4, temporal=4)
    with pytest.raises(RuntimeError, match="not fitted"):
        codec.encode(clips[0])
    codec.fit(clips)
    video = torch.cat(clips)
    patches = rearrange(video, "b c (t f) (h s) (w r) -> (b t h w) (c f s r)", f=4, s=4, r=4).double().numpy()
    reference = PCA(n_components=24, svd_solver="full").fit(patches)
    expected = torch.from_numpy(reference.inverse_transform(reference.transform(patches))).float()
    latent = codec.encode(video)
    assert latent.shape == (32, 24, 1, 4, 4)
    assert latent.pow(2).mean().item() == pytest.approx(1.0, abs=1e-4)
    ours = rearrange(codec.decode(latent), "b c (t f) (h s) (w r) -> (b t h w) (c f s r)", f=4, s=4, r=4)
    assert torch.allclose(ours, expected, atol=1e-4)
    assert (ours - torch.from_numpy(patches).float()).abs().mean() > 1e-3  # 24 of 192 components lose something
    full = PCACodec(components=192, spatial=4, temporal=4)
    full.fit(clips)
    assert torch.allclose(full.decode(full.encode(video)), video, atol=1e-4)
    # 3 frames (or an image) are padded with the last frame repeated: the same as encoding that padded clip
    padded = torch.cat([video[:, :, :3], video[:, :, 2:3]], dim=2)
    assert torch.equal(codec.encode(video[:, :, :3]), codec.encode(padded))
    assert codec.decode(codec.encode(video[:, :, :1]), num_frames=1).shape == (32, 3, 1, 16, 16)
    with pytest.raises(ValueError, match="multiples"):
        codec.encode(video[..., :15, :15])


def test_pca_codec_whiten_evens_out_the_components_and_loads_old_checkpoints(world: Path) -> None:
    """whiten = 1 gives scikit-learn's whitened coordinates (each of unit variance, up to sign and the ddof);
    whiten = 0.5 leaves component k with std ∝ v_k^(1/4) at mean variance 1; every w decodes the same patches;
    a checkpoint from before `whiten` (one scale for all components) loads as w = 0."""
    from sklearn.decomposition import PCA

    dm = datamodule(world)
    dm.setup("fit")
    clips = [b["video"] for b in dm.train_dataloader()]
    video = torch.cat(clips)
    patches = rearrange(video, "b c (t f) (h s) (w r) -> (b t h w) (c f s r)", f=4, s=4, r=4).double().numpy()
    reference = PCA(n_components=12, svd_solver="full", whiten=True).fit(patches)
    n = patches.shape[0]
    expected = torch.from_numpy(reference.transform(patches) * math.sqrt(n / (n - 1))).float()  # sklearn: ddof 1
    codecs = {w: PCACodec(components=12, spatial=4, temporal=4, whiten=w) for w in (0.0, 0.5, 1.0)}
    latents = {}
    for w, codec in codecs.items():
        codec.fit(clips)
        latents[w] = rearrange(codec.encode(video), "b k t h w -> (b t h w) k")
        assert latents[w].pow(2).mean().item() == pytest.approx(1.0, abs=1e-4)
    assert torch.allclose(latents[1.0].abs(), expected.abs(), atol=1e-3)
    plain_std, half_std = latents[0.0].std(0, unbiased=False), latents[0.5].std(0, unbiased=False)
    ratio = half_std / plain_std.sqrt()  # v^(1/4) ∝ sqrt(std at w = 0)
    assert torch.allclose(ratio, ratio.mean().expand_as(ratio), rtol=1e-3)
    assert half_std[0] / half_std[-1] < plain_std[0] / plain_std[-1]
    decoded = {w: c.decode(c.encode(video)) for w, c in codecs.items()}
    assert torch.allclose(decoded[0.5], decoded[0.0], atol=1e-4) and torch.allclose(decoded[1.0], decoded[0.0], atol=1e-4)
    old = {**codecs[0.0].state_dict(), "scale": codecs[0.0].scale[0].clone()}  # one scale, as saved before
    loaded = PCACodec(components=12, spatial=4, temporal=4)
    loaded.load_state_dict(old)
    assert torch.equal(loaded.encode(video), codecs[0.0].encode(video))
    with pytest.raises(ValueError, match="whiten"):
        PCACodec(whiten=2.0)


def test_pca_codec_refined_decode(world: Path) -> None:
    """`refine`: the same basis as the linear codec, a decode that reconstructs the fit clips better than the
    linear one (L1), g as torch's own Conv2d / GELU layers compute it from the buffers, the weights in buffers
    only (no parameters), the global RNG untouched and the same g at every fit, and a loaded codec that decodes
    alike."""
    dm = datamodule(world)
    dm.setup("fit")
    clips = [b["video"] for b in dm.train_dataloader()]
    video = torch.cat(clips)
    linear = PCACodec(components=12, spatial=4, temporal=4)
    assert linear.fit(clips) == 0  # no refined decode: no steps
    torch.manual_seed(7)
    expected_draw = torch.rand(3)
    torch.manual_seed(7)
    refined = PCACodec(components=12, spatial=4, temporal=4, refine=16, refine_steps=300, refine_noise=0.0)
    assert refined.fit(clips, max_refine_steps=1000) == 300  # its own steps when the budget allows them
    assert torch.equal(torch.rand(3), expected_draw)  # the fit forked the RNG
    assert torch.equal(refined.basis, linear.basis) and torch.equal(refined.encode(video), linear.encode(video))
    assert list(refined.parameters()) == [] and {"refine_w1", "refine_b3"} <= set(refined.state_dict())
    latent = refined.encode(video)
    error = {name: (codec.decode(latent) - video).abs().mean().item() for name, codec in
             (("linear", linear), ("refined", refined))}
    assert error["refined"] < 0.9 * error["linear"], error
    # g computed by torch's layers from the same weights
    g = torch.nn.Sequential(torch.nn.Conv2d(12, 16, 3, padding=1), torch.nn.GELU(), torch.nn.Conv2d(16, 16, 3, padding=1),
                            torch.nn.GELU(), torch.nn.Conv2d(16, 192, 1))
    for layer, i in zip(g[::2], (1, 2, 3)):
        layer.weight.data.copy_(getattr(refined, f"refine_w{i}"))
        layer.bias.data.copy_(getattr(refined, f"refine_b{i}"))
    correction = rearrange(g(rearrange(latent, "b k t h w -> (b t) k h w")), "(b t) d h w -> b d t h w", b=len(video))
    with torch.no_grad():
        assert torch.allclose(refined.decode(latent), linear.decode(latent) + linear.pixels.decode(correction), atol=1e-5)
    again = PCACodec(components=12, spatial=4, temporal=4, refine=16, refine_steps=300, refine_noise=0.0)
    again.fit(clips)
    assert torch.equal(again.refine_w1, refined.refine_w1)
    loaded = PCACodec(components=12, spatial=4, temporal=4, refine=16)
    loaded.load_state_dict(refined.state_dict())
    assert torch.equal(loaded.decode(latent), refined.decode(latent))
    with pytest.raises(ValueError, match="refine"):
        PCACodec(refine=-1)


def test_pca_codec_is_fitted_on_the_training_clips_and_kept_in_checkpoints(world: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """A module with an unfitted PCACodec fits it in setup("fit") from the datamodule and trains; its basis and
    refined decode are in the state dict, so a new module that loads it samples the same video. The refined decode
    is fitted for the run's step budget when that is shorter than its own steps."""
    def pca_module() -> GenerationModule:
        net = DiT(in_channels=24, dim=32, depth=1, heads=2, ffn_dim=64, patch=(1, 1, 1), max_t=2, max_h=4, max_w=4)
        text = Text(TextConditioner({"byte": ByteEncoder(dim=32, depth=1, heads=2, max_length=64)}, dim=32))
        codec = PCACodec(components=24, spatial=4, temporal=4, fit_clips=16, refine=8, refine_steps=500)
        return GenerationModule(net, codec, {"text": text}, optimizer=partial(torch.optim.AdamW, lr=3e-3),
                                sampler=dict(steps=3))
    model = pca_module()
    trainer(2).fit(model, datamodule(world))
    assert "fitted on 16 training clips, its decode refined in 2 steps" in capsys.readouterr().out
    assert model.codec.fitted and model.codec.basis.abs().sum() > 0 and model.codec.refine_w3.abs().sum() > 0
    state = model.state_dict()
    assert {"codec.basis", "codec.mean", "codec.scale", "codec.refine_w1"} <= set(state)
    again = pca_module()
    again.load_state_dict(state)
    model.eval(), again.eval()
    ask = {"text": ["A red circle bounces around."], "fps": 8.0}
    assert torch.equal(model.generate(ask, 4, 16, 16, seed=3), again.generate(ask, 4, 16, 16, seed=3))


def test_short_training_lowers_the_loss(world: Path) -> None:
    model = module(lr=3e-3, text_dropout=0.1)
    batch = held_out(world)
    before = fixed_loss(model, batch)
    trainer(60).fit(model, datamodule(world))
    after = fixed_loss(model, batch)
    assert after < 0.7 * before, (before, after)


def test_upsampler_trains_and_samples_in_fused_windows(world: Path) -> None:
    model = module(upsampler=True, evaluators={"fidelity": Fidelity(baselines=["bilinear"])})
    trainer(2).fit(model, datamodule(world))
    model.eval()
    batch = held_out(world)
    video = batch["video"][:2]
    low_res = model.conditioners["low_res"]
    low = low_res.low_resolution(video)
    assert low.shape == (2, 3, 4, 8, 8)
    windows: list[tuple[int, ...]] = []
    model.net.register_forward_pre_hook(lambda _, args: windows.append(tuple(args[0].shape)))
    up = model.generate({"source": low, "text": batch["text"][:2], "fps": 8.0}, 4, 16, 16, steps=3)
    assert up.shape == video.shape
    # 4 latent frames, windows of 2 overlapping by 1: (0, 2), (1, 3), (2, 4) at each of the 3 steps
    assert len(windows) == 9 and all(shape[2] == 2 for shape in windows)
    assert psnr(resize_video(low, 16, 16), video).mean() > 10
    assert torch.allclose(psnr(video, video), torch.full((2,), 100.0))
    # the test loop logs PSNR / SSIM beside the bilinear baseline
    metrics = trainer(0, limit_test_batches=1).test(model, datamodule(world))[0]
    assert {"test/psnr", "test/ssim", "test/psnr_bilinear", "test/ssim_bilinear"} <= set(metrics), metrics
    assert metrics["test/psnr_bilinear"] > 10


def test_probe_alignment_by_hand_and_a_probe_that_learns_colour(world: Path) -> None:
    logits = {"shape": torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])}
    targets = {"shape": torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0]])}  # two objects: ranks 1 and 2 of the logits
    assert topk_alignment(logits, targets)["shape"].item() == 1.0
    targets = {"shape": torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]])}  # top-2 = {1, 3}: one of two right
    assert topk_alignment(logits, targets)["shape"].item() == 0.5
    probe = probe_from_datamodule(datamodule(world), ProbeConfig(steps=250, lr=3e-3), cache_dir=None)
    batch = held_out(world)
    colour = topk_alignment(probe.classify(batch["video"]), attribute_targets(batch["meta"]))["colour"]
    assert colour.mean() > 0.3  # chance is 1/8
    assert isinstance(probe, VideoProbe) and probe(batch["video"]).shape == (8, 32)


QUICK = ["experiment=quickstart", "trainer.max_steps=6", "data.epoch_batches=3", "trainer.check_val_every_n_epoch=1",
         "data.val_batches=1", "data.batch_size=4",
         "data.val_batch_size=null", "data.num_workers=0", "trainer.limit_test_batches=1",
         "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=2", "model.sampler.steps=3", "model.media.steps=2",
         "model.evaluators.probe.steps=4", "model.evaluators.samples.count=2",
         "data.world.scenes=[16,8]", "+data.world.seed=9"]


def test_quickstart_end_to_end_then_sample_and_evaluate(outputs: Path, tmp_path: Path) -> None:
    """Reduced quickstart: a fresh world, training with EMA, validation media, held-out samples with probe
    metrics, all in MLflow; then `task=sample` and `task=evaluate` from its last checkpoint."""
    data_dir = tmp_path / "data"
    overrides = [*QUICK, f"data.data_dir={data_dir}", f"model.evaluators.probe.cache_dir={tmp_path / 'probes'}"]
    run(compose_config(overrides, outputs / "fit"))
    assert list(data_dir.glob("shapes_world-*/world.json")), "the world was generated"
    assert len(list((tmp_path / "probes").glob("probe-*.pt"))) == 1, "the probe was trained and cached"
    client = MlflowClient(sqlite_uri(outputs))
    (fit_run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    metrics = fit_run.data.metrics
    for name in ("train/loss", "val/loss", "test/alignment", "test/alignment_real", "test/fd"):
        assert name in metrics, sorted(metrics)
    assert 0.0 <= metrics["test/alignment"] <= 1.0
    artifacts = {a.path for a in client.list_artifacts(fit_run.info.run_id, "samples")}
    assert sum(p.endswith(".mp4") for p in artifacts) == 2
    steps = [a.path for a in client.list_artifacts(fit_run.info.run_id, "media")]
    media = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(fit_run.info.run_id, steps[-1])}
    assert {"sample_0.mp4", "real_0.mp4", "sample.png"} <= media
    (ckpt,) = (outputs / "fit").glob("checkpoints/last.ckpt")
    assert "EMA" in torch.load(ckpt, weights_only=True)["callbacks"]

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A small red circle bounces around, on a plain white background.\n\nA small blue star sits still.\n")
    run(compose_config([*overrides, "task=sample", f"ckpt_path={ckpt}", f"model.sample.prompts={prompts}",
                        f"model.sample.output_dir={tmp_path / 'samples'}"], outputs / "sample"))
    written = sorted(p.name for p in (tmp_path / "samples").glob("*.mp4"))
    assert written == ["000_a_small_red_circle_bounces_around_on_a_p.mp4", "001_a_small_blue_star_sits_still.mp4"]
    from datamodules.media import decode_video

    clip = decode_video(tmp_path / "samples" / written[0])
    assert clip.frames.shape[0] == 8

    run(compose_config([*overrides, "task=evaluate", f"ckpt_path={ckpt}"], outputs / "evaluate"))
    # tasks run from a checkpoint log into the checkpoint's MLflow run (the runner resumes it)
    (same_run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert {"eval/alignment", "eval/fd", "test/alignment"} <= set(same_run.data.metrics)
    assert "samples/prompts.txt" in {a.path for a in client.list_artifacts(same_run.info.run_id, "samples")}


def test_quickstart_in_bf16_mixed_precision_scores_in_float32(outputs: Path, tmp_path: Path) -> None:
    """`trainer.precision=bf16-mixed` on the CPU (the quickstart's choice where bfloat16 is fast): it trains, samples
    and is judged, and the judges score in float32: the real clips' scores, which do not depend on the generator,
    equal those of a float32 run of the same world to float32's precision."""
    data_dir = tmp_path / "data"
    overrides = [*QUICK, f"data.data_dir={data_dir}", f"model.evaluators.probe.cache_dir={tmp_path / 'probes'}"]
    client = MlflowClient(sqlite_uri(outputs))
    metrics = {}
    for precision in ("32-true", "bf16-mixed"):
        run(compose_config([*overrides, f"trainer.precision={precision}", f"run_name={precision}"], outputs / precision))
        (found,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id],
                                      f"attributes.run_name = '{precision}'")
        metrics[precision] = found.data.metrics
    assert math.isfinite(metrics["bf16-mixed"]["train/loss"]) and "test/fd" in metrics["bf16-mixed"]
    real = [k for k in metrics["32-true"] if k.startswith("test/") and "_real" in k]
    assert len(real) > 10, real
    for name in real:
        assert metrics["bf16-mixed"][name] == pytest.approx(metrics["32-true"][name], rel=1e-5, abs=1e-6), name


STAGE = ["trainer.max_steps=2", "data.epoch_batches=2", "data.batch_size=2", "data.num_workers=0",
         "trainer.limit_val_batches=0", "test_after_fit=false", "trainer.enable_progress_bar=false",
         "data.world.scenes=[8,4]", "data.world.images=[8,4]"]


def _stage_weights(job: Path) -> dict[str, torch.Tensor]:
    (ckpt,) = job.glob("checkpoints/last.ckpt")
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def _assert_starts_from(later: dict[str, torch.Tensor], earlier: dict[str, torch.Tensor]) -> None:
    """Every weight of the earlier stage is in the later one; position tables grew, their old rows kept."""
    for key, value in earlier.items():
        if not value.is_floating_point():
            continue
        grown = later[key][tuple(slice(0, n) for n in value.shape)]
        assert torch.equal(grown, value), key


def test_stages_start_from_the_previous_stage(outputs: Path, tmp_path: Path) -> None:
    """t2i_stage1 -> t2v_stage2 -> t2v_stage3_hires, each found by its default `model.init_from` (the previous
    experiment's newest last.ckpt). Stages 2 and 3 run at lr 0, so their checkpoints hold exactly the weights
    they started from: the previous stage's, position tables grown to the larger sizes."""
    common = [*STAGE, f"data.data_dir={tmp_path / 'data'}"]
    run(compose_config(["experiment=t2i_stage1", *common], outputs / "t2i_stage1" / "job"))
    frozen = ["model.optimizer.lr=0.0"]
    run(compose_config(["experiment=t2v_stage2", *common, *frozen], outputs / "t2v_stage2" / "job"))
    run(compose_config(["experiment=t2v_stage3_hires", *common, *frozen], outputs / "t2v_stage3_hires" / "job"))
    stage1, stage2, stage3 = (_stage_weights(outputs / name / "job")
                              for name in ("t2i_stage1", "t2v_stage2", "t2v_stage3_hires"))
    assert stage2["net.pos.h"].shape[0] > stage1["net.pos.h"].shape[0]
    assert stage3["net.pos.h"].shape[0] > stage2["net.pos.h"].shape[0]
    _assert_starts_from(stage2, stage1)
    _assert_starts_from(stage3, stage2)


@pytest.mark.slow
def test_the_quickstart_follows_the_prompts_colours(outputs: Path) -> None:
    """The full quickstart (about 7 CPU minutes): its held-out samples show the prompt's object colour far above
    chance (1/8), judged by the probe trained on real clips."""
    run(compose_config(["experiment=quickstart", "trainer.enable_progress_bar=false"], outputs / "fit"))
    client = MlflowClient(sqlite_uri(outputs))
    (fit_run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    metrics = fit_run.data.metrics
    assert metrics["test/alignment_colour"] > 0.5, metrics
    assert metrics["test/alignment"] > 0.35, metrics


def test_upsampler_experiment_upsamples_a_video_file(outputs: Path, tmp_path: Path) -> None:
    """experiment=upsampler_tiny trains for 2 steps (validation logs PSNR beside the bilinear baseline); then
    `task=sample` with `model.sample.inputs=` a folder holding a 16x16 mp4 and its caption writes a 32x32 mp4."""
    from datamodules.media import decode_video, write_video

    small = ["experiment=upsampler_tiny", f"data.data_dir={tmp_path / 'data'}", "data.world.scenes=[8,4]",
             "data.world.images=[2,1]", "+data.world.seed=3", "data.batch_size=2", "data.epoch_batches=2",
             "data.num_workers=0", "trainer.max_steps=2", "trainer.check_val_every_n_epoch=1",
             "trainer.limit_val_batches=1", "test_after_fit=false", "trainer.enable_progress_bar=false",
             "model.sampler.steps=2", "model.media.steps=2"]
    run(compose_config(small, outputs / "fit"))
    client = MlflowClient(sqlite_uri(outputs))
    (fit_run,) = client.search_runs([client.get_experiment_by_name("upsampler_tiny").experiment_id])
    assert {"val/psnr", "val/psnr_bilinear", "val/ssim"} <= set(fit_run.data.metrics), fit_run.data.metrics
    (ckpt,) = (outputs / "fit").glob("checkpoints/last.ckpt")

    inputs = tmp_path / "inputs"
    low = torch.rand(3, 8, 16, 16) * 2 - 1
    write_video(inputs / "clip.mp4", low, fps=8.0)
    (inputs / "clip.txt").write_text("A small red circle bounces around.\n")
    run(compose_config([*small, "task=sample", f"ckpt_path={ckpt}", f"model.sample.inputs={inputs}",
                        f"model.sample.output_dir={tmp_path / 'up'}"], outputs / "sample"))
    (out,) = (tmp_path / "up").glob("*.mp4")
    assert out.name == "000_clip.mp4"
    assert decode_video(out).frames.shape == (8, 32, 32, 3)
    assert (tmp_path / "up" / "000_clip.txt").read_text().strip() == "A small red circle bounces around."


def test_time_sampler_uniform_fraction_covers_the_low_noise_end() -> None:
    torch.manual_seed(0)
    shifted = TimeSampler(shift=6.0)(20_000)
    mixed = TimeSampler(shift=6.0, uniform_fraction=0.25)(20_000)
    assert (shifted > 0.9).float().mean() < 1e-3  # shift 6 leaves the low-noise end untrained
    assert (mixed > 0.9).float().mean() == pytest.approx(0.025, abs=0.006)  # 25% uniform: 10% of them above 0.9
    assert mixed.min() >= 0 and mixed.max() < 1
    with pytest.raises(ValueError, match="uniform_fraction"):
        TimeSampler(uniform_fraction=1.5)(4)
