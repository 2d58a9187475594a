"""The personalization metrics (lightning_modules/evaluation/identity.py) on real clips of the world, whose answers are
known: object crops read by colour match the world's reference crops; an embedding trained on training identities
tells held-out identities apart (real clips: far above the floor and chance; clips of another identity: at them);
the copy measures are high for a pasted reference and near 0 for another clip of the identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datamodules.media import frames_to_video
from datamodules.references import clip_references, masked_crops
from datamodules.synthetic import WorldConfig
from datamodules.synthetic.generate import identity_references, make_identity_clip
from lightning_modules.evaluation.identity import (
    IdentityConfig,
    IdentityEvaluator,
    fit_identity,
    object_crops,
    pixel_similarity,
    pose_copy,
    rotate,
    training_crops,
)

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = WorldConfig(sizes=[[32, 32]], fps=[8.0], durations=[1.0], backgrounds=["plain", "gradient"], identities=8,
                    held_out_identities=4, clips_per_identity=[4, 4])


def shrink(x: torch.Tensor, size: int = 16) -> torch.Tensor:
    """[N, 3, (T,) H, W] → the same at size x size (bilinear, antialiased), as the datamodule's buckets."""
    if x.dim() == 4:
        return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return torch.stack([shrink(clip.transpose(0, 1)).transpose(0, 1) for clip in x])


def identity_batch(split: str, reference: str = "cross") -> dict:
    """The split's identity clips in the datamodules' schema at 16x16, with a reference crop (cross: from another
    clip of the identity)."""
    videos, references, metas = [], [], []
    for index in range(WORLD.count("identities", split)):
        rendered, identity = make_identity_clip(WORLD, split, index)
        refs = identity_references(WORLD, split, index)
        crop = refs[reference][0]
        videos.append(frames_to_video(torch.from_numpy(rendered.frames)))
        references.append(frames_to_video(torch.from_numpy(crop)[None])[:, 0])
        metas.append({"identity": identity, "objects": [{"id": o.id} for o in rendered.scene.objects]})
    return {"video": shrink(torch.stack(videos)), "reference": shrink(torch.stack(references)), "meta": metas}


def test_object_crops_by_colour_match_the_world_reference_crops() -> None:
    rendered, _ = make_identity_clip(WORLD, "train", 1)
    assert len(rendered.scene.objects) == 1
    by_label, chosen = clip_references(rendered.frames, rendered.labels == 1)  # what the world stores
    crops, area = object_crops(frames_to_video(torch.from_numpy(rendered.frames))[None], size=32)
    stored = torch.stack([frames_to_video(torch.from_numpy(c)[None])[:, 0] for c in by_label])
    assert pixel_similarity(crops[0, torch.from_numpy(chosen)], stored).min() > 0.97
    assert torch.allclose(area[0], torch.from_numpy((rendered.labels == 1).mean((1, 2))).float(), atol=0.02)
    # an empty mask gives a black crop, not NaNs
    assert masked_crops(torch.rand(1, 3, 8, 8), torch.zeros(1, 8, 8)).abs().max() == 0


def test_pose_copy_is_high_for_the_reference_itself_and_low_when_turned() -> None:
    reference = identity_batch("val")["reference"][0]
    pasted = pose_copy(reference[None], reference)
    turned = torch.stack([pose_copy(rotate(reference[None], a), reference) for a in (90.0, 150.0, 210.0)]).mean()
    assert pasted > 0.1 and turned < 0.5 * pasted


def test_identity_embedding_tells_held_out_identities_apart() -> None:
    config = IdentityConfig(steps=150, batch=64)
    train = identity_batch("train", "paired")
    net = fit_identity(*training_crops([train], config), config)
    evaluator = IdentityEvaluator()
    evaluator.net = net
    held_out = identity_batch("val")
    # "generated" = the real clip of the next identity: what a model that ignores the reference would show
    others = held_out["video"].roll(WORLD.clips_per_identity[1], dims=0)
    evaluator.update(others, held_out, {})
    got = evaluator.compute()
    assert got["identity_clips"] >= 6 and got["identity_accuracy_chance"] == 0.25
    assert got["identity_accuracy_real"] >= 0.6 and got["identity_similarity_real"] > got["identity_similarity_floor"] + 0.3
    assert got["identity_accuracy"] < got["identity_accuracy_real"]
    assert got["identity_similarity"] < got["identity_similarity_real"] - 0.3
    # copy measures: another clip's pose is near 0, a pasted reference is the full copy
    assert abs(got["copy_pose_real"]) < 0.5 * got["copy_pose_paste"] and abs(got["copy_size_real"]) < 0.5
    # standard errors, computed another way: numpy's ddof=1 std, and the binomial sqrt(p (1 - p) / (n - 1))
    clips = evaluator.per_clip("real")
    n = int(got["identity_clips"])
    assert np.isclose(got["identity_similarity_se_real"], np.std(clips["similarity"].numpy(), ddof=1) / np.sqrt(n),
                      rtol=1e-5)
    p = got["identity_accuracy_real"]
    assert np.isclose(got["identity_accuracy_se_real"], np.sqrt(p * (1 - p) / (n - 1)), rtol=1e-5)
    evaluator.rows = []
    pasted = held_out["reference"][:, :, None].expand(-1, -1, 8, -1, -1)
    identities = torch.tensor([m["identity"] for m in held_out["meta"]])
    evaluator.measure(pasted, held_out["video"], held_out["reference"], identities)
    copied = evaluator.compute()
    assert copied["copy_size"] > got["copy_size_real"] + 0.5 and copied["copy_pose"] > got["copy_pose_real"] + 0.05
    assert copied["identity_accuracy"] >= copied["identity_accuracy_real"]
