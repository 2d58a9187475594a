"""Reference crops for personalization: paired references come from the clip itself, cross-paired ones from another
clip of the same identity, held-out identities never appear in training; each crop is the masked crop of the frame
it names, rendered again from the world."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.media import frames_to_video
from datamodules.references import masked_crops, pick_reference
from datamodules.synthetic import WorldConfig
from datamodules.synthetic.generate import make_identity_clip
from datamodules.video import VideoDataModule
from datamodules.write_shards import world_dir

WORLD = dict(sizes=[[32, 32]], fps=[8.0], durations=[1.0], backgrounds=["plain", "gradient"], scenes=[2, 1],
             images=[2, 1], edits=[2, 1], stickers=[2, 1], identities=3, held_out_identities=2,
             clips_per_identity=[3, 2], shard_size=8)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def batches(data_dir, reference: str, train: bool, epochs: int = 1, **options) -> list[dict]:
    dm = VideoDataModule(data_dir=data_dir, world=WORLD, world_kind="identities", sizes=[[32, 32]], frames=[8],
                         batch_size=1, num_workers=0, reference=reference, reference_size=32, seed=0, **options)
    dm.prepare_data()
    dm.setup("fit")
    if not train:
        return list(dm.val_dataloader())
    loader = dm.train_dataloader()
    out = []
    for _ in range(epochs):
        out += list(loader)
    return out


def rendered_crop(config: WorldConfig, split: str, clip: int, frame: int) -> torch.Tensor:
    """The masked crop of frame `frame` of identity clip `clip`, rendered again ([3, 32, 32] in [-1, 1])."""
    rendered, _ = make_identity_clip(config, split, clip)
    pixels = torch.from_numpy(rendered.frames[frame]).permute(2, 0, 1).float()[None]
    crop = masked_crops(pixels, torch.from_numpy(rendered.labels[frame] == 1)[None])[0]
    return frames_to_video(crop.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)[None])[:, 0]


def items(batch_list: list[dict]) -> list[tuple[dict, dict, torch.Tensor]]:
    return [(m, src, ref) for b in batch_list for m, src, ref in zip(b["meta"], b["reference_from"], b["reference"])]


@pytest.mark.parametrize("mode", ["paired", "cross"])
def test_references_come_from_the_right_clip_and_frame(data_dir, mode: str) -> None:
    config = WorldConfig(**WORLD)
    for split, train in (("train", True), ("val", False)):
        seen = items(batches(data_dir, mode, train))
        assert len(seen) == config.count("identities", split)
        for meta, source, reference in seen:
            index = meta["world"]["index"]
            assert config.identity(split, source["clip"]) == meta["identity"]  # the same identity
            if mode == "paired":
                assert source["clip"] == index
            else:
                assert source["clip"] != index
            # the pixels are the masked crop of the frame it names, of the clip it names
            assert torch.equal(reference, rendered_crop(config, split, source["clip"], source["frame"]))


def test_held_out_identities_are_never_in_training(data_dir) -> None:
    train = {m["identity"] for m, _, _ in items(batches(data_dir, "cross", True))}
    val = {m["identity"] for m, _, _ in items(batches(data_dir, "cross", False))}
    assert train == {0, 1, 2} and val == {3, 4}
    assert {m["identity_token"] for m, _, _ in items(batches(data_dir, "cross", False))} == {"zq3", "zq4"}
    # without the token in the caption, only the reference tells who it is
    named = batches(data_dir, "cross", False)[0]
    anonymous = batches(data_dir, "cross", False, identity_in_caption=False)[0]
    token = named["meta"][0]["identity_token"]
    assert token in named["text"][0] and anonymous["text"][0] == named["text"][0].replace(f"{token} ", "")


def test_training_draws_vary_and_validation_repeats(data_dir) -> None:
    drawn: dict[int, set] = {}
    for meta, source, _ in items(batches(data_dir, "cross", True, epochs=4)):
        drawn.setdefault(meta["world"]["index"], set()).add(source["clip"])
    assert max(len(v) for v in drawn.values()) == 2  # both other clips of the identity serve as references
    first = [s for _, s, _ in items(batches(data_dir, "paired", False))]
    assert first == [s for _, s, _ in items(batches(data_dir, "paired", False))]


def test_pick_reference_and_old_worlds_fail_clearly(data_dir) -> None:
    refs = {"paired": np.zeros((2, 4, 4, 3), np.uint8), "paired_frames": np.array([3, 5]),
            "cross": np.zeros((0, 4, 4, 3), np.uint8), "cross_clips": np.zeros(0), "cross_frames": np.zeros(0)}
    assert pick_reference(refs, "paired", 7)[1] == {"clip": 7, "frame": 3}
    with pytest.raises(ValueError, match="no cross reference"):
        pick_reference(refs, "cross", 7)
    with pytest.raises(ValueError, match="choose one of"):
        VideoDataModule(reference="same").video_handler(True)
    # the hash of a world's config (its folder) does not change for worlds without held-out identities
    assert "held_out_identities" not in WorldConfig().to_dict()
    assert world_dir("d", WorldConfig()) != world_dir("d", WorldConfig(held_out_identities=2))
