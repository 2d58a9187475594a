"""Time schedules (shifted, VP DDIM spacings by hand, the training-time sampler) and multi-condition classifier-free
guidance against its formula (single CFG, InstructPix2Pix's three passes, the batched pass layout)."""

from __future__ import annotations

import inspect

import pytest
import torch

from lightning_modules.generative import guidance, paths, timesteps


# -- schedules ----------------------------------------------------------------------------------------------------
def test_shifted_schedule_is_shift_time_of_uniform() -> None:
    for steps, shift in ((4, 3.0), (10, 1.0), (7, 0.5)):
        got = timesteps.schedule("shifted", steps, shift=shift)
        assert torch.equal(got, timesteps.shift_time(timesteps.uniform_schedule(steps), shift))
        assert torch.equal(got, timesteps.shifted_schedule(steps, shift))
        assert got[0] == 0 and got[-1] == 1
    # σ = 1 − t, σ' = 3σ / (1 + 2σ): t = 0.25, 0.5, 0.75 → 0.1, 0.25, 0.5
    assert torch.allclose(timesteps.schedule("shifted", 4, shift=3.0), torch.tensor([0.0, 0.1, 0.25, 0.5, 1.0]))
    # positional arguments of the old signature still mean (name, num_steps, emulated_steps)
    old_style = timesteps.schedule("linear_quadratic", 50, 1000)
    assert torch.equal(old_style, timesteps.linear_quadratic_schedule(50, 1000))


def test_vp_spacings_by_hand() -> None:
    """diffusers DDIMScheduler `timestep_spacing` / Lin et al. 2024 Table 2 (their steps count from 1)."""
    assert timesteps.vp_steps("leading", 10, 1000).tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert timesteps.vp_steps("leading", 10, 1000, steps_offset=1).tolist() == [901, 801, 701, 601, 501, 401, 301,
                                                                                 201, 101, 1]
    assert timesteps.vp_steps("trailing", 10, 1000).tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert timesteps.vp_steps("linspace", 10, 1000).tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    # uneven divisions: trailing round(1000 − i·1000/3) − 1; linspace(0, 999, 3) = 0, 499.5, 999 → half to even
    assert timesteps.vp_steps("trailing", 3, 1000).tolist() == [999, 666, 332]
    assert timesteps.vp_steps("linspace", 3, 1000).tolist() == [999, 500, 0]
    assert timesteps.vp_steps("leading", 3, 1000).tolist() == [666, 333, 0]
    assert timesteps.vp_steps("trailing", 1000, 1000).tolist() == list(range(999, -1, -1))
    # times: t = (N − 1 − k)/N, increasing, then t = 1 (clean)
    grid = timesteps.schedule("trailing", 10, train_steps=1000)
    assert grid.dtype == torch.float64 and grid.shape == (11,)
    assert torch.allclose(grid, torch.arange(11, dtype=torch.float64) / 10, rtol=0, atol=1e-15)
    lead = timesteps.schedule("leading", 10, train_steps=1000)
    assert lead[0].item() == pytest.approx(0.099) and lead[-2].item() == pytest.approx(0.999) and lead[-1] == 1.0
    lin = timesteps.schedule("linspace", 10, train_steps=1000)
    assert lin[1].item() == pytest.approx(0.111) and lin[-2].item() == pytest.approx(0.999)
    for name in ("leading", "trailing", "linspace"):
        g = timesteps.schedule(name, 25, train_steps=500)
        assert bool((g.diff() > 0).all()) and g[-1] == 1.0
    # the times land on VPPath's knots: α(t)² = ᾱ_k
    vp = paths.VPPath()
    k = timesteps.vp_steps("linspace", 10)
    assert torch.allclose(vp.alpha(lin[:-1]) ** 2, vp.alphas_cumprod[k], rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="unknown VP spacing"):
        timesteps.vp_steps("karras", 10)
    with pytest.raises(ValueError, match="num_steps <= train_steps"):
        timesteps.vp_steps("trailing", 11, 10)
    with pytest.raises(ValueError, match="unknown schedule 'cosine'; choose one of"):
        timesteps.schedule("cosine", 10)


def test_uniform_times() -> None:
    g = torch.Generator().manual_seed(0)
    t = timesteps.uniform_times(100_000, generator=g)
    assert t.shape == (100_000,) and 0 <= t.min() and t.max() < 1
    assert t.mean().item() == pytest.approx(0.5, abs=0.005)
    assert (t < 0.25).float().mean().item() == pytest.approx(0.25, abs=0.005)
    d = timesteps.uniform_times(20_000, generator=g, discrete_steps=8)
    assert sorted(set((d * 8).tolist())) == [float(j) for j in range(8)]  # t = j/N, j = 0..N−1: never t = 1
    vp = paths.VPPath(num_train_steps=8, schedule="linear", beta_start=1e-3, beta_end=0.2)
    assert sorted(set(vp.step_of_time(d).round().long().tolist())) == list(range(8))


# -- guidance -------------------------------------------------------------------------------------------------------
def test_combine_single_cfg_and_instructpix2pix_by_hand() -> None:
    g = torch.Generator().manual_seed(1)
    u, c = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    assert torch.allclose(guidance.combine([u, c], [7.5]), u + 7.5 * (c - u))
    assert torch.equal(guidance.cfg_combine(c, u, 7.5), guidance.combine([u, c], [7.5]))
    assert torch.allclose(guidance.combine([u, c], [1.0]), c, rtol=0, atol=1e-6)
    # InstructPix2Pix: ε(0,0) + s_I·[ε(I,0) − ε(0,0)] + s_T·[ε(I,T) − ε(I,0)], with s_I ≠ s_T
    e00, ei0, eit = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    s_i, s_t = 1.5, 7.5
    hand = e00 + s_i * (ei0 - e00) + s_t * (eit - ei0)
    assert torch.allclose(guidance.combine([e00, ei0, eit], [s_i, s_t]), hand, rtol=0, atol=1e-14)
    # swapping the scales changes the result (the order of the nested passes matters)
    assert not torch.allclose(guidance.combine([e00, ei0, eit], [s_t, s_i]), hand)
    # unit scales give the fully conditioned pass; zero scales the unconditioned one
    assert torch.allclose(guidance.combine([e00, ei0, eit], [1.0, 1.0]), eit, rtol=0, atol=1e-14)
    assert torch.equal(guidance.combine([e00, ei0, eit], [0.0, 0.0]), e00)
    p = torch.randn(4, 3, generator=g, dtype=torch.float64)
    s = [2.0, -0.5, 3.0]
    hand = p[0] + 2.0 * (p[1] - p[0]) - 0.5 * (p[2] - p[1]) + 3.0 * (p[3] - p[2])
    assert torch.allclose(guidance.combine(list(p), s), hand, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match=r"len\(predictions\) = len\(scales\) \+ 1"):
        guidance.combine([u, c], [1.0, 2.0])


def test_guided_batches_the_passes_pass_major() -> None:
    """batched_fn sees [x; x; x] and [t; t; t]; block i answers with the pass-i model, here ε_i(x) = (i + 1)·x + i."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def batched(x_rep: torch.Tensor, t_rep: torch.Tensor) -> torch.Tensor:
        calls.append((x_rep, t_rep))
        b = x_rep.shape[0] // 3
        return torch.cat([(i + 1) * x_rep[i * b:(i + 1) * b] + i for i in range(3)])

    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = torch.tensor([0.2, 0.7])
    s_i, s_t = 1.5, 7.5
    out = guidance.guided(batched, [s_i, s_t])(x, t)
    assert len(calls) == 1
    x_rep, t_rep = calls[0]
    assert torch.equal(x_rep, torch.cat([x, x, x])) and torch.equal(t_rep, torch.cat([t, t, t]))
    e00, ei0, eit = x, 2 * x + 1, 3 * x + 2
    assert torch.allclose(out, e00 + s_i * (ei0 - e00) + s_t * (eit - ei0))

    # single CFG: the older paired layout [cond; uncond] and guided's [uncond; cond] agree
    paired = lambda xr, tr: torch.cat([2 * xr[:2], xr[2:]])  # first half conditional
    pass_major = lambda xr, tr: torch.cat([xr[:2], 2 * xr[2:]])  # pass 0 unconditional
    old = guidance.classifier_free_guidance(paired, 3.0)(x, t)
    assert torch.allclose(old, guidance.guided(pass_major, [3.0])(x, t))
    assert torch.allclose(guidance.guided(pass_major, [3.0])(x, t), x + 3.0 * (2 * x - x))
    with pytest.raises(ValueError, match="expected 2 x 2"):
        guidance.guided(lambda xr, tr: xr[:2], [3.0])(x, t)


def test_schedule_edges() -> None:
    # two steps: one linear step of tau = 1/1000, then the quadratic one to 1
    assert timesteps.linear_quadratic_schedule(2, 1000).tolist() == pytest.approx([0.0, 0.001, 1.0])
    with pytest.raises(ValueError, match="emulated_steps=2 must exceed"):
        timesteps.linear_quadratic_schedule(4, 2)  # tau = 2 / 2 = 1: no room for the quadratic part
    assert timesteps.vp_steps("trailing", 1, 10).tolist() == [9]  # one step, and as many steps as training had
    assert timesteps.vp_steps("leading", 10, 10).tolist() == list(range(9, -1, -1))
    with pytest.raises(ValueError, match="need 1 <= num_steps <= train_steps"):
        timesteps.vp_steps("leading", 11, 10)
    defaults = {k: p.default for k, p in inspect.signature(timesteps.schedule).parameters.items()}
    assert (defaults["emulated_steps"], defaults["shift"], defaults["train_steps"]) == (1000, 1.0, 1000)
    for fn in (timesteps.vp_schedule, timesteps.vp_steps):  # DDPM's 1000 training steps
        assert inspect.signature(fn).parameters["train_steps"].default == 1000
