"""AVID's middle-frame attention guidance (`nn.attention.MiddleFrameAnchors`) and the window order it needs:
the window holding the middle frame runs first, its middle frame's keys and values guide the other windows."""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import pytest
import torch
from einops import rearrange

from experiments.compose import compose_config
from lightning_modules.generative import multidiffusion
from lightning_modules.nn.attention import Attention, MiddleFrameAnchors, install_anchors


def test_the_window_nearest_the_middle_runs_first_and_the_fusion_is_unchanged() -> None:
    spans = multidiffusion.window_spans(20, 8, 4)  # centres 3.5, 7.5, 11.5, 15.5
    assert multidiffusion.middle_window(spans, 10) == 2 and multidiffusion.middle_window(spans, 9) == 1
    assert multidiffusion.middle_window(spans, 0) == 0 and multidiffusion.middle_window([(0, 5)], 2) == 0
    x = torch.randn(1, 2, 20, 3)
    calls = []

    def fn(piece: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
        calls.append(span)
        return piece * (1 + span[0])

    plain = multidiffusion.fuse_windows(fn, x, 8, 4)
    assert calls == spans
    calls.clear()
    first = multidiffusion.fuse_windows(fn, x, 8, 4, first=10)
    assert calls == [(8, 16), (0, 8), (4, 12), (12, 20)]
    torch.testing.assert_close(first, plain)


def by_hand(attn: Attention, x: torch.Tensor, anchor_tokens: torch.Tensor, weight: float) -> torch.Tensor:
    """(1 − w)·softmax(Q_f K_fᵀ/√d)V_f + w·softmax(Q_f K_aᵀ/√d)V_a per frame, with explicit matmuls."""
    heads, d = attn.heads, attn.head_dim
    split = lambda t: rearrange(t, "n l (h d) -> n h l d", h=heads)  # noqa: E731
    q, k, v = split(attn.to_q(x)), split(attn.to_k(x)), split(attn.to_v(x))
    frames = x.shape[0] // anchor_tokens.shape[0]
    k_a = split(attn.to_k(anchor_tokens)).repeat_interleave(frames, 0)
    v_a = split(attn.to_v(anchor_tokens)).repeat_interleave(frames, 0)
    own = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v
    anchor = torch.softmax(q @ k_a.transpose(-1, -2) / math.sqrt(d), -1) @ v_a
    return attn.to_out(rearrange((1 - weight) * own + weight * anchor, "n h l d -> n l (h d)"))


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_recorded_anchor_guides_the_other_windows_as_the_blend(weight: float) -> None:
    torch.manual_seed(0)
    attn = Attention(16, 2)
    batch, frames, tokens = 2, 3, 5
    middle_window = torch.randn(batch * frames, tokens, 16)
    other_window = torch.randn(batch * frames, tokens, 16)
    anchors = MiddleFrameAnchors(weight)
    assert torch.equal(anchors.self_attention(attn, other_window, batch), attn(other_window)), "nothing recorded"
    anchors.record(1)
    torch.testing.assert_close(anchors.self_attention(attn, middle_window, batch), attn(middle_window))
    anchors.guide()
    guided = anchors.self_attention(attn, other_window, batch)
    anchor_tokens = rearrange(middle_window, "(b t) n c -> b t n c", b=batch)[:, 1]
    torch.testing.assert_close(guided, by_hand(attn, other_window, anchor_tokens, weight), rtol=1e-5, atol=1e-6)
    if weight == 0.0:
        torch.testing.assert_close(guided, attn(other_window), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="weight"):
        MiddleFrameAnchors(1.5)


def test_windowed_sampling_with_middle_frame_guidance(outputs: Path) -> None:
    """The AVID video model (experiment=avid_motion, motion modules perturbed off zero): with w_a = 0 the UNet
    with anchors installed equals the plain one; sampling 12 frames in windows of 4 changes with w_a > 0, and
    leaves no anchors behind."""
    torch.manual_seed(0)
    module = hydra.utils.instantiate(compose_config(["experiment=avid_motion"], outputs / "job").model,
                                     _convert_="object").eval()
    with torch.no_grad():
        for p in module.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    blocks = [m for m in module.net.modules() if hasattr(m, "anchors")]
    assert blocks, "the UNet's spatial transformer blocks take anchors"

    clip = torch.rand(1, 3, 12, 16, 16) * 2 - 1
    mask = torch.zeros(1, 1, 12, 16, 16)
    mask[..., 4:12, 4:12] = 1.0
    batch = {"video": clip, "mask": mask, "text": ["A red circle bounces."], "fps": torch.full((1,), 8.0)}
    x1 = module.to_latent({**batch, "frames": 12})
    raw = module.condition_inputs({**batch, "frames": 12}, tuple(x1.shape[1:]), train=False)
    conditions = module.conditions(raw, batch["fps"], {})
    x_t, t = torch.randn_like(x1[:, :, :4]), torch.full((1,), 0.5)
    with torch.no_grad():
        plain = module(x_t, t, conditions.window(0, 4))
        anchors = MiddleFrameAnchors(0.0)
        install_anchors(module.net, anchors)
        anchors.record(2)
        module(torch.randn_like(x_t), t, conditions.window(4, 8))
        assert len(anchors.cache) == len(blocks), "every spatial self-attention recorded its anchor"
        anchors.guide()
        torch.testing.assert_close(module(x_t, t, conditions.window(0, 4)), plain, rtol=1e-5, atol=1e-6)
        install_anchors(module.net, None)

        module.sampler.window, module.sampler.overlap, module.sampler.guidance = 4, 2, {}
        runs = {}
        for w_a in (0.0, 0.5):
            module.sampler.anchor_weight = w_a
            runs[w_a] = module.generate(batch, 12, 16, 16, steps=2, seed=0)
    assert all(b.anchors is None for b in blocks)
    assert runs[0.5].shape == clip.shape and (runs[0.5] - runs[0.0]).abs().max() > 1e-3
