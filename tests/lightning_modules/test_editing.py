"""Movie Gen Edit: with its new weights at zero the editor is exactly the text-to-video model; image edits take a
random temporal position; animated frame editing moves source and target by the same motion; backtranslation
keeps the real clip as the target; the edit metrics (a remove's success too) against values computed by hand;
SDEdit's two ends; one training step of every pair kind; short training lowers the loss (slow)."""

from __future__ import annotations

import io
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import pytest
import torch

import lightning_modules.evaluation.editing as editing_metrics
from datamodules.edits import (
    PAIR_KINDS,
    EditDataModule,
    affine_motion,
    animate,
    animated_batch,
    backtranslation_batch,
    image_edit_batch,
    inverse_instruction_pair,
    segmentation_batch,
    video_edit_batch,
)
from datamodules.media import crop_resize_frames, decode_video, frames_to_video, resize_crop_labels
from datamodules.synthetic.generate import WorldConfig, world_sample
from datamodules.synthetic.world import OBJECT_COLOURS
from lightning_modules.conditioning import SourceVideo, TaskTokens, Text
from lightning_modules.editing import EditingModule, sdedit
from lightning_modules.evaluation.editing import edit_region, edit_success, preservation_error, temporal_error
from lightning_modules.evaluation.probe import ATTRIBUTES
from lightning_modules.generation import GenerationModule
from lightning_modules.nn.codecs import PixelCodec
from lightning_modules.nn.dit import DiT
from lightning_modules.nn.text import TextConditioner, WordEncoder
from tests.helpers import fixed_loss, fixed_loss_before_and_after

pytestmark = pytest.mark.usefixtures("one_thread")

DIM, C = 32, 12  # model width; latent channels of PixelCodec(2)


def build(editor: bool, cls: type = GenerationModule) -> GenerationModule:
    """A T2V model, or the editor: + source video (concat) + task tokens and vector."""
    torch.manual_seed(0)
    net = DiT(in_channels=C, dim=DIM, depth=2, heads=4, ffn_dim=64, max_t=8, max_h=4, max_w=4, pooled_text=True,
              cond_channels=C if editor else 0)
    text = Text(TextConditioner({"word": WordEncoder(dim=16, depth=1, heads=2, max_length=16, buckets=64)}, dim=DIM),
                dropout=0.0)
    conditioners = {"text": text}
    guidance = {"text": 2.0}
    if editor:
        conditioners |= {"source": SourceVideo(C, dropout=0.1),
                         "task": TaskTokens(["t2v", "edit"], DIM, tokens=4, default="t2v", source_task="edit")}
        guidance = {"source": 1.5, "text": 2.0}
    return cls(net, PixelCodec(2), conditioners, optimizer=partial(torch.optim.AdamW, lr=2e-3),
               sampler=dict(steps=3, guidance=guidance))


def perturb(module: torch.nn.Module, scale: float = 0.05) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


@lru_cache(maxsize=1)
def world_pairs(count: int = 8, split: str = "train") -> dict:
    """A raw edit-pair batch as the datamodule gives it: the world's samples (real mp4s through PyAV, label maps
    from mask.npz) at 16x16, 8 frames."""
    config = WorldConfig(sizes=[[32, 32]], durations=[1.0], max_objects=1, radius_range=[0.25, 0.35],
                         backgrounds=["plain", "gradient"], fps=[8.0])
    items = []
    for index in range(count):
        sample = world_sample(config, "edits", split, index)
        source, target = decode_video(io.BytesIO(sample["mp4"])), decode_video(io.BytesIO(sample["edit.mp4"]))
        with np.load(io.BytesIO(sample["mask.npz"])) as archive:
            labels, target_labels = archive["labels"], archive["target_labels"]
        items.append({"video": frames_to_video(crop_resize_frames(source.frames[:8], (16, 16))),
                      "target_video": frames_to_video(crop_resize_frames(target.frames[:8], (16, 16))),
                      "labels": resize_crop_labels(labels[:8], (16, 16)).long(),
                      "target_labels": resize_crop_labels(target_labels[:8], (16, 16)).long(),
                      "text": sample["txt"], "meta": sample["json"]})
    return {"video": torch.stack([i["video"] for i in items]),
            "target_video": torch.stack([i["target_video"] for i in items]),
            "labels": torch.stack([i["labels"] for i in items]),
            "target_labels": torch.stack([i["target_labels"] for i in items]),
            "text": [i["text"] for i in items], "meta": [i["meta"] for i in items], "fps": torch.full((count,), 8.0)}


def pairs() -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else list(v)) for k, v in world_pairs().items()}


def test_zeroed_new_weights_give_exactly_the_text_to_video_model(tmp_path: Path) -> None:
    t2v = build(False)
    perturb(t2v)  # a "trained" T2V checkpoint: every weight non-zero
    torch.save({"state_dict": t2v.state_dict()}, tmp_path / "t2v.ckpt")
    source = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    batch = {"text": ["Make the red circle blue.", "a star"], "fps": torch.full((2,), 8.0)}
    x_t, t = torch.randn(2, C, 4, 8, 8), torch.tensor([0.3, 0.8])

    def predict(model: GenerationModule, extra: dict) -> torch.Tensor:
        with torch.no_grad():
            full = {**batch, **extra}
            return model(x_t, t, model.conditions(model.condition_inputs(full, (C, 4, 8, 8), False), full["fps"], {}))

    want = predict(t2v, {})
    editor = build(True)
    editor.load_stage_weights(tmp_path / "t2v.ckpt")  # source channels' patchify weights grown with zeros
    assert editor.net.patchify.weight[:, C:].abs().max() == 0
    edit = {"source": source, "task": ["edit", "edit"]}
    assert torch.equal(predict(editor, edit), want) and torch.equal(predict(editor, {}), want)  # edit and t2v
    with torch.no_grad():
        sampled = editor.generate({**batch, **edit}, 4, 16, 16, seed=0)  # 3 guided passes: source, text
    assert torch.equal(sampled, t2v.generate(batch, 4, 16, 16, seed=0))

    for layer in ("source", "tokens", "vector"):  # each new path reaches the prediction once its weights move
        moved = build(True)
        moved.load_stage_weights(tmp_path / "t2v.ckpt")
        with torch.no_grad():
            if layer == "source":
                moved.net.patchify.weight[:, C:].normal_(std=0.1)
            else:
                getattr(moved.conditioners["task"], f"to_{layer}").weight.normal_(std=0.5)
        assert (predict(moved, edit) - want).abs().max() > 1e-4, layer


def test_source_residual_predicts_the_edit_on_top_of_the_source() -> None:
    """model.residual_condition=source: X̂_1 = Enc(source) + net(...); without a source (T2V, or the source dropped
    for guidance) the net alone; a net that predicts no edit returns the source, pixel for pixel."""
    editor = build(True, partial(EditingModule, residual_condition="source", objective=dict(prediction="data")))
    perturb(editor)
    source = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    batch = {"text": ["Make the red circle blue.", "a star"], "fps": torch.full((2,), 8.0),
             "source": source, "task": ["edit", "edit"]}
    x_t, t = torch.randn(2, C, 4, 8, 8), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        for on, shift in (({}, editor.encode(source)), ({"source": False}, 0.0)):
            conditions = editor.conditions(editor.condition_inputs(batch, (C, 4, 8, 8), False), batch["fps"], on)
            net = editor.net(x_t, t, **conditions.backbone_kwargs())
            torch.testing.assert_close(editor(x_t, t, conditions), net + shift)
        editor.net.proj_out.weight.zero_()
        editor.net.proj_out.bias.zero_()
        kept = editor.generate(batch, 4, 16, 16, seed=0, guidance_scales={"source": 1.0, "text": 1.0})
    torch.testing.assert_close(kept, source, atol=2e-4, rtol=0)  # the path's sigma_min: not bit for bit
    with pytest.raises(ValueError, match="prediction=data"):
        build(True, partial(EditingModule, residual_condition="source"))
    with pytest.raises(ValueError, match="'task' must name a concatenated conditioner"):
        build(True, partial(EditingModule, residual_condition="task", objective=dict(prediction="data")))


def test_image_edits_take_a_random_temporal_position() -> None:
    raw = pairs()
    batch = image_edit_batch(raw, torch.Generator().manual_seed(0), max_frames=8)
    assert batch["video"].shape == (8, 3, 1, 16, 16) and batch["task"] == ["edit"] * 8
    assert batch["fps"].eq(0).all() and len(set(batch["frame_offset"].tolist())) > 1
    # each sample's one frame is the same frame f of its source and of its target
    for i in range(8):
        f = next(f for f in range(8) if torch.equal(raw["video"][i, :, f], batch["source"][i, :, 0]))
        assert torch.equal(raw["target_video"][i, :, f], batch["video"][i, :, 0])
    # the position reaches the backbone: the temporal table's row `offset` is used
    net = DiT(in_channels=C, dim=DIM, depth=1, heads=4, ffn_dim=64, max_t=8, max_h=4, max_w=4)
    pe = net.pos(1, 4, 4, torch.tensor([0, 5]))
    assert torch.equal(pe[0], net.pos(1, 4, 4)) and torch.allclose(pe[1] - pe[0], (net.pos.t[5] - net.pos.t[0]).expand(16, -1))
    with pytest.raises(ValueError, match="frame_offset"):
        net.pos(2, 4, 4, torch.tensor([7]))


def test_animated_frame_editing_moves_source_and_target_alike() -> None:
    # animate: content moved one pixel right = a translation of +2/W in normalised x (p' = p − v)
    image = torch.rand(1, 3, 16, 16)
    motion = torch.tensor([[[[1.0, 0, 0], [0, 1, 0]], [[1.0, 0, -2 / 16], [0, 1, 0]]]])
    moved = animate(image, motion)
    assert torch.allclose(moved[:, :, 0], image, atol=1e-6)
    assert torch.allclose(moved[:, :, 1, :, 1:], image[:, :, :, :-1], atol=1e-5)
    # affine_motion: τ = 0 is the identity; without rotation and zoom, the offset grows linearly in τ
    g = torch.Generator().manual_seed(0)
    m = affine_motion(4, 6, g, rotation=0.0, zoom=0.0)
    assert torch.allclose(m[:, 0], torch.tensor([[1.0, 0, 0], [0, 1, 0]]).expand(4, 2, 3))
    assert torch.allclose(m[..., :2], torch.eye(2).expand(4, 6, 2, 2))
    assert torch.allclose(m[:, :, :, 2], torch.arange(6.0)[None, :, None] * m[:, 1:2, :, 2], atol=1e-6)
    # the pair: a target that is the source + 0.25 everywhere stays exactly 0.25 apart in every frame
    raw = pairs()
    raw["target_video"] = raw["video"] + 0.25
    batch = animated_batch(raw, torch.Generator().manual_seed(1), frames=8)
    assert batch["video"].shape == batch["source"].shape == (8, 3, 8, 16, 16)
    assert torch.allclose(batch["video"] - batch["source"], torch.full_like(batch["video"], 0.25), atol=1e-5)
    assert (batch["source"][:, :, -1] - batch["source"][:, :, 0]).abs().mean() > 0.01  # it does move
    assert batch["labels"].shape == (8, 8, 16, 16) and "frame_offset" not in batch


def test_segmentation_paints_one_object_in_its_marker_colour() -> None:
    raw = pairs()
    batch = segmentation_batch(raw, torch.Generator().manual_seed(0))
    for i, text in enumerate(batch["text"]):
        obj = raw["meta"][i]["objects"][0]
        marker = text.rstrip(".").split(" in ")[-1]
        assert text.startswith(f"Mark the {obj['colour']} {obj['shape']} in ") and marker != obj["colour"]
        inside = raw["labels"][i] == obj["id"]
        want = torch.tensor(OBJECT_COLOURS[marker]) / 127.5 - 1
        assert torch.allclose(batch["video"][i].permute(1, 2, 3, 0)[inside], want.expand(int(inside.sum()), 3))
        assert torch.equal(batch["video"][i][:, ~inside], raw["video"][i][:, ~inside])
    assert torch.equal(batch["source"], raw["video"])


def test_backtranslation_pairs_have_the_right_roles() -> None:
    rng = np.random.default_rng(0)
    meta = {"objects": [{"colour": "red", "shape": "circle"}]}
    for _ in range(10):
        forward, inverse = inverse_instruction_pair(meta, rng)
        if forward.startswith("Make"):  # "Make the red circle <c>." / "Make the <c> circle red."
            new = forward.split()[-1].rstrip(".")
            assert forward == f"Make the red circle {new}." and inverse == f"Make the {new} circle red."
        else:
            new = forward.split()[-1].rstrip(".")
            assert inverse == f"Replace the red {new} with a red circle."
    raw = pairs()
    request = backtranslation_batch(raw, np.random.default_rng(0))
    editor = build(True, EditingModule)
    editor.backtranslation_steps = 2
    out = editor.backtranslate(request)
    assert out["video"] is request["video"] and torch.equal(out["video"], raw["video"])  # target: the real clip
    assert out["text"] == request["inverse_text"] and out["edited_text"] == request["text"]  # prompt: the inverse
    assert out["source"].shape == raw["video"].shape and not torch.equal(out["source"], raw["video"])  # input: edited
    assert editor.training  # restored after the no-grad edit


def test_edit_metrics_against_hand_computation() -> None:
    labels = torch.zeros(1, 2, 4, 4, dtype=torch.long)
    labels[0, :, 0, 0] = 1
    target_labels = torch.zeros_like(labels)
    target_labels[0, :, 3, 3] = 1
    region = edit_region(labels, target_labels, [1], dilate=0)
    assert region.sum() == 4 and region[0, 0, 0, 0, 0] == 1 and region[0, 0, 1, 3, 3] == 1
    assert edit_region(labels, target_labels, [1], dilate=1)[0, 0, 0].sum() == 8  # two 2x2 corners
    source = torch.zeros(1, 3, 2, 4, 4)
    video = source.clone()
    video[0, :, :, 0, 0] = 1.0  # inside the region: not counted
    video[0, 0, 1, 2, 1] = 0.6  # outside: one value of 3·(32 − 4) = 84
    assert torch.allclose(preservation_error(video, source, region), torch.tensor([0.6 / 84]))
    reference = torch.zeros(1, 1, 3, 1, 1)
    clip = torch.tensor([0.0, 1.0, 1.0]).view(1, 1, 3, 1, 1)  # differences (1, 0) vs (0, 0)
    assert torch.allclose(temporal_error(clip, reference), torch.tensor([0.5]))


def test_edit_success_of_a_remove_against_hand_computation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove "the red circle" from (red circle, blue square): the target keeps the blue square alone, so success
    is the probe's top-1 agreement with blue (colour) and square (shape), averaged; a recolour reads colour only."""

    class Probe:  # scores per clip as given; `extract` passed through
        def __init__(self, scores: dict[str, torch.Tensor]) -> None:
            self.scores = scores

        def outputs(self, features: torch.Tensor) -> dict:
            return {"scores": self.scores}

    monkeypatch.setattr(editing_metrics, "extract", lambda video, fps=None: video)
    colours, shapes = ATTRIBUTES["colour"], ATTRIBUTES["shape"]

    def scores(colour: str, shape: str) -> tuple[torch.Tensor, torch.Tensor]:  # red / circle second best
        c, s = torch.zeros(len(colours)), torch.zeros(len(shapes))
        c[colours.index("red")], s[shapes.index("circle")] = 1.0, 1.0
        c[colours.index(colour)], s[shapes.index(shape)] = 2.0, 2.0
        return c, s

    rows = [scores("red", "circle"), scores("blue", "square/diamond"), scores("blue", "circle")]
    probe = Probe({"colour": torch.stack([r[0] for r in rows]), "shape": torch.stack([r[1] for r in rows])})
    square = {"id": 2, "shape": "square", "colour": "blue", "motion": "still"}
    metas = [{"edit": {"kind": "remove", "object": 1}, "target_objects": [square]} for _ in rows]
    video = torch.zeros(3, 3, 2, 4, 4)
    # the removed object still read: 0; removed: 1; colour gone but shape still the circle's: (1 + 0) / 2
    assert torch.equal(edit_success(probe, video, metas, 8.0), torch.tensor([0.0, 1.0, 0.5]))
    recolour = [{"edit": {"kind": "recolour", "object": 2}, "target_objects": [square]} for _ in rows]
    assert torch.equal(edit_success(probe, video, recolour, 8.0), torch.tensor([0.0, 1.0, 1.0]))


def test_sdedit_ends() -> None:
    t2v = build(False)
    perturb(t2v)
    source = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    texts, fps = ["Make the red circle blue.", "a star"], torch.full((2,), 8.0)
    # strength 1: from pure noise, exactly text-to-video sampling with the same seed
    assert torch.equal(sdedit(t2v, source, texts, fps, strength=1.0, seed=3),
                       t2v.generate({"text": texts, "fps": fps}, 4, 16, 16, seed=3))
    # a tiny strength: one solver step from X_{t0} ≈ the source itself
    near = sdedit(t2v, source, texts, fps, strength=1e-4, seed=3)
    assert (near - source).abs().max() < 5e-3
    mid = sdedit(t2v, source, texts, fps, strength=0.5, seed=3)
    assert (mid - source).abs().mean() > (near - source).abs().mean()
    with pytest.raises(ValueError, match="strength"):
        sdedit(t2v, source, texts, fps, strength=0.0)


def test_one_training_step_of_every_pair_kind() -> None:
    editor = build(True, EditingModule)
    editor.backtranslation_steps = 1
    data = EditDataModule(pairs={"image_edit": 1.0}, sizes=[[16, 16]], frames=[8], max_frames=8, seed=0)
    optimizer = torch.optim.SGD(editor.parameters(), lr=1e-3)
    for kind in PAIR_KINDS:
        batch = data.training_batch(pairs(), kind)
        batch = editor.backtranslate(batch) if kind == "backtranslate" else batch
        loss = editor.loss(batch, train=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert torch.isfinite(loss), kind
    held_out = video_edit_batch(pairs())
    assert torch.equal(held_out["source"], world_pairs()["video"]) and held_out["task"][0] == "edit"
    assert torch.equal(held_out["video"], world_pairs()["target_video"])
    supervised = data.training_batch(pairs(), "video_edit")  # edit_supervised's diagnostic: the pair as it is
    assert torch.equal(supervised["source"], held_out["source"]) and torch.equal(supervised["video"], held_out["video"])
    assert torch.isfinite(editor.loss(held_out))
    with pytest.raises(ValueError, match="data.pairs"):
        EditDataModule(pairs={"paint": 1.0})


@pytest.mark.slow
def test_short_training_lowers_the_loss() -> None:
    """Image edits of the world (stage I's recipe without T2V): the held-out pairs' fixed loss drops."""
    editor = build(True, EditingModule)
    raw = world_pairs(16)
    generator = torch.Generator().manual_seed(0)
    clips = []
    for _ in range(6):
        batch = image_edit_batch(raw, generator, max_frames=8)
        clips += [{"video": batch["video"][i], "source": batch["source"][i], "text": batch["text"][i],
                   "task": "edit", "fps": batch["fps"][i], "frame_offset": batch["frame_offset"][i]}
                  for i in range(16)]
    held_out = image_edit_batch(world_pairs(8, "val"), torch.Generator().manual_seed(1), max_frames=8)
    before, after = fixed_loss_before_and_after(editor, held_out, clips, steps=60, batch_size=16)
    assert after < 0.8 * before, (before, after)
    assert fixed_loss(editor, held_out) < before


def test_task_edit_writes_the_edited_mp4(tmp_path: Path) -> None:
    import lightning as L

    from datamodules.media import write_video
    from lightning_modules.editing import edit_to_files

    editor = build(True, EditingModule)
    editor.sample_cfg.frames, editor.sample_cfg.height, editor.sample_cfg.width = 4, 16, 16
    write_video(tmp_path / "clip.mp4", world_pairs()["video"][0], fps=8.0)  # 8 frames, cut to 4
    trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path, enable_progress_bar=False)
    options = {"video": str(tmp_path / "clip.mp4"), "instruction": "Make the pink diamond blue."}
    written = edit_to_files(editor, trainer, options)
    edited = decode_video(tmp_path / "edited" / "clip_make_the_pink_diamond_blue.mp4")
    assert edited.frames.shape == (4, 16, 16, 3) and written[0].suffix == ".mp4"
    assert (tmp_path / "edited" / "clip_make_the_pink_diamond_blue.txt").read_text().strip() == options["instruction"]
    with pytest.raises(ValueError, match="edit.instruction"):
        edit_to_files(editor, trainer, {"video": options["video"]})
    with pytest.raises(FileNotFoundError, match="edit.video"):
        edit_to_files(editor, trainer, {**options, "video": str(tmp_path / "missing.mp4")})
