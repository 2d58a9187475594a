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


def test_train_mode_trains_the_quickstart_and_measures_its_gaps(tmp_path):
    """`--train`: the quickstart's module (here tiny) with its codec fitted and its weights changed by training;
    the true captions' loss in the table is the module's own loss on the held-out batch at that time and noise."""
    import torch

    from experiments.benchmarks.text_sensitivity import sensitivity, train_module
    from tests.experiments.test_sharded_sample import SMALL

    small = [o for o in SMALL if not o.startswith("experiment=")] + [f"data.data_dir={tmp_path / 'data'}"]
    fresh, _ = train_module(small, 1)
    module, batch = train_module(small, 4)
    assert module.codec.fitted and len(batch["text"]) == 2  # the first held-out batch (data.batch_size=2)
    assert any(not torch.equal(a, b) for a, b in zip(fresh.parameters(), module.parameters(), strict=True))
    result = sensitivity(module, batch, seeds=1, times=(0.0,))
    x1 = module.to_latent(batch)
    noise = module.objective.noise(tuple(x1.shape), torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = module.loss(batch, t=torch.zeros(x1.shape[0]), noise=noise).item()
    assert result["times"][0]["loss"] == pytest.approx(expected, rel=1e-6)
    assert set(result["times"][0]["gap"]) == {*ATTRIBUTES, "empty"}
