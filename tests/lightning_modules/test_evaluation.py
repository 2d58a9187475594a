"""The shapes-world evaluator: each probe-free measure computed by hand on tiny tensors (so a planted bug fails),
the measures separating real held-out clips from the same clips with shuffled frames or noise added, the probe
scoring >= 0.95 per attribute on real held-out clips (trained once per module on a small world of the quickstart's
options), and the Fréchet distance of noise "samples" above its real-vs-real floor."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from datamodules.media import frames_to_video
from datamodules.synthetic.generate import realise
from datamodules.synthetic.world import (
    BACKGROUND_COLOURS,
    GRAVITY,
    OBJECT_COLOURS,
    TEXTURE_COLOURS,
    Background,
    ObjectSpec,
    SceneSpec,
    simulate,
)
from datamodules.video import VideoDataModule
from datamodules.write_shards import write_world
from lightning_modules.evaluation.frechet import FrechetWithFloor, frechet_distance
from lightning_modules.evaluation.palette import (
    BACKGROUND_LABEL,
    PHOTO_DISTANCE,
    TEXTURE_LABEL,
    _alphas,
    background_distance,
    blend_distance,
    colour_masks,
    nearest_labels,
    object_masks,
    palette_labels,
    rgb,
    soft_colour_masks,
    triangle_distance,
    unit,
)
from lightning_modules.evaluation.probe import (
    ATTRIBUTES,
    BACKGROUND_CLASSES,
    SHAPE_CLASS,
    SHAPE_CLASSES,
    ProbeEvaluator,
    attribute_targets,
    background_class,
    chance_alignment,
)
from lightning_modules.evaluation.world_measures import (
    WorldMeasures,
    area_cv,
    background_flicker,
    background_speckle,
    centroids,
    circle_fit,
    classify_motion,
    coherence_iou,
    consistency_iou,
    direction_cosine,
    gravity_fit,
    off_palette,
    reversal_sharpness,
    track_features,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

# The quickstart's world (conf/data/world/quickstart.yaml), fewer clips.
WORLD = {"seed": 3, "max_objects": 1, "radius_range": [0.25, 0.35], "backgrounds": ["plain", "gradient"],
         "sizes": [[32, 32]], "fps": [8.0], "durations": [1.0], "scenes": [256, 64]}
PROBE = {"steps": 300, "clips": 256}  # ~40 s of training at 16x16 on one thread


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_world(tmp_path_factory.mktemp("world"), WORLD, kinds=["scenes"], progress=False)


def datamodule(world: Path, size: int) -> VideoDataModule:
    return VideoDataModule(shards=str(world / "scenes" / "train"), val_shards=str(world / "scenes" / "val"),
                           sizes=[[size, size]], frames=[8], fps=8.0, batch_size=16, num_workers=0, seed=0)


def held_out(world: Path, size: int) -> list[dict]:
    dm = datamodule(world, size)
    dm.setup("validate")
    return list(dm.val_dataloader())


def shuffled(video: torch.Tensor) -> torch.Tensor:
    """Each clip's frames in a fixed scrambled order."""
    order = torch.tensor([3, 0, 6, 1, 7, 4, 2, 5])[: video.shape[2]]
    return video[:, :, order]


def noisy(video: torch.Tensor, std: float = 0.3) -> torch.Tensor:
    return (video + std * torch.randn(video.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)


# ---------------------------------------------------------------------------------------------------------------
# by hand


def square_clip(xs: list[int], ys: list[int] | None = None, side: int = 4, size: int = 16) -> torch.Tensor:
    """Masks [T, size, size] of a side x side square whose top-left corner is at (xs[t], ys[t])."""
    ys = ys or [5] * len(xs)
    masks = torch.zeros(len(xs), size, size)
    for t, (x, y) in enumerate(zip(xs, ys)):
        masks[t, y:y + side, x:x + side] = 1.0
    return masks


def test_mask_measures_by_hand() -> None:
    moving = square_clip([2, 3, 4, 5, 6, 7])  # right by 1 px per frame
    track, area = centroids(moving)
    assert torch.allclose(track[:, 0], torch.tensor([4.0, 5, 6, 7, 8, 9])) and torch.all(track[:, 1] == 7.0)
    assert torch.all(area == 16)
    assert consistency_iou(moving) == pytest.approx(1.0, abs=1e-5)
    assert coherence_iou(moving) == pytest.approx(1.0, abs=1e-5)
    assert area_cv(moving) == 0.0
    assert direction_cosine(track) == pytest.approx(1.0)

    # back and forth (what shuffled frames look like): every move reverses the last one
    assert direction_cosine(centroids(square_clip([2, 3, 2, 3]))[0]) == pytest.approx(-1.0)
    # a right angle: cos 0; moves shorter than min_step are ignored
    assert direction_cosine(torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])) == pytest.approx(0.0)
    assert math.isnan(direction_cosine(torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]), min_step=2.0))
    # a pause (a move of length 0 = min_step, not longer) has no direction: only the middle pair counts
    paused = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [2.0, 0.0]])
    assert direction_cosine(paused) == pytest.approx(1.0)

    # 4x4 then 4x2 with the same centroid: IoU 8 / 16 after alignment; areas 16, 8: CV = 4 / 12
    squat = torch.zeros(2, 16, 16)
    squat[0, 5:9, 2:6] = 1.0
    squat[1, 6:8, 2:6] = 1.0
    assert consistency_iou(squat) == pytest.approx(0.5)
    assert area_cv(squat) == pytest.approx(4 / 12)

    # steady to the right, then a jump of 4 px: the last move predicts frame 4 at x = 6, it is at 10 (no overlap)
    jumpy = square_clip([2, 3, 4, 5, 10])
    assert coherence_iou(jumpy) == pytest.approx((1 + 1 + 0) / 3, abs=1e-5)
    assert consistency_iou(jumpy) == pytest.approx(1.0, abs=1e-5)  # the outline never changes

    # a one-pixel object is found (area 1): centroids, and both IoUs of its steady move
    dot = square_clip([2, 3, 4, 5], side=1)
    assert torch.allclose(centroids(dot)[0][:, 0], torch.tensor([2.5, 3.5, 4.5, 5.5]))
    assert consistency_iou(dot) == pytest.approx(1.0, abs=1e-5) and coherence_iou(dot) == pytest.approx(1.0, abs=1e-5)

    # the object lost in one frame: that pair scores 0
    lost = square_clip([2, 3, 4])
    lost[2] = 0
    assert consistency_iou(lost) == pytest.approx(0.5, abs=1e-5)


def test_track_fits_by_hand() -> None:
    t = torch.arange(8, dtype=torch.float64)
    circle = torch.stack([10 + 3 * torch.cos(0.3 * t + 1), 12 + 3 * torch.sin(0.3 * t + 1)], dim=1)
    residual, omega, radius = circle_fit(circle, [0.1, 0.2, 0.3, 0.4])
    assert residual < 1e-5 and omega == pytest.approx(0.3) and radius == pytest.approx(3.0)
    assert circle_fit(circle.flip(0), [0.3])[1] == pytest.approx(-0.3)  # the other way round

    parabola = 3 + 0.5 * t + 0.5 * 0.7 * t**2
    assert gravity_fit(parabola) == pytest.approx(0.7)
    assert gravity_fit(torch.zeros(8, dtype=torch.float64)) == 0.0

    # a wall bounce reverses a full step at once; a smooth turn does not
    wall = torch.tensor([[0.0, 0], [2, 0], [4, 0], [3, 0], [1, 0]])
    assert reversal_sharpness(wall, min_step=0.1) == pytest.approx((2 + 1) / 2)
    assert reversal_sharpness(circle, min_step=0.1) < 0.5


def test_track_features_in_the_worlds_units_by_hand() -> None:
    """Features of tracks in pixels of a 32 (high) x 24 (wide) clip at 8 fps: speeds in sides (24 px) per second,
    gravity against the world's (GRAVITY heights per second², 32 px a height)."""
    t = torch.arange(8, dtype=torch.float64)
    straight = torch.stack([2 + 1.5 * t, torch.full_like(t, 10.0)], dim=1)  # 1.5 px a frame = 12 px/s
    f = track_features(straight, 32, 24, 8.0)
    assert f["speed"] == pytest.approx(12 / 24) and f["cosine"] == pytest.approx(1.0)
    assert f["speed_cv"] == 0.0 and f["sharpness"] == 0.0 and f["gravity"] == pytest.approx(0.0, abs=1e-9)
    assert f["line"] < 1e-3  # a line fits it: far below the 1.5 an orbit needs
    g = GRAVITY * 32  # px/s²: a fall at the world's gravity, 1.0 by definition
    falling = torch.stack([torch.full_like(t, 12.0), 3 + 0.5 * g * (t / 8.0) ** 2], dim=1)
    assert track_features(falling, 32, 24, 8.0)["gravity"] == pytest.approx(1.0, rel=1e-6)
    # the still threshold: the world's moving objects go >= 0.2 side/s; 0.1 side/s is a still object's jitter
    for side_per_s, motion in ((0.2, "bounce"), (0.1, "still")):
        drift = torch.stack([10 + side_per_s * 24 / 8.0 * t, torch.full_like(t, 10.0)], dim=1)
        assert classify_motion(drift, 32, 24, 8.0) == motion, side_per_s
    # three frames are enough to tell a move from standing still
    assert classify_motion(straight[:3], 32, 24, 8.0) == "bounce"


def world_track(motion: str, **kwargs) -> torch.Tensor:
    """The exact centroid track [8, 2] of one object in a 32x32 clip at 8 fps, simulated by the world."""
    obj = ObjectSpec(id=1, shape="circle", colour="red", radius=9.0, motion=motion, **kwargs)
    scene = SceneSpec(32, 32, 8.0, 8, Background("plain", ["white"]), [obj])
    return torch.from_numpy(simulate(scene).positions[0])


def test_motion_classifier_on_the_worlds_physics() -> None:
    assert classify_motion(world_track("still", position=(16.0, 16.0)), 32, 32, 8.0) == "still"
    assert classify_motion(world_track("bounce", position=(12.0, 15.0), velocity=(22.0, 13.0)), 32, 32, 8.0) == "bounce"
    assert classify_motion(world_track("fall", position=(14.0, 10.0), velocity=(4.0, 0.0)), 32, 32, 8.0) == "fall"
    orbit = world_track("orbit", position=(20.0, 16.0), orbit_centre=(16.0, 16.0), orbit_radius=4.0, orbit_speed=2.5)
    assert classify_motion(orbit, 32, 32, 8.0) == "orbit"
    # the world's gravity (heights per second²), measured from a falling track with a floor bounce at frame 5:
    # one parabola per side of the bounce, the frame of the bounce left out
    fall = world_track("fall", position=(14.0, 10.0), velocity=(0.0, 0.0))
    assert (fall[1:, 1] - fall[:-1, 1]).sign().tolist() == [1, 1, 1, 1, -1, -1, -1]
    assert gravity_fit(fall[:, 1]) * 8.0**2 / 32 == pytest.approx(GRAVITY, rel=1e-6)
    lost = torch.full((8, 2), float("nan"))
    lost[0] = 5.0
    assert classify_motion(lost, 32, 32, 8.0) == "none"


def test_triangle_distance_against_a_dense_grid_of_the_triangle() -> None:
    """d(x, △abc) against the nearest of ~80k points spread over the triangle (and over the segment when two
    corners coincide): equal to the grid's spacing, inside, outside and beyond each edge."""
    generator = torch.Generator().manual_seed(0)
    a, b, c = torch.rand(3, 3, generator=generator)
    pixels = torch.rand(3, 400, generator=generator) * 1.4 - 0.2
    grid = torch.linspace(0, 1, 401)
    s, t = torch.meshgrid(grid, grid, indexing="ij")
    inside = s + t <= 1
    points = a[:, None] + s[inside] * (b - a)[:, None] + t[inside] * (c - a)[:, None]
    expected = torch.cdist(pixels.T, points.T).amin(1)
    assert torch.allclose(triangle_distance(pixels, a, b, c), expected, atol=1e-4)
    segment = a[:, None] + grid * (b - a)[:, None]
    assert torch.allclose(triangle_distance(pixels, a, b, b), torch.cdist(pixels.T, segment.T).amin(1), atol=1e-4)
    on_it = (0.2 * a + 0.5 * b + 0.3 * c)[:, None]
    assert triangle_distance(on_it, a, b, c).item() == pytest.approx(0.0, abs=1e-6)


def test_off_palette_by_hand() -> None:
    """On a navy clip with an orange object, blends of the two are on the palette and a ghost (a faint negative of
    the object: navy − 0.3·(orange − navy)) is not; on a gradient any background point may be blended; a textured
    object has no colour model here (NaN)."""
    navy, orange = rgb("navy", BACKGROUND_COLOURS), rgb("orange")
    meta = {"background": {"kind": "plain", "colours": ["navy"]}, "objects": [{"colour": "orange"}]}
    pixels = navy.view(3, 1, 1, 1).repeat(1, 4, 8, 8)  # x in [0, 1]: [3, T, H, W]
    pixels[:, :, 2:4, 2:4] = orange.view(3, 1, 1, 1)
    pixels[:, :, 4, 2] = (0.4 * orange + 0.6 * navy).view(3, 1)  # an antialiased edge
    ghost = (navy - 0.3 * (orange - navy)).clamp(0, 1)
    assert blend_distance(ghost.view(3, 1), meta).item() > 0.1
    pixels[:, 1:3, 6, 6] = ghost.view(3, 1)  # in 2 of the 4 frames
    video = pixels * 2 - 1
    assert off_palette(video, meta) == pytest.approx(2 / (4 * 8 * 8), abs=1e-6)
    gradient = {"background": {"kind": "gradient", "colours": ["navy", "white"]}, "objects": [{"colour": "orange"}]}
    middle = 0.5 * orange + 0.25 * navy + 0.25 * rgb("white", BACKGROUND_COLOURS)
    assert blend_distance(middle.view(3, 1), gradient).item() == pytest.approx(0.0, abs=1e-6)
    assert blend_distance(middle.view(3, 1), meta).item() > 0.1  # not on a plain navy clip
    textured = {**meta, "objects": [{"colour": "orange", "texture": "stripes"}]}
    assert math.isnan(off_palette(video, textured))


def test_background_measures_by_hand() -> None:
    region = torch.zeros(8, 8, dtype=torch.bool)
    region[2:6, 2:6] = True
    still = torch.full((3, 4, 8, 8), 0.2)
    assert background_flicker(still, region) == 0.0 and background_speckle(still, region) == 0.0
    flicker = still.clone()
    flicker[:, 1::2] = 0.6  # x in [0, 1] alternates 0.6 and 0.8: temporal std 0.1
    assert background_flicker(flicker, region) == pytest.approx(0.1, abs=1e-6)
    assert background_flicker(flicker[:, :2], region) == pytest.approx(0.1, abs=1e-6)  # two frames are enough
    assert math.isnan(background_flicker(flicker[:, :1], region))  # one frame has no temporal std
    speckle = still.clone()
    speckle[:, :, 3, 3] = 1.0  # one bright pixel: |Δx| = 4·0.4 there, 0.4 at its 4 neighbours (x in [0, 1])
    # the Laplacian is read where all 4 neighbours are background: the 2x2 centre of the 4x4 region
    assert background_speckle(speckle, region) == pytest.approx((1.6 + 0.4 + 0.4 + 0.0) / 4, abs=1e-6)


def test_world_measures_update_on_a_batch() -> None:
    """`WorldMeasures.update` on a rendered batch: generated clips scored like the batch's real ones (here the
    same clips: equal values), fps 0 (unknown) read from the scene record, and batches it must skip: single
    images, clips of fewer than 3 frames (coherence and the motion need 3), scenes without objects."""
    obj = ObjectSpec(id=1, shape="circle", colour="orange", radius=9.0, motion="bounce", position=(14.0, 15.0),
                     velocity=(20.0, 8.0))
    rendered = realise(SceneSpec(32, 32, 8.0, 8, Background("plain", ["navy"]), [obj]))
    video = frames_to_video(torch.from_numpy(rendered.frames))[None, :, :3]  # [1, 3, T=3, 32, 32]
    meta = {"objects": [{"colour": "orange", "texture": "solid", "motion": "bounce"}],
            "background": {"kind": "plain", "colours": ["navy"]}, "fps": 8.0}
    measures = WorldMeasures()
    measures.start(None, None)
    measures.update(video, {"video": video, "meta": [meta], "fps": torch.tensor([0.0])}, {})
    out = measures.compute()
    direct = WorldMeasures()
    direct.add(video, [meta], 8.0)
    assert out == {**direct.compute(), **{k + "_real": v for k, v in direct.compute().items()}}
    assert {"coherence_iou", "motion_accuracy", "background_flicker"} <= set(out), out
    for generated, batch in ((video[:, :, :1], {"meta": [meta]}), (video[:, :, :2], {"meta": [meta]}),
                             (video, {"meta": [{"objects": []}]}), (video, {})):
        skipped = WorldMeasures()
        skipped.update(generated, batch, {})
        assert skipped.compute() == {}, (generated.shape, batch)


def test_palette_segmentation_matches_the_label_map() -> None:
    for shape, texture, background in (("circle", "solid", Background("plain", ["navy"])),
                                       ("square", "stripes", Background("gradient", ["white", "teal"], angle=30.0))):
        obj = ObjectSpec(id=1, shape=shape, colour="orange", texture=texture, radius=9.0, motion="bounce",
                         position=(14.0, 15.0), velocity=(20.0, 8.0))
        rendered = realise(SceneSpec(32, 32, 8.0, 8, background, [obj]))
        video = frames_to_video(torch.from_numpy(rendered.frames))
        meta = {"objects": [{"colour": "orange", "texture": texture}],
                "background": {"kind": background.kind, "colours": background.colours}}
        truth = torch.from_numpy(rendered.labels) == 1
        prompt_free = colour_masks(video[None])[0]  # [8, T, H, W], no prompt: every object colour
        for masks in (object_masks(video, meta)[0], prompt_free[list(OBJECT_COLOURS).index("orange")]):
            iou = (masks & truth).sum() / (masks | truth).sum()
            assert iou > (0.99 if texture == "solid" else 0.9), (shape, float(iou))
        others = [i for i, c in enumerate(OBJECT_COLOURS) if c != "orange"]
        assert prompt_free[others].float().mean() < 0.01, "no other object colour"


def test_photo_and_incomplete_backgrounds_have_no_colour_model() -> None:
    """Against a photo (or a gradient record without its two colours) a pixel is an object's only if it is nearer
    than PHOTO_DISTANCE, half the smallest distance between two object colours, to the object's colour."""
    objects = torch.tensor(list(OBJECT_COLOURS.values()), dtype=torch.float64) / 255
    assert PHOTO_DISTANCE == pytest.approx(torch.cdist(objects, objects).add(torch.eye(8) * 9).min() / 2, abs=0.005)
    pixels = torch.rand(3, 4, 5)
    for record in ({"kind": "photo"}, {"kind": "gradient", "colours": ["white"]}, {}):
        assert torch.equal(background_distance(pixels, record), torch.full((4, 5), PHOTO_DISTANCE)), record
    orange = torch.tensor(OBJECT_COLOURS["orange"]) / 255
    away = torch.tensor([0.0, 1.0, 0.0])  # towards more green: no other object colour is nearer than orange
    video = torch.zeros(3, 1, 12, 12)
    for (top, left), distance in (((0, 0), 0.1), ((0, 6), 0.2), ((6, 0), 0.0)):
        video[:, 0, top:top + 6, left:left + 6] = (orange + distance * away)[:, None, None] * 2 - 1
    video[:, 0, 6:, 6:] = 0.0  # grey: far from orange
    mask = object_masks(video, {"objects": [{"colour": "orange"}], "background": {"kind": "photo"}})[0, 0]
    assert mask[:6, :6].all() and mask[6:, :6].all(), "within PHOTO_DISTANCE of orange"
    assert not mask[:6, 6:].any() and not mask[6:, 6:].any(), "0.2 from orange, or grey: the photo"


def test_soft_masks_count_antialiased_edges_by_their_share() -> None:
    """An orange block on navy whose left edge column is 70 % orange and right edge column 30 %: the soft mask is
    each pixel's share of orange (1 inside, 0.7 and 0.3 on the edges, 0 on the background)."""
    orange = torch.tensor(OBJECT_COLOURS["orange"]) / 255
    navy = torch.tensor(BACKGROUND_COLOURS["navy"]) / 255
    share = torch.zeros(10, 10)
    share[3:7, 3:6] = 1.0
    share[3:7, 2], share[3:7, 6] = 0.7, 0.3
    x = share * orange[:, None, None] + (1 - share) * navy[:, None, None]  # [3, H, W]
    video = (x * 2 - 1)[:, None].expand(3, 2, 10, 10)
    meta = {"objects": [{"colour": "orange"}], "background": {"kind": "plain", "colours": ["navy"]}}
    soft = object_masks(video, meta, soft=True)[0]
    torch.testing.assert_close(soft, share.expand(2, 10, 10), atol=1e-5, rtol=0)


def brute_force_distances(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distances [N, 10], α [N, 8]) of pixels [N, 3] by palette's module doc, pixel by pixel in float64:
    columns 0-7 the object colours (the nearer of d(x, c) and d(x, [c, (c + w) / 2]) for the texture colours w),
    then the background (plain colours, and the segments between two of them) and the texture colours; α_k =
    d_bg / (d_bg + d_k)."""
    def to_segment(a, b):
        d = b - a
        lam = (((pixels - a) * d).sum(1) / (d * d).sum()).clamp(0, 1)
        return (pixels - (a + lam[:, None] * d)).norm(dim=1)

    table = lambda colours: [torch.tensor(c, dtype=torch.float64) / 255 for c in colours.values()]
    objects, textures, backgrounds = table(OBJECT_COLOURS), table(TEXTURE_COLOURS), table(BACKGROUND_COLOURS)
    to_point = lambda c: (pixels - c).norm(dim=1)
    object_d = torch.stack([torch.stack([to_point(c)] + [to_segment(c, (c + w) / 2) for w in textures]).amin(0)
                            for c in objects], 1)
    background_d = torch.stack([to_point(c) for c in backgrounds]
                               + [to_segment(a, b) for i, a in enumerate(backgrounds) for b in backgrounds[i + 1:]])
    background_d = background_d.amin(0)[:, None]
    texture_d = torch.stack([to_point(c) for c in textures]).amin(0)[:, None]
    return torch.cat([object_d, background_d, texture_d], 1), background_d / (background_d + object_d)


def test_prompt_free_labels_and_alphas_match_the_formulas() -> None:
    g = torch.Generator().manual_seed(0)
    colours = torch.tensor([*OBJECT_COLOURS.values(), *BACKGROUND_COLOURS.values(), *TEXTURE_COLOURS.values()],
                           dtype=torch.float64) / 255
    # random colours, and blends of every palette colour with every other (edges, textures, gradients)
    share = torch.rand(len(colours), len(colours), 1, generator=g, dtype=torch.float64)
    blends = (share * colours[:, None] + (1 - share) * colours[None]).reshape(-1, 3)
    pixels = torch.cat([torch.rand(2000, 3, generator=g, dtype=torch.float64), blends])
    distances, alphas = brute_force_distances(pixels)
    nearest = distances.topk(2, dim=1, largest=False).values
    clear = nearest[:, 1] - nearest[:, 0] > 1e-6  # no near-tie between the two nearest labels
    labels = nearest_labels(pixels)
    assert clear.float().mean() > 0.95
    assert torch.equal(labels[clear], distances.argmin(1)[clear])
    assert set(labels.tolist()) == set(range(10)) and (BACKGROUND_LABEL, TEXTURE_LABEL) == (8, 9)
    # the table is float32 from expanded squares (‖x‖² − 2x·c + ‖c‖²): its d is ~5e-4 off where d is ~0
    apart = torch.minimum(distances[:, 8:9], distances[:, :8]) > 0.01
    torch.testing.assert_close(_alphas(pixels)[apart], alphas[apart], atol=1e-4, rtol=0)
    torch.testing.assert_close(_alphas(pixels), alphas, atol=3e-3, rtol=0)
    assert unit(torch.tensor([-1.5, -1.0, 0.0, 1.0, 1.5])).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_palette_labels_and_soft_masks_read_the_tables_at_the_nearest_grid_colour() -> None:
    """Clips [B, 3, T, H, W] (overshooting [-1, 1], as samples may) are labelled, and given the α of their
    boundary pixels, at the nearest colour of the 64-level grid: checked against the formulas there."""
    g = torch.Generator().manual_seed(1)
    video = torch.rand(2, 3, 2, 5, 6, generator=g) * 2.4 - 1.2
    grid = ((video + 1) / 2).clamp(0, 1).mul(63).round() / 63
    pixels = grid.permute(0, 2, 3, 4, 1).reshape(-1, 3).double()  # [B·T·H·W, 3]
    distances, alphas = brute_force_distances(pixels)
    nearest = distances.topk(2, dim=1, largest=False).values
    clear = (nearest[:, 1] - nearest[:, 0] > 1e-6).reshape(2, 2, 5, 6)
    expected = distances.argmin(1).reshape(2, 2, 5, 6)
    assert clear.float().mean() > 0.95
    assert torch.equal(palette_labels(video)[clear], expected[clear])
    masks = torch.zeros(2, 8, 2, 5, 6, dtype=torch.bool)
    masks[:, 3, :, 1:4, 1:5] = True  # a block of colour 3 (yellow) in every frame: its border pixels and the ring
    soft = soft_colour_masks(video, masks)
    ring = torch.zeros(5, 6, dtype=torch.bool)
    ring[0:5, 0:6] = True
    ring[2:3, 2:4] = False  # the block's interior: 3x3 windows all inside
    alpha = alphas.reshape(2, 2, 5, 6, 8).permute(0, 4, 1, 2, 3).float()
    assert torch.equal(soft[:, 3, :, 2:3, 2:4], torch.ones(2, 2, 1, 2)), "inside: 1"
    torch.testing.assert_close(soft[:, 3][:, :, ring], alpha[:, 3][:, :, ring], atol=2e-3, rtol=2e-3)
    assert torch.equal(soft[:, [0, 1, 2, 4, 5, 6, 7]], torch.zeros(2, 7, 2, 5, 6)), "no mask: 0"


def test_classes_and_frechet_by_hand() -> None:
    # the world's diamond is its square turned by 45°: one class; the other shapes are their own
    assert SHAPE_CLASS["square"] == SHAPE_CLASS["diamond"] == "square/diamond"
    assert len(SHAPE_CLASSES) == 4 and SHAPE_CLASS["circle"] == "circle"
    assert len(BACKGROUND_CLASSES) == 7 + 21 + 2
    # a gradient's colours are an unordered pair
    assert background_class({"kind": "gradient", "colours": ["teal", "white"]}) == "white to teal gradient"
    assert background_class({"kind": "gradient", "colours": ["white", "teal"]}) == "white to teal gradient"
    assert background_class({"kind": "plain", "colours": ["navy"]}) == "plain navy"
    metas = [{"objects": [{"shape": "diamond", "colour": "red", "motion": "fall"}],
              "background": {"kind": "plain", "colours": ["grey"]}}]
    targets = attribute_targets(metas)
    assert targets["shape"][0, SHAPE_CLASSES.index("square/diamond")] == 1 and targets["shape"].sum() == 1
    assert chance_alignment(targets) == pytest.approx({"shape": 1 / 4, "colour": 1 / 8, "motion": 1 / 4,
                                                       "background": 1 / 30})

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    shift = torch.tensor([1.0, 2.0, 0.0, 0.0, 0.0, 2.0], dtype=torch.float64)
    assert frechet_distance(x, x + shift) == pytest.approx(9.0, abs=1e-6)  # equal covariances: ‖Δμ‖²
    floor = FrechetWithFloor(6)
    floor.add_real(x[:20])
    floor.add_samples(x[20:30] + shift)
    floor.add_reference(x[30:])
    out = floor.compute()
    assert out["fd_samples"] == 10 and out["fd_real_floor"] < out["fd"]


# ---------------------------------------------------------------------------------------------------------------
# on real clips


def test_measures_separate_real_clips_from_shuffled_and_noisy_ones(world: Path) -> None:
    batches = held_out(world, 16)
    scores = {}
    for variant, change in (("real", lambda v: v), ("shuffled", shuffled), ("noise", noisy)):
        measures = WorldMeasures()
        measures.start(None, None)
        for batch in batches:
            measures.add(change(batch["video"]), batch["meta"], batch["fps"])
        scores[variant] = measures.compute()
    real, mixed, noise = scores["real"], scores["shuffled"], scores["noise"]
    # the outline and area hold from frame to frame (order does not matter to them, noise does)
    assert real["consistency_iou"] > 0.8 and real["consistency_iou"] > noise["consistency_iou"] + 0.15, scores
    assert real["area_cv"] < 0.05 and noise["area_cv"] > 2 * real["area_cv"], scores
    # the last move predicts the next mask; the track keeps its direction; the motion is the prompt's
    assert real["coherence_iou"] > mixed["coherence_iou"] + 0.3, scores
    assert real["coherence_iou"] > noise["coherence_iou"] + 0.1, scores
    assert real["direction_cosine"] > 0.5 and real["direction_cosine"] > mixed["direction_cosine"] + 0.8, scores
    assert real["direction_cosine"] > noise["direction_cosine"] + 0.3, scores
    assert real["motion_accuracy"] >= 0.9, scores
    assert real["motion_accuracy"] > max(mixed["motion_accuracy"], noise["motion_accuracy"]) + 0.2, scores
    assert real["still_speed"] < 0.05 < noise["still_speed"], scores
    assert real["background_flicker"] < 0.02 < noise["background_flicker"], scores
    assert real["background_speckle"] < 0.02 < noise["background_speckle"], scores
    assert real["off_palette"] < 0.01 and noise["off_palette"] > 0.3, scores  # colours: order does not matter
    assert mixed["off_palette"] == pytest.approx(real["off_palette"]), scores


@pytest.fixture(scope="module")
def probe_evaluator_16(world: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[ProbeEvaluator, SimpleNamespace]:
    """The probe trained once for the module (cached: later `start` calls load it). One thread, as the tests
    (a module fixture is set up before the `one_thread` fixture of its first test)."""
    evaluator = ProbeEvaluator(cache_dir=str(tmp_path_factory.mktemp("probes")), **PROBE)
    trainer = SimpleNamespace(datamodule=datamodule(world, 16), fast_dev_run=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        evaluator.start(SimpleNamespace(device=torch.device("cpu")), trainer)
    finally:
        torch.set_num_threads(threads)
    return evaluator, trainer


def probe_scores(evaluator: ProbeEvaluator, trainer: SimpleNamespace, batches: list[dict], change=None) -> dict:
    evaluator.start(SimpleNamespace(device=torch.device("cpu")), trainer)  # the trained probe comes from its cache
    for batch in batches:
        evaluator.update(change(batch["video"]) if change else batch["video"], batch, {})
    return evaluator.compute()


def test_probe_scores_real_held_out_clips_and_fd_floor(world: Path, probe_evaluator_16) -> None:
    evaluator, trainer = probe_evaluator_16
    batches = held_out(world, 16)
    noise = probe_scores(evaluator, trainer, batches, lambda v: noisy(v, 0.5))
    for a in ATTRIBUTES:
        assert noise[f"alignment_real_{a}"] >= 0.95, (a, noise)
    assert set(ATTRIBUTES) == {"shape", "colour", "motion", "background"}
    assert noise["fd_samples"] == 64
    assert noise["fd_real_floor"] < 0.5 * noise["fd"], noise
    real = probe_scores(evaluator, trainer, batches)
    assert real["alignment"] == pytest.approx(real["alignment_real"])  # the same clips, scored the same way
    # identical sets: 0 up to the square root of a rank-deficient covariance product (64 clips, 32 features)
    assert real["fd"] < 0.1 * real["fd_real_floor"], (real, noise)
    assert noise["alignment"] < real["alignment"] - 0.2
    print({"noise": noise, "real": real})


def test_probe_seed_trains_and_caches_another_probe(world: Path, tmp_path: Path) -> None:
    """`seed` draws another probe (other clips in another order, another init) and caches it beside the first;
    the same seed loads its own probe back."""
    trainer = SimpleNamespace(datamodule=datamodule(world, 16), fast_dev_run=False)
    model = SimpleNamespace(device=torch.device("cpu"))
    weights = {}
    for seed in (0, 1, 0):
        evaluator = ProbeEvaluator(cache_dir=str(tmp_path), steps=40, clips=32, batch=8, seed=seed)
        evaluator.start(model, trainer)
        state = {k: v.clone() for k, v in evaluator.probe.state_dict().items()}
        if seed in weights:
            assert all(torch.equal(state[k], weights[seed][k]) for k in state)  # loaded from the cache
        weights[seed] = state
    assert len(list(tmp_path.glob("probe-*.pt"))) == 2
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.slow
@pytest.mark.parametrize("size", [16, 32])
def test_probe_scores_real_held_out_clips_full(world: Path, size: int) -> None:
    """The default probe (600 steps) at both sizes the experiments use."""
    evaluator = ProbeEvaluator()
    trainer = SimpleNamespace(datamodule=datamodule(world, size), fast_dev_run=False)
    scores = probe_scores(evaluator, trainer, held_out(world, size))
    for a in ATTRIBUTES:
        assert scores[f"alignment_real_{a}"] >= 0.95, (a, scores)


def test_frechet_edges_and_which_entries_are_computed() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    assert frechet_distance(x[:2], x[2:4]) >= 0  # two vectors a set is enough
    for real, fake in [(x[:1], x), (x, x[:1])]:
        with pytest.raises(ValueError, match="2 or more vectors per set"):
            frechet_distance(real, fake)
    only_samples = FrechetWithFloor(3)
    only_samples.add_samples(x[:4])
    only_samples.add_real(x[4:8])
    assert set(only_samples.compute()) == {"fd", "fd_samples"}  # no reference: no floor
    only_floor = FrechetWithFloor(3)
    only_floor.add_real(x[:4])
    only_floor.add_reference(x[4:12])
    out = only_floor.compute()
    assert set(out) == {"fd_real_floor"} and out["fd_real_floor"] == pytest.approx(frechet_distance(x[:4], x[4:6]))
    one_sample = FrechetWithFloor(3)
    one_sample.add_samples(x[:1])
    one_sample.add_real(x[1:5])
    one_sample.add_reference(x[5:9])
    assert set(one_sample.compute()) == {"fd_real_floor"}  # one sample: no fd; the floor uses n = 2 references
    two_each = FrechetWithFloor(3)  # 2 vectors a set is enough for every entry
    two_each.add_samples(x[:2])
    two_each.add_real(x[2:4])
    two_each.add_reference(x[4:6])
    assert two_each.compute() == pytest.approx({"fd": frechet_distance(x[2:4], x[:2]), "fd_samples": 2.0,
                                                "fd_real_floor": frechet_distance(x[2:4], x[4:6])})
