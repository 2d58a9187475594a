"""Classifier-free guidance (CFG) for flow models.

One model, trained with the text dropped (replaced by the empty prompt) at a rate p, predicts both the
conditional velocity u(x, t, P) and the unconditional one u(x, t, ∅). At sampling time

    u_w = u(x, t, ∅) + w·(u(x, t, P) − u(x, t, ∅))

w = 1 is the conditional model, w = 0 the unconditional one, w > 1 pushes samples toward the prompt (Movie Gen
reportedly uses w = 7.5; our CPU quickstart uses less).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def cfg_combine(u_cond: torch.Tensor, u_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """u_w = u_uncond + w·(u_cond − u_uncond)."""
    return u_uncond + scale * (u_cond - u_uncond)


def classifier_free_guidance(paired_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                             scale: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A solver `model_fn(x, t)` from `paired_fn`, which takes a doubled batch [x; x], [t; t] whose first half is
    conditioned on the prompts and second half on the empty prompt, and returns [u_cond; u_uncond]; the two
    halves are combined with `cfg_combine` (one forward pass per step)."""

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        u_cond, u_uncond = paired_fn(torch.cat([x, x]), torch.cat([t, t])).chunk(2)
        return cfg_combine(u_cond, u_uncond, scale)

    return model_fn
