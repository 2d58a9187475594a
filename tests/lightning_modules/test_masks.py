"""The synthetic inpainting masks (lightning_modules/conditioning/masks.py): each kind's geometry checked by another
computation, moving masks move, object masks are the world's label maps, and the Mask / MaskedVideo conditioners
draw one mask per step from the generator they are given (the 9-channel layout is in test_avid.py)."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.conditioning.concat import Mask, MaskedVideo
from lightning_modules.conditioning.masks import MASK_KINDS, MaskGenerator, coverage


def centroid(frame: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.nonzero(frame, as_tuple=True)
    return torch.stack([ys.float().mean(), xs.float().mean()])


def test_boxes_are_rectangles_of_the_asked_size_and_static_ones_do_not_move() -> None:
    g = torch.Generator().manual_seed(0)
    masks = MaskGenerator({"box": 1.0}, moving=0.0, min_frac=0.25, max_frac=0.5)(16, 4, 32, 32, generator=g)
    assert masks.shape == (16, 1, 4, 32, 32) and set(masks.unique().tolist()) <= {0.0, 1.0}
    for clip in masks[:, 0]:
        assert torch.equal(clip[0], clip[-1])
        rows, cols = clip[0].any(dim=1), clip[0].any(dim=0)
        h, w = int(rows.sum()), int(cols.sum())
        assert clip[0].sum() == h * w, "a filled rectangle: its area is its height times its width"
        assert 0.25 * 32 - 1 <= h <= 0.5 * 32 + 1 and 0.25 * 32 - 1 <= w <= 0.5 * 32 + 1


def test_moving_boxes_and_blobs_drift_in_a_straight_line() -> None:
    g = torch.Generator().manual_seed(1)
    for kind in ("box", "blob"):
        masks = MaskGenerator({kind: 1.0}, moving=1.0)(8, 9, 48, 48, generator=g)[:, 0]
        moved = 0
        for clip in masks:
            c = torch.stack([centroid(f) for f in clip])
            moved += int((c[-1] - c[0]).norm() > 2)
            # constant velocity: the middle frame's centroid is halfway (pixel rounding aside)
            assert (c[4] - (c[0] + c[-1]) / 2).norm() < 1.5
            assert (clip.flatten(1).sum(1) - clip[0].sum()).abs().max() <= 0.15 * clip[0].sum(), "rigid shape"
        assert moved >= 4


def test_borders_touch_the_frame_edges_and_strokes_are_thin_and_connected() -> None:
    g = torch.Generator().manual_seed(2)
    borders = MaskGenerator({"border": 1.0})(12, 2, 32, 32, generator=g)[:, 0, 0]
    for frame in borders:
        edges = [frame[0].all(), frame[-1].all(), frame[:, 0].all(), frame[:, -1].all()]
        assert 1 <= sum(bool(e) for e in edges) <= 3
        assert not frame[16, 16], "the centre stays: uncropping fills the border"
    strokes = MaskGenerator({"stroke": 1.0})(12, 2, 64, 64, generator=g)[:, 0, 0]
    for frame in strokes:
        assert 0.02 < frame.mean() < 0.6
        assert frame.any(dim=1).sum() >= 6 or frame.any(dim=0).sum() >= 6, "a stroke spans the frame"


def test_object_masks_are_the_label_maps_of_one_object_and_fall_back_to_boxes() -> None:
    labels = torch.zeros(2, 3, 16, 16, dtype=torch.long)
    for f in range(3):  # object 3 moves right, object 5 sits still
        labels[0, f, 2:6, 2 + 2 * f:6 + 2 * f] = 3
        labels[0, f, 10:14, 10:14] = 5
    masks = MaskGenerator({"object": 1.0})(2, 3, 16, 16, labels=labels, generator=torch.Generator().manual_seed(0))
    first = masks[0, 0]
    assert any(torch.equal(first, (labels[0] == i).float()) for i in (3, 5)), "exactly one object, in every frame"
    assert first.sum() == 16 * 3
    assert masks[1, 0].sum() > 0, "a clip with no object gets a box"
    chosen = {int(labels[0][first.bool()].unique()) for first in
              MaskGenerator({"object": 1.0})(20, 3, 16, 16, labels=labels[:1].expand(20, -1, -1, -1).contiguous(),
                                             generator=torch.Generator().manual_seed(3))[:, 0]}
    assert chosen == {3, 5}


def test_kinds_follow_their_weights_and_bad_settings_are_named() -> None:
    g = torch.Generator().manual_seed(4)
    masks = MaskGenerator({"border": 3.0, "box": 1.0}, moving=0.0, min_frac=0.3, max_frac=0.3)(400, 1, 20, 20,
                                                                                               generator=g)
    touches = (masks[:, 0, 0, 0].all(1) | masks[:, 0, 0, -1].all(1) | masks[:, 0, 0, :, 0].all(1)
               | masks[:, 0, 0, :, -1].all(1)).float().mean()
    assert 0.65 < touches < 0.85  # 3 of 4 are borders (a box never spans a whole side at 30%)
    assert 0 < coverage(masks).min() and coverage(masks).max() < 1
    with pytest.raises(ValueError, match=r"mask kinds \['circle'\] are unknown"):
        MaskGenerator({"circle": 1.0})
    with pytest.raises(ValueError, match="min_frac <= max_frac"):
        MaskGenerator(min_frac=0.7, max_frac=0.2)
    assert set(MASK_KINDS) == {"box", "blob", "stroke", "border", "object"}


def test_mask_and_masked_video_share_the_generators_mask() -> None:
    video = torch.rand(3, 3, 4, 16, 16) * 2 - 1
    masks = MaskGenerator({"border": 1.0})
    batch = {"video": video}
    on_grid = Mask(masks=masks).inputs(batch, lambda x: x, (1, 4, 16, 16), train=True)
    drawn = batch["mask"]
    assert torch.equal(on_grid, drawn) and drawn[:, 0, 0].flatten(1).max(1).values.eq(1).all()
    masked = MaskedVideo(channels=3, masks=masks).inputs(batch, lambda x: x, (3, 4, 16, 16), train=True)
    assert batch["mask"] is drawn
    assert torch.equal(masked, video * (1 - drawn))
