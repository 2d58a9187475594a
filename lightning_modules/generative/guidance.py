"""Classifier-free guidance (CFG), single- and multi-condition, as one formula.

One model, trained with each condition dropped at some rate, predicts under nested sets of conditions. With passes
p_0 (every condition dropped), p_1 (condition 1 on), p_2 (conditions 1 and 2 on), ..., p_n (all on), the guided
prediction is the telescoping sum

    p = p_0 + Σ_{i=1..n} s_i·(p_i − p_{i−1})

* n = 1, single CFG (Ho & Salimans 2022): p = u + s·(c − u); s = 1 is the conditional model, s = 0 the
  unconditional one, s > 1 pushes toward the prompt (Movie Gen reportedly uses 7.5 for text).
* n = 2, InstructPix2Pix (Brooks et al. 2023, eq. 3), condition 1 = the input image I, condition 2 = the text T:
  ε(0, 0) + s_I·[ε(I, 0) − ε(0, 0)] + s_T·[ε(I, T) − ε(I, 0)].

It applies to any prediction type (velocity, epsilon, data, v): all are affine in the model output. The passes run
as one forward on the batch repeated n + 1 times, pass-major: [x (pass 0); x (pass 1); ...; x (pass n)]. To run a
single conditional pass, the caller skips guidance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def combine(predictions: Sequence[torch.Tensor], scales: Sequence[float]) -> torch.Tensor:
    """p_0 + Σ_i s_i·(p_i − p_{i−1}) for predictions ordered p_0 (nothing on) .. p_n (all on);
    len(predictions) = len(scales) + 1."""
    if len(predictions) != len(scales) + 1 or not scales:
        raise ValueError(f"need len(predictions) = len(scales) + 1 >= 2, got {len(predictions)} and {len(scales)}")
    out = predictions[0]
    for i, scale in enumerate(scales, start=1):
        out = out + scale * (predictions[i] - predictions[i - 1])
    return out


def check_interval(interval: Sequence[float] | None, name: str = "guidance interval") -> None:
    """A clear error unless `interval` is None or [t_lo, t_hi] with 0 <= t_lo <= t_hi <= 1 (flow times)."""
    if interval is not None and not (len(interval) == 2 and 0.0 <= interval[0] <= interval[1] <= 1.0):
        raise ValueError(f"{name}={list(interval)} must be [t_lo, t_hi] with 0 <= t_lo <= t_hi <= 1 (flow times, "
                         f"0 = noise)")


def guided(batched_fn: ModelFn, scales: Sequence[float], interval: Sequence[float] | None = None) -> ModelFn:
    """A solver `model_fn(x, t)` that calls `batched_fn(x_rep, t_rep)` once on the batch repeated n + 1 times
    (n = len(scales)), pass-major; batched_fn puts pass i's conditions on block i (i = 0: all dropped) and returns
    the predictions in the same layout, which `combine` mixes.

    interval = (t_lo, t_hi): guidance only for flow times t_lo <= t <= t_hi (0 = noise, 1 = data); elsewhere the
    prediction with every condition on (all s_i = 1), from one pass. Kynkäänniemi et al. 2024 (arXiv 2404.07724):
    guidance at high noise pulls every sample toward one mode, and near the data it adds little; in the middle it
    moves the samples toward the prompt without that cost. (The passes still all run outside the interval: the
    conditions are laid out for them.)"""
    scales = [float(s) for s in scales]
    passes = len(scales) + 1
    if passes < 2:
        raise ValueError("guided needs at least one scale")
    check_interval(interval)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        t_rep = t.repeat(passes) if t.ndim == 1 else t
        out = batched_fn(torch.cat([x] * passes), t_rep)
        if out.shape[0] != passes * x.shape[0]:
            raise ValueError(f"batched_fn returned batch {out.shape[0]}, expected {passes} x {x.shape[0]}")
        if interval is not None and not interval[0] - 1e-6 <= float(t.flatten()[0]) <= interval[1] + 1e-6:  # float32 t
            return out.split(x.shape[0])[-1]
        return combine(out.split(x.shape[0]), scales)

    return model_fn


def cfg_combine(u_cond: torch.Tensor, u_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """u_w = u_uncond + w·(u_cond − u_uncond) (`combine` with n = 1)."""
    return combine([u_uncond, u_cond], [scale])


def classifier_free_guidance(paired_fn: ModelFn, scale: float) -> ModelFn:
    """Single CFG with the older layout: `paired_fn` takes a doubled batch [x; x], [t; t] whose FIRST half is
    conditioned on the prompts and second half on the empty prompt, and returns [u_cond; u_uncond] (the reverse of
    `guided`'s pass order); the halves are combined with `cfg_combine` (one forward pass per step)."""

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        u_cond, u_uncond = paired_fn(torch.cat([x, x]), torch.cat([t, t])).chunk(2)
        return cfg_combine(u_cond, u_uncond, scale)

    return model_fn
