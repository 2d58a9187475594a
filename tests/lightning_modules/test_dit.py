"""The Movie Gen DiT, text encoders and codecs: shapes for every bucket, adaLN-Zero start, position tables,
zero-initialised condition channels, the 30B parameter count on the meta device, and the planner."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from experiments import plan
from experiments.compose import compose_config
from lightning_modules.nn.attention import Attention, rotary_angles, rotate
from lightning_modules.nn.codecs import PixelCodec
from lightning_modules.nn.dit import DiT, count_parameters, grow_position_tables
from lightning_modules.nn.text import (
    BOS,
    PAD,
    ByteEncoder,
    TextConditioner,
    WordEncoder,
    byte_tokens,
    pad_context,
    quoted_text,
    words,
)


def tiny(**kwargs) -> DiT:
    torch.manual_seed(0)
    options = dict(in_channels=12, dim=32, depth=2, heads=4, ffn_dim=64, max_t=16, max_h=16, max_w=16) | kwargs
    return DiT(**options)


def randomise(net: DiT) -> DiT:
    """Give the zero-initialised layers values so that every path carries signal."""
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return net


@pytest.mark.parametrize("experiment", ["quickstart", "t2v_stage2", "t2v_stage3_hires"])
def test_shapes_for_every_bucket(experiment: str, outputs: Path) -> None:
    """Every (size, frames) bucket of the experiment's data, and its images (T = 1), through the model."""
    cfg = compose_config([f"experiment={experiment}"], outputs / "job")
    import hydra

    codec = hydra.utils.instantiate(cfg.model.codec)
    net = randomise(hydra.utils.instantiate(cfg.model.net))
    frames = list(cfg.data.frames) + [1]
    if hasattr(codec, "fit"):  # a codec fitted on data (the quickstart's PCA): fit it on clips of the first size
        codec.fit([torch.rand(16, 3, max(frames), *cfg.data.sizes[0]) * 2 - 1], max_refine_steps=2)  # shapes only
    for height, width in cfg.data.sizes:
        for t in frames:
            video = torch.rand(2, 3, t, height, width) * 2 - 1
            z = codec.encode(video)
            out = net(z, torch.rand(2), torch.randn(2, 5, net.dim), torch.ones(2, 5, dtype=torch.bool),
                      fps=torch.tensor([8.0, 0.0]))
            assert out.shape == z.shape, (height, width, t)
            assert codec.decode(out, t).shape == video.shape


def test_starts_as_zero_prediction_and_every_block_as_identity() -> None:
    net = tiny()
    x = torch.randn(2, 12, 3, 8, 6)
    ctx = torch.randn(2, 7, 32)
    assert torch.count_nonzero(net(x, torch.rand(2), ctx)) == 0  # the output layer starts at zero
    tokens = torch.randn(2, 10, 32)
    pe = torch.zeros(10, 32)
    block = net.blocks[0]
    # gates are 0, so only the (unmodulated) cross-attention changes the residual stream
    expected = tokens + block.cross(block.norm2(tokens), ctx)
    assert torch.allclose(block(tokens, pe, torch.zeros(2, 6, 32), ctx), expected, atol=1e-6)


def test_text_padding_and_bidirectional_attention() -> None:
    net = randomise(tiny())
    x, t = torch.randn(1, 12, 2, 4, 4), torch.rand(1)
    ctx = torch.randn(1, 5, 32)
    mask = torch.tensor([[True, True, True, False, False]])
    a = net(x, t, ctx, mask)
    b = net(x, t, torch.cat([ctx[:, :3], torch.randn(1, 2, 32)], 1), mask)
    assert torch.allclose(a, b, atol=1e-6), "padded text tokens must not matter"
    assert not torch.allclose(a, net(x, t, ctx[:, :3] * 2, mask[:, :3])), "the text conditions the output"
    # full bidirectional self-attention: changing the last frame changes the first frame's output
    x2 = x.clone()
    x2[:, :, -1] += 1.0
    assert not torch.allclose(net(x2, t, ctx, mask)[:, :, 0], a[:, :, 0])


def test_fps_embedding_and_condition_channels() -> None:
    net = randomise(tiny(fps_embedding=True))
    x, t, ctx = torch.randn(2, 12, 2, 4, 4), torch.rand(2), torch.randn(2, 3, 32)
    assert not torch.allclose(net(x, t, ctx, fps=torch.tensor([8.0, 8.0])), net(x, t, ctx, fps=torch.tensor([16.0, 16.0])))
    # condition channels start at zero: a model with them equals the model without on any condition
    plain = randomise(tiny())
    conditioned = tiny(cond_channels=12)
    state = {k: v for k, v in plain.state_dict().items() if k != "patchify.weight"}
    conditioned.load_state_dict(state, strict=False)
    with torch.no_grad():
        conditioned.patchify.weight[:, :12] = plain.patchify.weight
    assert torch.allclose(conditioned(x, t, ctx, cond=torch.randn_like(x)), plain(x, t, ctx), atol=1e-6)
    with pytest.raises(ValueError, match="cond_channels"):
        conditioned(x, t, ctx)


def test_pooled_text_starts_at_zero_and_then_conditions_the_modulation() -> None:
    plain = randomise(tiny())
    pooled = tiny(pooled_text=True)
    pooled.load_state_dict(plain.state_dict(), strict=False)  # text_pool stays at its zero start
    x, t, ctx = torch.randn(2, 12, 2, 4, 4), torch.rand(2), torch.randn(2, 5, 32)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    assert torch.allclose(pooled(x, t, ctx, mask), plain(x, t, ctx, mask), atol=1e-6)
    pooled = randomise(pooled)
    a = pooled(x, t, ctx, mask)
    assert torch.allclose(a[1], pooled(x, t, torch.cat([ctx[:, :2], torch.randn(2, 3, 32)], 1), mask)[1], atol=1e-6)
    # without cross-attention the text still reaches the output through the pooled vector
    for block in pooled.blocks:
        block.cross.forward = lambda x, *args, **kwargs: torch.zeros_like(x)
    assert not torch.allclose(pooled(x, t, ctx, mask), pooled(x, t, ctx * 2, mask))


def test_rotary_positions_turn_queries_and_keys_by_their_offset() -> None:
    grid, head_dim, theta = (2, 3, 4), 16, 50.0  # 8 pairs: 4 for t, 2 for h, 2 for w
    angles = rotary_angles(grid, head_dim, theta)
    # the angles written out position by position: pair i of an axis part of m pairs turns pos·theta^(−i/m)
    expected = torch.zeros(24, 8)
    for n, (t, h, w) in enumerate((t, h, w) for t in range(2) for h in range(3) for w in range(4)):
        for i in range(8):
            axis, pos, m, j = ((0, t, 4, i) if i < 4 else (1, h, 2, i - 4) if i < 6 else (2, w, 2, i - 6))
            expected[n, i] = pos * theta ** (-j / m)
    torch.testing.assert_close(angles, expected)
    # the rotation written out pair by pair: (a cos θ − b sin θ, a sin θ + b cos θ) for (a, b) = (x_2i, x_2i+1)
    x = torch.randn(2, 3, 24, head_dim)
    a, b = x[..., 0::2], x[..., 1::2]
    expected = torch.empty_like(x)
    expected[..., 0::2] = a * angles.cos() - b * angles.sin()
    expected[..., 1::2] = a * angles.sin() + b * angles.cos()
    torch.testing.assert_close(rotate(x, angles), expected)
    torch.testing.assert_close(rotate(x.bfloat16(), angles), expected.bfloat16(), atol=0.02, rtol=0.02)
    assert rotate(x.bfloat16(), angles).dtype == torch.bfloat16
    # q·k depends on the tokens' offset only: the same vectors at (0, 0, 1)→(1, 2, 3) and (0, 0, 0)→(1, 2, 2)
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    qs, ks = (rotate(v.expand(1, 1, 24, head_dim), angles)[0, 0] for v in (q, k))
    index = {(t, h, w): n for n, (t, h, w) in enumerate((t, h, w) for t in range(2) for h in range(3) for w in range(4))}
    assert torch.allclose(qs[index[0, 0, 1]] @ ks[index[1, 2, 3]], qs[index[0, 0, 0]] @ ks[index[1, 2, 2]], atol=1e-5)
    assert not torch.allclose(qs[index[0, 0, 1]] @ ks[index[1, 2, 3]], qs[index[0, 0, 0]] @ ks[index[1, 1, 2]], atol=1e-3)
    # frame_offset: the temporal positions of sample b start at offset_b
    shifted = rotary_angles(grid, head_dim, theta, frame_offset=torch.tensor([0, 3]))
    torch.testing.assert_close(shifted[0], angles)
    torch.testing.assert_close(shifted[1], rotary_angles((5, 3, 4), head_dim, theta)[3 * 12:])
    with pytest.raises(ValueError, match="dense self-attention"):
        Attention(16, 1)(torch.randn(1, 24, 16), torch.randn(1, 3, 16), rotary=angles)


def test_rope_dit_is_unchanged_without_it_and_turns_self_attention_with_it() -> None:
    plain = randomise(tiny())
    rope = tiny(rope_theta=100.0)
    rope.load_state_dict(plain.state_dict())  # no new weights
    x, t, ctx = torch.randn(2, 12, 2, 4, 4), torch.rand(2), torch.randn(2, 5, 32)
    assert not torch.allclose(rope(x, t, ctx), plain(x, t, ctx), atol=1e-4)
    rope.rope_theta = None
    torch.testing.assert_close(rope(x, t, ctx), plain(x, t, ctx))


def test_clear_errors_for_bad_shapes() -> None:
    net = tiny(max_t=2)
    ctx = torch.randn(1, 3, 32)
    with pytest.raises(ValueError, match="multiples of the patch"):
        net(torch.randn(1, 12, 2, 5, 4), torch.rand(1), ctx)
    with pytest.raises(ValueError, match="exceeds the position tables"):
        net(torch.randn(1, 12, 3, 4, 4), torch.rand(1), ctx)
    with pytest.raises(ValueError, match=r"latent \[B, 12"):
        net(torch.randn(1, 3, 2, 4, 4), torch.rand(1), ctx)


def test_position_tables_grow_for_the_next_stage() -> None:
    small, big = tiny(max_t=2, max_h=3, max_w=3), tiny(max_t=4, max_h=6, max_w=3)
    state = grow_position_tables(small.state_dict(), big)
    big.load_state_dict(state)
    assert torch.equal(big.pos.h[:3], small.pos.h)
    assert torch.equal(big.pos.h[3:], small.pos.h[-1:].expand(3, -1))  # new rows copy the nearest old row
    assert torch.equal(big.pos.w, small.pos.w)


def test_paper_size_on_the_meta_device() -> None:
    """48 layers, width 6144, FFN 16384, 48 heads: ~30B transformer parameters (29.0B in the blocks)."""
    with torch.device("meta"):
        net = DiT(in_channels=16, dim=6144, depth=48, heads=48, ffn_dim=16384, max_t=32, max_h=64, max_w=64)
    block = net.blocks[0]
    assert count_parameters(block.attn) == 4 * 6144**2
    assert count_parameters(block.cross) == 4 * 6144**2
    assert count_parameters(block.ffn) == 3 * 6144 * 16384
    assert 28.9e9 < sum(count_parameters(b) for b in net.blocks) < 29.1e9
    assert 29.0e9 < count_parameters(net) < 30.5e9
    assert block.attn.head_dim == 128


def test_planner_reports_tokens_flops_and_memory(outputs: Path, capsys: pytest.CaptureFixture) -> None:
    result = plan.main(["model=moviegen_30b", "num_gpus=6144"])
    assert result["tokens"] == 73_728 and result["token_grid"] == [32, 48, 48]
    assert result["layers"] == 48 and result["width"] == 6144 and result["ffn"] == 16384 and result["heads"] == 48
    assert 29e9 < result["parameters"]["total"] < 30.5e9
    flops = result["flops_per_clip"]
    assert flops["self_attention_12LN2d"] == 12 * 48 * 73_728**2 * 6144  # 1.92e16
    assert 2.9e16 < flops["training"] < 3.5e16
    memory = result["memory_per_gpu_gb"]
    assert memory["total"] == pytest.approx(sum(memory[k] for k in ("sharded_states", "gathered_weights",
                                                                      "checkpointed_block_inputs", "one_block_activations")))
    assert "73,728 tokens" in capsys.readouterr().out
    fewer = plan.main(["model=moviegen_30b", "num_gpus=64"])
    assert fewer["memory_per_gpu_gb"]["sharded_states"] == pytest.approx(memory["sharded_states"] * 6144 / 64)


# -- text encoders -------------------------------------------------------------------------------------------------
def test_byte_tokens_and_encoder() -> None:
    ids, mask = byte_tokens(["ab", "", "é"], max_length=4)
    assert ids.tolist() == [[BOS, 97, 98], [BOS, PAD, PAD], [BOS, 0xC3, 0xA9]]
    assert mask.tolist() == [[True, True, True], [True, False, False], [True, True, True]]
    assert byte_tokens(["abcdef"], max_length=4)[0].tolist() == [[BOS, 97, 98, 99]]
    enc = ByteEncoder(dim=16, depth=1, heads=2, max_length=32)
    h, m = enc(["a red circle", ""])
    assert h.shape == (2, 13, 16) and m.sum(1).tolist() == [13, 1]
    # padding does not leak into real tokens
    alone, _ = enc([""])
    assert torch.allclose(h[1, :1], alone[0, :1], atol=1e-5)


def test_word_tokens_and_encoder() -> None:
    assert words("FPS-8 A polka-dot Star, on a plain background.") == [
        "fps-8", "a", "polka-dot", "star", ",", "on", "a", "plain", "background", "."]
    enc = WordEncoder(dim=16, depth=1, heads=2, max_length=6, vocab=["a", "red", "star", "A"], buckets=8)
    assert len(enc.vocab) == 3 and enc.embed.num_embeddings == 2 + 3 + 8
    ids, mask = enc.tokens(["A red star", "", "a blue moon x y z"])
    assert ids[0].tolist() == [0, 2, 3, 4, 1, 1] and mask.tolist()[1] == [True, False, False, False, False, False]
    assert ids.shape == (3, 6)  # cut to max_length
    unknown = ids[2, 2:4].tolist()  # hashed words: stable ids after the vocabulary
    assert all(5 <= i < 13 for i in unknown) and enc.tokens(["a blue moon"])[0][0, 2:].tolist() == unknown
    h, m = enc(["a red star", ""])
    assert h.shape == (2, 4, 16) and m.sum(1).tolist() == [4, 1]
    alone, _ = enc([""])
    assert torch.allclose(h[1, :1], alone[0, :1], atol=1e-5)  # padding does not leak into real tokens
    (h * torch.randn_like(h)).sum().backward()  # (a plain sum of LayerNorm outputs has no gradient)
    assert enc.embed.weight.grad[2:5].abs().sum() > 0
    with pytest.raises(ValueError, match="buckets"):
        WordEncoder(buckets=0)
    cond = TextConditioner({"word": enc, "byte": ByteEncoder(16, 0, 2, 8)}, dim=32)
    tokens, mask = cond(["a red star"])
    assert tokens.shape == (1, 4 + 8, 32)


def test_conditioner_projects_norms_and_concatenates_encoders() -> None:
    cond = TextConditioner({"a": ByteEncoder(16, 1, 2, 8), "b": ByteEncoder(24, 0, 2, 4), "off": None}, dim=32)
    assert list(cond.encoders) == ["a", "b"]
    tokens, mask = cond(["hello world", "hi"])
    assert tokens.shape == (2, 8 + 4, 32)  # sequences concatenated: a cut to 8 tokens, b to 4
    assert mask.tolist() == [[True] * 12, [True] * 3 + [False] * 5 + [True] * 3 + [False]]
    b_part = tokens[:, 8:]
    assert torch.allclose(b_part.mean(-1), torch.zeros(2, 4), atol=1e-5)  # each encoder's LayerNorm
    merged, merged_mask = pad_context([(tokens, mask), (tokens[:1, :5], mask[:1, :5])])
    assert merged.shape == (3, 12, 32) and not merged_mask[2, 5:].any()
    with pytest.raises(TypeError, match="list of prompts"):
        cond("one string")


def test_quoted_text_is_what_stands_between_double_quotes() -> None:
    assert quoted_text('a sign that says "OPEN" and “24/7”') == "OPEN 24/7"


def test_pixel_codec_is_exactly_invertible() -> None:
    codec = PixelCodec(spatial=4, temporal=2)
    video = torch.rand(2, 3, 4, 8, 12)
    z = codec.encode(video)
    assert z.shape == (2, 3 * 2 * 16, 2, 2, 3) == (2, *codec.latent_shape(4, 8, 12))
    assert torch.equal(codec.decode(z), video)
    assert torch.equal(z[0, :, 0, 0, 0].view(3, 2, 4, 4), video[0, :, :2, :4, :4])
    with pytest.raises(ValueError, match="multiples"):
        codec.encode(torch.rand(1, 3, 3, 8, 8))
