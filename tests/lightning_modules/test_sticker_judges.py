"""The sticker judges: each score by hand on tiny clips, the verdicts on the world's real sticker clips against
still, shuffled and drifting ones, and the human-in-the-loop round trip through the gallery's labels.csv."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from einops import rearrange, reduce
from PIL import Image

from datamodules.media import to_uint8_frames
from datamodules.synthetic.generate import WorldConfig, make_sticker
from lightning_modules.evaluation import sticker_judges as sj

pytestmark = pytest.mark.usefixtures("one_thread")


def clip(*frames: tuple[float, float, float], size: int = 1) -> torch.Tensor:
    """A [1, 3, T, size, size] clip of uniform frames given as RGB in [0, 1], returned in [-1, 1]."""
    unit = torch.tensor(frames)  # [T, 3]
    return rearrange(unit * 2 - 1, "t c -> 1 c t 1 1").expand(-1, -1, -1, size, size).contiguous()


# three frames: d(0, 1) = (0.5 + 0.2 + 0.2) / 3 = 0.3, d(1, 2) = 0.6 / 3 = 0.2, d(0, 2) = 1.5 / 3 = 0.5
HAND = [(0.0, 0.0, 0.0), (0.5, 0.2, 0.2), (0.5, 0.2, 0.8)]


def test_scores_by_hand_on_a_three_frame_clip():
    forward, backward = clip(*HAND, size=2), clip(HAND[0], HAND[2], HAND[1], size=2)
    still = clip(HAND[1], HAND[1], HAND[1], size=2)
    video = torch.cat([forward, backward, still])
    # motion: mean step = (0.3 + 0.2) / 2; (0.5 + 0.2) / 2 in the order 0, 2, 1; 0 for the still clip
    assert torch.allclose(sj.motion(video), torch.tensor([0.25, 0.35, 0.0]), atol=1e-6)
    # consistency: P = (0.3 + 0.2 + 0.5) / 3 in both orders; 1 - 0.25 / P = 0.25, 1 - 0.35 / P = -0.05; still -> 1
    assert torch.allclose(sj.consistency(video), torch.tensor([0.25, -0.05, 1.0]), atol=1e-5)
    # looping: d(last, first) / mean step = 0.5 / 0.25 = 2; d(1, 0) / 0.35 = 0.3 / 0.35; still -> 0
    assert torch.allclose(sj.looping(video), torch.tensor([2.0, 0.3 / 0.35, 0.0]), atol=1e-5)


def test_distances_are_taken_on_area_averaged_thumbnails():
    video = torch.rand(2, 3, 4, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    thumbs = reduce((video + 1) / 2, "b c t (h p) (w q) -> b t c h w", "mean", p=4, q=6)  # 4 x 4 thumbnails
    expected = (thumbs[:, :, None] - thumbs[:, None, :]).abs().mean(dim=(3, 4, 5))
    assert torch.allclose(sj.frame_distances(video, grid=4), expected, atol=1e-5)
    assert not torch.allclose(sj.frame_distances(video, grid=16), expected, atol=1e-3)
    # the scores' default: 8 x 8 thumbnails; C = 1 - A / P and L = d(T-1, 0) / A from those distances
    thumbs = reduce((video + 1) / 2, "b c t (h p) (w q) -> b t c h w", "mean", p=2, q=3)
    distances = (thumbs[:, :, None] - thumbs[:, None, :]).abs().mean(dim=(3, 4, 5))
    step = torch.stack([distances[:, t, t + 1] for t in range(3)], dim=1).mean(dim=1)
    assert torch.allclose(sj.consistency(video), 1 - step / (distances.sum(dim=(1, 2)) / 12), atol=1e-5)
    assert torch.allclose(sj.looping(video), distances[:, 3, 0] / step, atol=1e-5)


def test_identity_by_hand_pixels_and_colour_histograms():
    red, blue = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)
    sticker = clip(red, size=2)[:, :, 0]  # [1, 3, 2, 2], all red
    half = clip(red, size=2)[:, :, 0].clone()
    half[:, :, 1, :] = (torch.tensor(blue) * 2 - 1)[:, None]  # the bottom row turns blue
    video = torch.stack([sticker[0], half[0]], dim=1)[None]  # frame 0 the sticker, frame 1 half blue
    # histogram intersections: frame 0 -> 1, frame 1 -> 0.5, mean 0.75
    # conditioning frame 0: pixels agree (1); frame 1: half the pixels differ by 1 in R and B -> 1 - (2/3) / 2
    assert math.isclose(float(sj.identity(video, sticker, 0)), (1 + 0.75) / 2, abs_tol=1e-6)
    assert math.isclose(float(sj.identity(video, sticker, 1)), (2 / 3 + 0.75) / 2, abs_tol=1e-6)
    both = sj.identity(torch.cat([video, video]), torch.cat([sticker, sticker]), torch.tensor([1, 0]))
    assert torch.allclose(both, torch.tensor([(2 / 3 + 0.75) / 2, 0.875]), atol=1e-6)
    dark = torch.cat([sticker[:, :, None], clip((0.8, 0.0, 0.0), size=2)], dim=2)  # 0.8 * 8 -> level 6, not 7
    assert math.isclose(float(sj.identity(dark, sticker, 0)), (1 + (1 + 0) / 2) / 2, abs_tol=1e-6)
    histogram = sj.colour_histograms(half)
    assert histogram.shape == (1, 512) and histogram[0, 7 * 64].item() == 0.5 and histogram[0, 7].item() == 0.5


def test_judge_flags_each_criterion_against_its_threshold():
    video = torch.cat([clip(*HAND, size=2), clip(HAND[1], HAND[1], HAND[1], size=2)])
    stickers = video[:, :, 1]
    limits = sj.JudgeThresholds(motion_min=0.1, consistency_min=0.2, looping_max=2.5, identity_min=0.9,
                                relevance_min=0.5)
    verdict = sj.judge(video, stickers, 1, relevance=torch.tensor([0.7, 0.9]), thresholds=limits)
    assert verdict["motion_pass"].tolist() == [True, False]  # 0.25 and 0
    assert verdict["consistency_pass"].tolist() == [True, True]  # 0.25 and 1
    assert verdict["looping_pass"].tolist() == [True, True]  # 2 and 0
    assert verdict["relevance_pass"].tolist() == [True, True]
    assert verdict["pass"].tolist() == [bool(verdict["identity_pass"][0]), False]
    low = sj.judge(video, stickers, 1, relevance=torch.tensor([0.4, 0.9]), thresholds=limits)
    assert low["relevance_pass"].tolist() == [False, True] and not low["pass"][0]
    strict = sj.judge(video, stickers, 1, thresholds=sj.JudgeThresholds(looping_max=1.9, motion_min=0.1,
                                                                        consistency_min=0.2, identity_min=0.0))
    assert "relevance" not in strict and strict["looping_pass"].tolist() == [False, True]
    assert strict["pass"].tolist() == [False, False]
    # a score equal to its threshold passes (at least / at most)
    edge = sj.JudgeThresholds(motion_min=float(sj.motion(video)[0]), consistency_min=float(sj.consistency(video)[0]),
                              looping_max=float(sj.looping(video)[0]), identity_min=0.0, relevance_min=0.7)
    verdict = sj.judge(video, stickers, 1, relevance=torch.tensor([0.7, 0.9]), thresholds=edge)
    assert verdict["pass"].tolist() == [True, False]


def world_clips(count: int, seed: int = 0) -> list[tuple[torch.Tensor, str]]:
    """Real sticker clips [1, 3, T, 32, 32] in [-1, 1] with their loop motion."""
    config = WorldConfig(seed=seed, sticker_size=32)
    out = []
    for index in range(count):
        rendered = make_sticker(config, "train", index)
        video = torch.from_numpy(rendered.frames).float() / 127.5 - 1
        out.append((rearrange(video, "t h w c -> 1 c t h w"), rendered.scene.objects[0].loop))
    return out


def rates(verdicts: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    return {k: float(torch.cat([v[k] for v in verdicts]).float().mean()) for k in verdicts[0] if k.endswith("pass")}


def test_judges_pass_real_stickers_and_reject_still_shuffled_and_drifting_clips():
    generator = torch.Generator().manual_seed(0)
    real, still, shuffled, drifting, wrong, moving = [], [], [], [], [], []
    clips = world_clips(48)
    for index, (video, loop) in enumerate(clips):
        frames, middle = video.shape[2], video.shape[2] // 2
        sticker = video[:, :, middle]
        real.append(sj.judge(video, sticker, middle))
        moving.append(bool(real[-1]["motion"] > 0) and loop != "spin")
        still.append(sj.judge(sticker[:, :, None].expand(-1, -1, frames, -1, -1), sticker, middle))
        order = torch.randperm(frames, generator=generator)
        shuffled.append(sj.judge(video[:, :, order], sticker, int((order == middle).nonzero())))
        drift = torch.stack([sticker.roll(k, dims=-1) for k in range(frames)], dim=2)  # 1 px a frame, no return
        drifting.append(sj.judge(drift, sticker, 0))
        other = clips[(index + 1) % len(clips)][0]
        wrong.append(sj.judge(video, other[:, :, other.shape[2] // 2], middle))  # another clip's sticker
    measured = {name: rates(v) for name, v in
                [("real", real), ("still", still), ("shuffled", shuffled), ("drifting", drifting), ("wrong", wrong)]}
    print({name: {k: round(v, 3) for k, v in r.items()} for name, r in measured.items()})
    assert measured["real"]["pass"] >= 0.7
    assert np.mean([bool(v["pass"]) for v, m in zip(real, moving) if m]) >= 0.9  # spins alias; stills do not move
    assert measured["real"]["identity_pass"] == 1.0 and measured["real"]["looping_pass"] >= 0.95
    assert measured["still"]["pass"] == 0.0 and measured["still"]["motion_pass"] == 0.0
    assert measured["shuffled"]["pass"] <= 0.1 and measured["shuffled"]["consistency_pass"] <= 0.15
    assert measured["drifting"]["looping_pass"] <= 0.1 and measured["drifting"]["pass"] <= 0.1
    assert measured["wrong"]["identity_pass"] <= 0.1
    median = {name: float(torch.cat([r["consistency"] for r in v]).median()) for name, v in
              [("real", real), ("shuffled", shuffled)]}
    assert median["real"] - median["shuffled"] > 0.3


# ---------------------------------------------------------------------------------------------------------------
# the gallery and the human in the loop


def gallery_candidates() -> tuple[list[sj.Candidate], dict[str, torch.Tensor]]:
    """Two teachers x three candidates: real clips from teacher A (A-2 judged irrelevant to its prompt), the same
    clips frozen (still) from teacher B."""
    candidates, verdicts = [], []
    for index, (video, _) in enumerate(world_clips(3, seed=6)):
        middle = video.shape[2] // 2
        sticker = video[:, :, middle]
        frozen = sticker[:, :, None].expand_as(video)
        for teacher, clip_ in (("A", video), ("B", frozen)):
            candidates.append(sj.Candidate(f"{teacher}-{index}", teacher, f'a "sticker", <{index}>', sticker[0],
                                           clip_[0], fps=8.0))
            relevance = torch.tensor([0.3 if (teacher, index) == ("A", 2) else 0.8])
            verdicts.append(sj.judge(clip_, sticker, middle, relevance=relevance))
    return candidates, {k: torch.cat([v[k] for v in verdicts]) for k in verdicts[0]}


def set_keep(path: Path, keep: dict[str, str]) -> None:
    with open(path, newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    for row in rows:
        row["keep"] = keep.get(row["key"], row["keep"])
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_gallery_labels_round_trip_a_person_overrides_the_judges(tmp_path):
    candidates, scores = gallery_candidates()
    keys = [c.key for c in candidates]
    judged = dict(zip(keys, scores["pass"].tolist()))
    assert [judged[k] for k in keys] == [True, False, True, False, False, False]  # real pass, still fails

    folder = sj.write_gallery(tmp_path / "gallery", candidates, scores)
    page = (folder / "index.html").read_text(encoding="utf-8")
    for candidate in candidates:
        assert f"{candidate.key}.gif" in page and f"{candidate.key}.png" in page
        with Image.open(folder / f"{candidate.key}.png") as png:
            assert (np.asarray(png.convert("RGB")) == to_uint8_frames(candidate.sticker)[0]).all()
    with Image.open(folder / "A-0.gif") as gif:
        assert gif.n_frames == candidates[0].video.shape[1] and gif.info["loop"] == 0
        assert abs(gif.info["duration"] - 125) <= 10  # 1000 / 8 fps, in the GIF's hundredths of a second
    assert "&lt;0&gt;" in page and 'class="fail"' in page and 'class="pass"' in page
    with open(folder / "labels.csv", newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["key", "teacher", "prompt", "judge_pass", "motion", "consistency", "looping",
                             "identity", "relevance", "keep"]
    assert [r["key"] for r in rows] == keys and rows[1]["prompt"] == 'a "sticker", <0>'
    assert [r["judge_pass"] for r in rows] == ["1", "0", "1", "0", "0", "0"] and {r["keep"] for r in rows} == {""}
    assert math.isclose(float(rows[0]["motion"]), float(scores["motion"][0]), rel_tol=1e-5)
    assert sj.read_labels(folder / "labels.csv") == dict.fromkeys(keys)

    # the person keeps two the judges rejected (B-1 still, A-2 "irrelevant"), rejects a passed one, agrees
    # on B-2, and leaves A-1 and B-0 to the judges; values in any case and spacing
    set_keep(folder / "labels.csv", {"A-0": "No", "B-1": "Y ", "A-2": "keep", "B-2": "0"})
    labels = sj.read_labels(folder / "labels.csv")
    assert labels == {"A-0": False, "B-0": None, "A-1": None, "B-1": True, "A-2": True, "B-2": False}
    assert sj.select(keys, scores["pass"], labels) == ["A-1", "B-1", "A-2"]
    assert sj.selection_summary(keys, scores["pass"], labels) == {
        "kept_by_label": 2, "rejected_by_label": 2, "kept_by_judges": 1, "rejected_by_judges": 1,
        "overridden": 3, "kept": 3}

    set_keep(folder / "labels.csv", {"A-1": "maybe"})
    with pytest.raises(ValueError, match=r"line 4 \(key A-1\): keep='maybe'") as error:
        sj.read_labels(folder / "labels.csv")
    assert "\n" not in str(error.value)


def test_read_labels_accepts_the_documented_values_and_names_bad_rows(tmp_path):
    values = ["1", "0", "yes", "no", "y", "n", "true", "false", "keep", "reject", " TRUE ", "Reject", ""]
    path = tmp_path / "labels.csv"
    path.write_text("key,keep\n" + "".join(f"k{i},{v}\n" for i, v in enumerate(values)), encoding="utf-8")
    expected = [True, False] * 5 + [True, False, None]
    assert sj.read_labels(path) == {f"k{i}": e for i, e in enumerate(expected)}
    path.write_text("key,keep\na,1\na,0\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 3: key a appears twice"):
        sj.read_labels(path)
    path.write_text("key,label\na,1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="needs columns 'key' and 'keep'"):
        sj.read_labels(path)


def test_pass_rates_per_teacher_and_criterion():
    candidates, scores = gallery_candidates()
    rates_ = sj.pass_rates(sj.records(candidates, scores))
    assert rates_["A"] == {"motion": 1.0, "consistency": 1.0, "looping": 1.0, "identity": 1.0, "relevance": 2 / 3,
                           "pass": 2 / 3}
    assert rates_["B"]["motion"] == 0.0 and rates_["B"]["pass"] == 0.0 and rates_["B"]["identity"] == 1.0
    by_hand = [{"teacher": "T", "motion_pass": m, "pass": p} for m, p in [(1, 0), (1, 1), (0, 0), (1, 0)]]
    assert sj.pass_rates(by_hand) == {"T": {"motion": 0.75, "pass": 0.25}}


def test_frame_grid_puts_the_sticker_then_the_frames_in_a_row() -> None:
    sticker, video = torch.rand(3, 2, 3) * 2 - 1, torch.rand(3, 4, 2, 3) * 2 - 1
    grid = sj.frame_grid([sj.Candidate("a", "t", "p", sticker, video)] * 2, scale=2)
    assert grid.shape == (2 * 2 * 2, 5 * 3 * 2, 3)
    assert (grid[0:4:2, 0:6:2] == to_uint8_frames(sticker)[0]).all()
    assert (grid[0:4:2, 6 * 4:6 * 5:2] == to_uint8_frames(video)[3]).all()  # the last frame, fifth cell
    assert (grid[4:] == grid[:4]).all()
