"""The text-sensitivity benchmark's captions: one attribute swapped, the rest of the caption kept."""

from __future__ import annotations

import json
import random

import pytest

from datamodules.synthetic.captions import scene_caption
from datamodules.synthetic.generate import WorldConfig, make_scene
from datamodules.synthetic.world import SceneSpec
from experiments.benchmarks.text_sensitivity import ATTRIBUTES, swapped_caption
from lightning_modules.evaluation.probe import SHAPE_CLASS

CONFIG = WorldConfig(sizes=[[32, 32]], durations=[1.0], max_objects=1, backgrounds=["plain", "gradient"])


@pytest.mark.parametrize("index", range(8))
def test_a_swap_changes_only_its_attribute(index):
    scene = make_scene(CONFIG, "train", index)[0].scene
    meta = json.loads(json.dumps(scene.to_dict()))  # as the shards' json holds it
    rebuilt = SceneSpec.from_dict(meta)
    assert json.loads(json.dumps(rebuilt.to_dict())) == meta  # the json's round trip
    assert scene_caption(rebuilt) == scene_caption(scene)
    obj = scene.objects[0]
    for attribute in ATTRIBUTES:
        swapped = swapped_caption(rebuilt, attribute, random.Random(index))
        assert swapped != scene_caption(scene), attribute
        before, after = scene_caption(scene).split(), swapped.split()
        if attribute == "shape":  # one word changes, into another shape class
            changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
            assert len(changed) == 1 and SHAPE_CLASS[changed[0][0]] != SHAPE_CLASS[changed[0][1].rstrip(",")]
        if attribute in ("colour", "background"):
            assert len(before) - 1 <= len(after) <= len(before) + 1  # a colour may be two words ("dark grey")
        # the other attributes' words stay
        assert obj.shape in swapped or attribute == "shape"
        assert scene.background.colours[0] in swapped or attribute == "background"
