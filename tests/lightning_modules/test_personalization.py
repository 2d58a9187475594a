"""Movie Gen personalization (PT2V): the reference tokens reach the backbone through a softmax of their own, so a
text-to-video checkpoint loaded into the PT2V model (its new projection at zero) predicts exactly what it did, and
moves once the projection does; stage I freezes the encoder; short training on clips whose colour only the reference
tells lowers the loss, and the reference then helps."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import hydra
import pytest
import torch
from torch.utils.data import DataLoader

from datamodules.synthetic.world import OBJECT_COLOURS
from experiments.compose import compose_config
from lightning_modules.conditioning import Conditions, ReferenceImage, Text
from lightning_modules.generation import GenerationModule
from lightning_modules.nn.codecs import PixelCodec
from lightning_modules.nn.dit import DiT
from lightning_modules.nn.text import TextConditioner, WordEncoder
from lightning_modules.nn.vision import PatchEncoder
from tests.helpers import fixed_loss, fixed_loss_before_and_after

pytestmark = pytest.mark.usefixtures("one_thread")

DIM, C = 32, 12  # model width; latent channels of PixelCodec(2)


def build(reference: str | None) -> GenerationModule:
    """A T2V model (reference None), or the same with a reference conditioner: "own" softmax or "joint"."""
    torch.manual_seed(0)
    net = DiT(in_channels=C, dim=DIM, depth=2, heads=4, ffn_dim=64, max_t=4, max_h=4, max_w=4, pooled_text=True)
    text = Text(TextConditioner({"word": WordEncoder(dim=16, depth=1, heads=2, max_length=16, buckets=64)}, dim=DIM),
                dropout=0.0)
    conditioners = {"text": text}
    if reference:
        conditioners["reference"] = ReferenceImage(PatchEncoder(dim=16, patch=4), dim=DIM, size=16,
                                                   own_softmax=reference == "own", train_encoder=False)
    return GenerationModule(net, PixelCodec(2), conditioners, optimizer=partial(torch.optim.AdamW, lr=1e-3),
                            sampler=dict(steps=3, guidance={"text": 2.0}))


def perturb(module: torch.nn.Module, scale: float = 0.05) -> None:
    """Random non-zero weights everywhere (zero-initialised layers included)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def test_zeroed_projection_gives_exactly_the_text_to_video_model(tmp_path: Path) -> None:
    t2v = build(None)
    perturb(t2v)  # a "trained" T2V checkpoint: every weight non-zero
    torch.save({"state_dict": t2v.state_dict()}, tmp_path / "t2v.ckpt")
    batch = {"text": ["the zq3 star bounces around", "a red circle"], "fps": torch.full((2,), 8.0),
             "reference": torch.rand(2, 3, 32, 32) * 2 - 1}  # resized to 16 by the conditioner
    x_t, t = torch.randn(2, C, 4, 8, 8), torch.tensor([0.3, 0.8])

    def predict(model: GenerationModule) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            conditions = model.conditions(model.condition_inputs(batch, (C, 4, 8, 8), False), batch["fps"], {})
            return model(x_t, t, conditions), model.generate(batch, 4, 16, 16, seed=0)

    want = predict(t2v)
    pt2v = build("own")
    pt2v.load_stage_weights(tmp_path / "t2v.ckpt")
    got = predict(pt2v)
    # bit for bit: one prediction, and a sample through 3 guided steps (text on/off passes, padded and stacked)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    conditions = pt2v.conditions(pt2v.condition_inputs(batch, (C, 4, 8, 8), False), batch["fps"], {})
    assert conditions.context_segments is not None and conditions.context_segments[1] == 16  # 16 reference tokens
    stacked = Conditions.cat([conditions, pt2v.conditions(pt2v.condition_inputs(batch, (C, 4, 8, 8), False),
                                                          batch["fps"], {"text": False})])
    assert stacked.context_segments == conditions.context_segments  # the empty prompt is padded within its segment

    with torch.no_grad():  # the reference reaches the backbone once the projection moves
        pt2v.conditioners["reference"].projection.weight.normal_(std=0.5)
    assert (predict(pt2v)[0] - want[0]).abs().max() > 1e-3

    # in the text's softmax, the zero tokens would take a share of the attention: not the T2V model
    joint = build("joint")
    joint.load_stage_weights(tmp_path / "t2v.ckpt")
    assert (predict(joint)[0] - want[0]).abs().max() > 1e-4


def test_stage_one_freezes_the_encoder(outputs: Path) -> None:
    stage1 = hydra.utils.instantiate(compose_config(["experiment=pt2v_stage1"], outputs / "job").model,
                                     _convert_="object")
    reference = stage1.conditioners["reference"]
    trainable = {id(p) for p in stage1.trainable_parameters()}
    assert not any(id(p) in trainable for p in reference.encoder.parameters())
    assert all(id(p) in trainable for p in reference.projection.parameters())
    stage3 = compose_config(["experiment=pt2v_stage3"], outputs / "job3")
    assert stage3.model.conditioners.reference.train_encoder and stage3.data.reference == "cross"
    assert stage3.model.init_from.endswith("pt2v_stage2") and stage1.init_from.endswith("t2v_tiny")


def reference_clips(count: int, seed: int = 0) -> list[dict]:
    """16x16 clips of an object whose colour only the reference (a crop of it on black) tells: the caption names
    an identity token but no colour."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.tensor(list(OBJECT_COLOURS.values()), dtype=torch.float32) / 127.5 - 1
    clips = []
    for _ in range(count):
        colour = colours[torch.randint(len(colours), (1,), generator=g)].view(3, 1, 1, 1)
        top, left = torch.randint(2, 8, (2,), generator=g).tolist()
        video = torch.full((3, 8, 16, 16), -0.2)  # a grey background
        video[:, :, top:top + 6, left:left + 6] = colour
        reference = torch.full((3, 16, 16), -1.0)
        reference[:, 4:12, 4:12] = colour[:, 0]
        clips.append({"video": video, "text": "The zq1 square sits still.", "fps": torch.tensor(8.0),
                      "reference": reference})
    return clips


def test_short_training_lowers_the_loss_and_the_reference_helps(outputs: Path) -> None:
    """The stage-I model (the quickstart's DiT, encoder frozen), 40 steps from scratch at a constant learning rate
    (the experiment's one-cycle schedule spans its own length): the fixed-grid loss on held-out clips falls, and is
    then lower with each clip's own reference than with another clip's. From scratch, the quickstart's MuonAdamW
    needs more than the stage's fine-tuning rate of 1e-3 to move in 40 steps (1.98 -> 1.77 at 1e-3)."""
    torch.manual_seed(0)
    overrides = ["experiment=pt2v_stage1", "model.init_from=null", "model.scheduler=null",  # a constant rate
                 "model.optimizer.lr=5e-3"]
    model = hydra.utils.instantiate(compose_config(overrides, outputs / "job").model, _convert_="object")
    train = reference_clips(160)
    model.codec.fit([torch.stack([clip["video"] for clip in train])])  # the quickstart's PCA codec, as setup fits it
    held_out = next(iter(DataLoader(reference_clips(12, seed=1), batch_size=12)))
    before, after = fixed_loss_before_and_after(model, held_out, train, steps=40, batch_size=8)
    assert after < 0.8 * before, (before, after)  # 1.98 -> 1.10
    shuffled = fixed_loss(model, {**held_out, "reference": held_out["reference"].roll(1, dims=0)}, times=8)
    assert after < shuffled, (after, shuffled)


def test_sample_task_takes_a_reference_image_and_prompts(outputs: Path, tmp_path: Path) -> None:
    """`task=sample` of a PT2V experiment with `model.sample.reference`: one mp4 per prompt (and the reference beside
    them); the reference reaches the samples; a model without a reference conditioner refuses it."""
    from datamodules.media import decode_video, encode_image
    from experiments.runner import run

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The zq40 star bounces around, on a plain white background.\nThe zq40 star sits still.\n")
    crop = torch.zeros(32, 32, 3, dtype=torch.uint8)
    crop[8:24, 8:24] = torch.tensor(OBJECT_COLOURS["red"], dtype=torch.uint8)
    (tmp_path / "ref.png").write_bytes(encode_image(crop.numpy()))
    # an untrained model has no fitted PCA basis to decode with: the pixel codec
    overrides = ["experiment=pt2v_stage1", "task=sample", "model.init_from=null", "model/codec=pixel",
                 "model.sampler.steps=3",
                 f"model.sample.prompts={prompts}", f"model.sample.reference={tmp_path / 'ref.png'}",
                 f"model.sample.output_dir={tmp_path / 'samples'}", "trainer.accelerator=cpu",
                 "trainer.enable_progress_bar=false"]
    run(compose_config(overrides, outputs / "job"))
    clips = sorted((tmp_path / "samples").glob("*.mp4"))
    assert len(clips) == 2 and (tmp_path / "samples" / "reference.png").is_file()
    assert decode_video(clips[0]).frames.shape == (8, 16, 16, 3)

    module = build("own")
    perturb(module)
    module.sample_cfg.prompts, module.sample_cfg.reference = str(prompts), str(tmp_path / "ref.png")
    requests = module.sample_requests()
    assert len(requests) == 2 and requests[0]["reference"].shape == (1, 3, 32, 32)
    red = module.generate(requests[0], 4, 16, 16, seed=0)
    blue = module.generate({**requests[0], "reference": requests[0]["reference"].roll(1, dims=1)}, 4, 16, 16, seed=0)
    assert (red - blue).abs().max() > 1e-3
    plain = build(None)
    plain.sample_cfg.prompts, plain.sample_cfg.reference = str(prompts), str(tmp_path / "ref.png")
    with pytest.raises(ValueError, match="no reference conditioner"):
        plain.sample_requests()


def test_a_pretrained_vision_encoder_from_a_local_folder(tmp_path: Path) -> None:
    """A CLIP vision tower saved with save_pretrained stands in for the PatchEncoder (nothing is downloaded)."""
    transformers = pytest.importorskip("transformers")
    from lightning_modules.nn.vision import HFVisionEncoder

    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=16, patch_size=8)
    transformers.CLIPVisionModel(config).save_pretrained(tmp_path / "clip")
    encoder = HFVisionEncoder(str(tmp_path / "clip"), dim=32)
    reference = ReferenceImage(encoder, dim=DIM, train_encoder=False)
    tokens, mask = reference(reference.inputs({"reference": torch.rand(2, 3, 32, 32) * 2 - 1}, None, (), False))
    assert tokens.shape == (2, 5, DIM) and mask.all()  # 2x2 patches + the class token
    assert not any(p.requires_grad for p in encoder.parameters())
    assert any(k.startswith("encoder.model.") for k in reference.state_dict())  # trainable stages keep it
    with pytest.raises(ValueError, match="hidden size 32"):
        HFVisionEncoder(str(tmp_path / "clip"), dim=64)
