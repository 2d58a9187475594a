"""Animated Stickers' conditioning and stages: the sticker frame, motion buckets (written with the shards, used as
a condition and a filter), the image model inflated from its checkpoint, the three-pass guidance, and a short
training whose output follows the sticker."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from datamodules.media import encode_frames, scan_video
from datamodules.samples import BucketTable, VideoHandler
from datamodules.sources import SkipSample
from datamodules.synthetic.generate import WorldConfig, make_sticker
from datamodules.synthetic.world import MOTION_BUCKET_EDGES, motion_bucket, motion_score
from experiments.compose import compose_config
from lightning_modules.conditioning import MotionBucket, StillImage
from lightning_modules.generation import GenerationModule


def sticker_module(outputs: Path, *overrides: str) -> GenerationModule:
    cfg = compose_config(["model=sticker_tiny", "model.evaluators=null", "model.scheduler=null", *overrides],
                         outputs / "job")
    return instantiate(cfg.model)


def batch_of(video: torch.Tensor, buckets: list[int]) -> dict:
    n = video.shape[0]
    return {"video": video, "text": [f"a {c} star" for c in ("red", "blue", "green", "yellow")[:n]],
            "fps": torch.full((n,), 8.0), "meta": [{"motion_bucket": b} for b in buckets]}


# -- motion buckets ----------------------------------------------------------------------------------------------

def test_motion_bucket_edges_by_hand() -> None:
    assert MOTION_BUCKET_EDGES[0] == 0.0025 and all(b == 2 * a for a, b in zip(MOTION_BUCKET_EDGES, MOTION_BUCKET_EDGES[1:]))
    assert [motion_bucket(s) for s in (0.0, 0.0024, 0.0025, 0.003, 0.0199, 0.02, 0.159, 0.16, 5.0)] == \
        [0, 0, 1, 1, 3, 4, 6, 7, 7]


def test_scan_video_counts_frames_and_measures_motion_like_the_world() -> None:
    moving = make_sticker(WorldConfig(), "train", 3).frames  # 64 px, a looping motion
    still = np.repeat(moving[:1], len(moving), axis=0)
    frames, score = scan_video(encode_frames(moving, 8.0), thumbnail=64)
    assert frames == len(moving)
    assert score == pytest.approx(motion_score(moving), abs=0.003)  # the codec adds a little noise
    assert scan_video(encode_frames(still, 8.0))[1] < 0.001


def sample_with(meta: dict) -> dict:
    frames = make_sticker(WorldConfig(sticker_size=16, sticker_frames=[8]), "train", 0).frames
    return {"mp4": encode_frames(frames, 8.0), "txt": b"a sticker", "json": json.dumps(meta).encode()}


def test_min_motion_bucket_filters_clips_below_it() -> None:
    handler = VideoHandler(BucketTable([[16, 16]], [8], 4), fps=8.0, min_motion_bucket=3)
    meta = {"width": 16, "height": 16, "fps": 8.0, "num_frames": 8, "duration": 1.0}
    assert handler.bucket(sample_with({**meta, "motion_bucket": 3})).frames == 8
    with pytest.raises(SkipSample) as slow:
        handler.bucket(sample_with({**meta, "motion_bucket": 2}))
    assert slow.value.reason == "low_motion"
    with pytest.raises(SkipSample) as unknown:
        handler.bucket(sample_with(meta))
    assert unknown.value.reason == "no_motion_bucket"


def test_motion_bucket_condition_reads_the_batch_then_the_json_then_the_default() -> None:
    cond = MotionBucket(dim=4, default=5)
    batch = {"text": ["a", "b", "c"], "meta": [{"motion_bucket": 2}, {"motion_score": 0.05}, {}]}
    raw = cond.inputs(batch, None, (12, 3, 8, 8), train=False)
    assert raw.tolist() == [[3] * 3, [6] * 3, [6] * 3]  # bucket + 1 per latent frame (0 is the null)
    asked = cond.inputs({**batch, "motion_bucket": [7, 0, 1]}, None, (12, 2, 8, 8), train=False)
    assert asked.tolist() == [[8, 8], [1, 1], [2, 2]]
    with torch.no_grad():
        cond.embedding.weight.copy_(torch.arange(9.0)[:, None].expand(9, 4))
    assert cond(raw)[:, 0, 0].tolist() == [3.0, 6.0, 6.0]
    assert cond(cond.drop(raw, torch.tensor([True, False, True])))[:, 0, 0].tolist() == [3.0, 0.0, 6.0]
    with pytest.raises(ValueError, match="no motion_bucket or motion_score"):
        MotionBucket(dim=4).inputs({"text": ["a"], "meta": [{}]}, None, (12, 1, 8, 8), train=False)


# -- the sticker frame ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("frame, index", [("first", 0), ("middle", 4)])
def test_still_image_takes_the_first_or_middle_frame_or_the_given_sticker(frame: str, index: int) -> None:
    video = torch.randn(2, 3, 8, 4, 4)
    cond = StillImage(channels=3, frame=frame)
    raw = cond.inputs({"video": video}, lambda v: v, (3, 8, 4, 4), train=True)
    assert torch.equal(raw, video[:, :, index:index + 1].expand(-1, -1, 8, -1, -1))
    sticker = torch.randn(2, 3, 4, 4)
    given = cond.inputs({"video": video, "image": sticker}, lambda v: v, (3, 8, 4, 4), train=True)
    assert torch.equal(given, sticker[:, :, None].expand(-1, -1, 8, -1, -1))


def test_random_frame_varies_in_training_and_is_the_middle_otherwise() -> None:
    cond = StillImage(channels=3, frame="random")
    torch.manual_seed(0)
    drawn = torch.cat([cond.frame_index(8, 64, train=True) for _ in range(4)])
    assert drawn.min() == 0 and drawn.max() == 7
    assert cond.frame_index(8, 3, train=False).tolist() == [4, 4, 4]


# -- the stages: base → inflated, and the three-pass guidance ----------------------------------------------------------

def test_the_video_model_starts_as_the_image_checkpoint_on_every_frame(outputs: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    image_cfg = compose_config(["model=unet_tiny", "model.evaluators=null", "model.scheduler=null"], outputs / "job")
    image = instantiate(image_cfg.model)
    with torch.no_grad():  # make every zero-initialised output non-zero, so the comparison means something
        for p in image.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save({"state_dict": image.state_dict()}, tmp_path / "base.ckpt")
    video = sticker_module(outputs, f"model.init_from={tmp_path / 'base.ckpt'}")
    video.load_stage_weights(tmp_path / "base.ckpt")
    assert video.net.conv_in.conv.weight[:, 12:].abs().sum() == 0  # the sticker's input weights start at zero
    batch = batch_of(torch.rand(2, 3, 8, 16, 16) * 2 - 1, [1, 6])
    x, t = torch.randn(2, 12, 8, 8, 8), torch.rand(2)
    with torch.no_grad():
        conditions = video.conditions(video.condition_inputs({**batch, "frames": 8}, (12, 8, 8, 8), False),
                                      batch["fps"], {})
        out = video(x, t, conditions)
        ref = image.net(x, t, conditions.context, conditions.context_mask, fps=conditions.fps)
    assert torch.allclose(out, ref, atol=1e-5)


def test_three_pass_image_and_text_guidance_by_hand(outputs: Path) -> None:
    module = sticker_module(outputs, "model.sampler.solver=euler", "model.sampler.schedule=uniform")  # one step: t = 0 -> 1
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    passes, scales = module.guidance_passes(module.sampler.guidance)
    assert passes == [{"image": False, "text": False}, {"image": True, "text": False},
                      {"image": True, "text": True}] and scales == [1.5, 4.0]
    batch = batch_of(torch.rand(2, 3, 8, 16, 16) * 2 - 1, [2, 5])
    noise = torch.randn(2, 12, 8, 8, 8)
    got = module.generate(batch, 8, 16, 16, steps=1, noise=noise, return_latent=True)
    with torch.no_grad():
        raw = module.condition_inputs({**batch, "frames": 8}, (12, 8, 8, 8), False)
        t0 = torch.zeros(2)
        p = [module(noise, t0, module.conditions(raw, batch["fps"], on)) for on in passes]
    guided = p[0] + 1.5 * (p[1] - p[0]) + 4.0 * (p[2] - p[1])
    assert module.objective.prediction == "data"
    assert torch.allclose(got, guided, atol=1e-4)  # one Euler step over [0, 1] lands on the predicted (guided) clip


def test_short_training_lowers_the_loss_and_the_output_follows_the_sticker(outputs: Path) -> None:
    torch.manual_seed(0)
    module = sticker_module(outputs, "model.net.channels=[16,32]", "model.net.heads=2")
    clips = torch.from_numpy(np.stack([make_sticker(WorldConfig(sticker_size=16, sticker_frames=[8]), "train", i).frames
                                       for i in range(8)])).float()
    video = clips.permute(0, 4, 1, 2, 3) / 127.5 - 1.0
    batch = {"video": video, "text": ["a sticker"] * 8, "fps": torch.full((8,), 8.0),
             "meta": [{"motion_bucket": 3}] * 8}
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=3e-3)
    t, noise = torch.full((8,), 0.5), torch.randn(8, 12, 8, 8, 8)
    before = float(module.loss(batch, t=t, noise=noise))
    for _ in range(25):
        optimizer.zero_grad()
        module.loss(batch, train=True).backward()
        optimizer.step()
    assert float(module.loss(batch, t=t, noise=noise)) < 0.7 * before

    def predict(stickers: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            request = {**batch, "video": video[:2], "text": batch["text"][:2], "fps": batch["fps"][:2],
                       "meta": batch["meta"][:2], "image": stickers, "frames": 8}
            raw = module.condition_inputs(request, (12, 8, 8, 8), False)
            return module(noise[:2], t[:2], module.conditions(raw, request["fps"], {}))

    a, b = predict(video[:2, :, 4]), predict(video[2:4, :, 4])
    assert (a - b).abs().mean() > 0.05  # the sticker steers the prediction
    with torch.no_grad():
        module.net.conv_in.conv.weight[:, 12:].zero_()
    assert torch.allclose(predict(video[:2, :, 4]), predict(video[2:4, :, 4]))  # ... through its input weights only


def test_paper_scale_config_on_the_meta_device_counts_spatial_plus_temporal(outputs: Path) -> None:
    """The inflated paper-scale UNet = the image UNet + per conv site C·C·3 + C (TemporalConv) + per attention site
    4·C² + 2·C (LayerNorm, q, kv, out of TemporalAttention, head_dim·heads = C): counted another way."""
    from lightning_modules.nn.temporal import sites, temporal_parameters
    from lightning_modules.nn.unet import UNet

    cfg = compose_config(["model=sticker_emu"], outputs / "job")
    kwargs = {k: v for k, v in cfg.model.net.items() if k not in ("_target_", "freeze_spatial")}
    with torch.device("meta"):
        video, image = instantiate(cfg.model.net), UNet(**kwargs)
    count = lambda params: sum(p.numel() for p in params)  # noqa: E731
    by_formula = sum(3 * s.channels ** 2 + s.channels if s.inflate_site == "conv" else 4 * s.channels ** 2 + 2 * s.channels
                     for _, s in sites(video))
    assert count(temporal_parameters(video)) == by_formula
    assert count(video.parameters()) == count(image.parameters()) + by_formula
    print(f"sticker_emu: {count(image.parameters()) / 1e9:.2f}B spatial + {by_formula / 1e9:.2f}B temporal")
    assert 1e9 < count(video.parameters()) < 5e9


# -- the line end to end: sample a sticker; the ensemble's gallery, labels and selected shards ---------------------------

SMALL = ["data.world.scenes=[8,4]", "data.world.images=[8,4]", "data.world.stickers=[16,8]", "data.batch_size=4",
         "data.epoch_batches=2", "data.num_workers=0", "trainer.enable_progress_bar=false", "model.media.steps=2"]


def test_a_sticker_becomes_an_mp4_and_a_looping_gif(outputs: Path, tmp_path: Path) -> None:
    from datamodules.media import decode_video, write_image
    from experiments.runner import run

    fit = ["experiment=sticker_stage2", *SMALL, "trainer.max_steps=2", "model.init_from=null", "test_after_fit=false",
           "trainer.limit_val_batches=0"]
    run(compose_config(fit, outputs / "fit"))
    (ckpt,) = (outputs / "fit").glob("checkpoints/last.ckpt")
    inputs = tmp_path / "stickers"
    write_image(inputs / "star.png", torch.rand(3, 32, 32) * 2 - 1)  # a 32 px sticker: resized to 16 px
    (inputs / "star.txt").write_text("A sticker of a red star that bobs up and down, looping.\n")
    run(compose_config([*fit, "task=sample", f"ckpt_path={ckpt}", f"model.sample.inputs={inputs}",
                        "model.sampler.steps=2", f"model.sample.output_dir={tmp_path / 'out'}"], outputs / "sample"))
    assert decode_video(tmp_path / "out" / "000_star.mp4").frames.shape == (8, 16, 16, 3)
    from PIL import Image

    with Image.open(tmp_path / "out" / "000_star.gif") as gif:
        assert gif.n_frames == 8 and gif.info.get("loop") == 0 and gif.size == (16, 16)


@pytest.mark.slow  # two teachers, a probe and two ensemble passes (~2 min): python -m pytest -m slow
def test_ensemble_writes_a_gallery_and_selects_by_labels_then_judges(outputs: Path, tmp_path: Path) -> None:
    import csv

    from experiments.runner import run

    fit = ["experiment=sticker_stage2", *SMALL, "trainer.max_steps=2", "model.init_from=null", "test_after_fit=false",
           "trainer.limit_val_batches=0"]
    run(compose_config(fit, outputs / "fit"))
    ckpt = next((outputs / "fit").glob("checkpoints/last.ckpt"))
    ensemble = ["experiment=sticker_ensemble", *SMALL, "ensemble.pool=3", "ensemble.seeds=1", "ensemble.steps=2",
                f"ensemble.teachers.middle.checkpoint={ckpt}", f"ensemble.teachers.first.checkpoint={ckpt}",
                "~ensemble.teachers.moving", "ensemble.probe.steps=20", "ensemble.probe.clips=16",
                f"ensemble.output_dir={tmp_path / 'judged'}", f"ensemble.probe_cache={tmp_path / 'probes'}"]
    run(compose_config(ensemble, outputs / "ensemble"))
    gallery = tmp_path / "judged" / "gallery"
    rows = list(csv.DictReader((gallery / "labels.csv").open()))
    assert len(rows) == 6 and {r["teacher"] for r in rows} == {"middle", "first"}
    assert all((gallery / f"{r['key']}.gif").is_file() for r in rows) and "<table>" in (gallery / "index.html").read_text()
    by_judges = {r["key"] for r in rows if r["judge_pass"] == "1"}
    index = json.loads((tmp_path / "judged" / "selected" / "index.json").read_text())
    assert index["num_samples"] == len(by_judges)  # no labels: the judges decide

    # a person keeps the first two and rejects the rest: the selection follows the labels, not the judges
    for i, row in enumerate(rows):
        row["keep"] = "yes" if i < 2 else "no"
    with (tmp_path / "labels.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    run(compose_config([*ensemble, f"ensemble.labels={tmp_path / 'labels.csv'}",
                        f"ensemble.output_dir={tmp_path / 'labelled'}"], outputs / "labelled"))
    from datamodules.video import VideoDataModule

    data = VideoDataModule(shards=str(tmp_path / "labelled" / "selected"), val_shards=str(tmp_path / "labelled" / "selected"),
                           sizes=[[16, 16]], frames=[8], batch_size=2, num_workers=0, min_samples=1)
    data.setup("fit")
    keys = sorted(k for batch in data.val_dataloader() for k in batch["key"])
    assert keys == sorted(r["key"].replace("-", "_") for r in rows[:2])


def test_judges_evaluator_rates_samples_beside_the_real_clips() -> None:
    from lightning_modules.evaluation.sticker_judges import StickerJudges, judge

    world = WorldConfig(sticker_size=16, sticker_frames=[8])
    clips = torch.from_numpy(np.stack([make_sticker(world, "val", i).frames for i in range(6)])).float()
    real = clips.permute(0, 4, 1, 2, 3) / 127.5 - 1.0
    still = real[:, :, 4:5].expand(-1, -1, 8, -1, -1)
    evaluator = StickerJudges()
    evaluator.start(None, None)  # no trainer: no probe, so no relevance judge
    evaluator.update(still, {"video": real, "meta": [{}] * 6, "fps": torch.full((6,), 8.0)}, {})
    rates = evaluator.compute()
    expected = judge(real, real[:, :, 4], torch.full((6,), 4), None)
    assert rates["judge_real_pass"] == pytest.approx(float(expected["pass"].float().mean()))
    assert rates["judge_real_motion"] == pytest.approx(float(expected["motion_pass"].float().mean()))
    assert rates["judge_motion"] == 0.0 and rates["judge_identity"] == 1.0  # a still sticker: no motion, same look


def test_shards_of_a_folder_carry_the_motion_bucket(tmp_path: Path) -> None:
    import tarfile

    from datamodules.media import write_video
    from datamodules.write_shards import folder_to_shards

    moving = make_sticker(WorldConfig(sticker_size=32, sticker_frames=[8]), "train", 3).frames
    for name, frames in (("moving", moving), ("still", np.repeat(moving[:1], 8, axis=0))):
        write_video(tmp_path / "in" / f"{name}.mp4", torch.from_numpy(frames).permute(3, 0, 1, 2) / 127.5 - 1, fps=8.0)
        (tmp_path / "in" / f"{name}.txt").write_text(f"a {name} sticker\n")
    folder_to_shards(tmp_path / "in", tmp_path / "out", progress=False)
    metas = {}
    with tarfile.open(next((tmp_path / "out").glob("*.tar"))) as tar:
        for member in tar.getmembers():
            if member.name.endswith(".json"):
                metas[member.name.split(".")[0]] = json.loads(tar.extractfile(member).read())
    assert metas["still"]["motion_bucket"] == 0
    assert metas["moving"]["motion_bucket"] == motion_bucket(metas["moving"]["motion_score"]) > 0
    assert metas["moving"]["motion_score"] == pytest.approx(motion_score(moving), abs=0.004)
