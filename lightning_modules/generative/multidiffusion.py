"""Temporal window fusion (MultiDiffusion, Bar-Tal et al. 2023) for models that see a fixed number of frames.

A long sequence of length N along `dim` is split into overlapping windows [s_k, e_k) of length W with stride
W − overlap (the last window aligned to the end). At every solver step the model runs on each window and the
predictions are averaged where windows overlap, with per-position weights w (uniform or triangular):

    out[n] = Σ_k w_k(n − s_k)·f(x[s_k:e_k])[n − s_k] / Σ_k w_k(n − s_k),    over windows k with s_k ≤ n < e_k

The sum does not depend on the order of the windows, but a model with state across windows does: AVID's middle-frame
attention guidance denoises the window whose centre is nearest the sequence's middle first (`first=`), and
guides the others with that window's attention.

Triangular weights (Movie Gen Audio): w(j) = 1 − |2j / (W − 1) − 1| + ε, so window edges count little.
Movie Gen's spatial upsampler uses windows of 14 frames with an overlap of 4 (in latent frames here).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

WindowFn = Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]


def window_spans(length: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """[(start, end), ...] covering [0, length) with windows of `window` and stride `window − overlap`."""
    if window < 1 or not 0 <= overlap < window:
        raise ValueError(f"need window >= 1 and 0 <= overlap < window, got window={window}, overlap={overlap}")
    if length <= window:
        return [(0, length)]
    stride = window - overlap
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return [(s, s + window) for s in starts]


def middle_window(spans: list[tuple[int, int]], position: int) -> int:
    """Index of the span whose centre is nearest `position` (the first such span on a tie)."""
    return min(range(len(spans)), key=lambda k: (abs((spans[k][0] + spans[k][1] - 1) / 2 - position), k))


def window_weights(size: int, kind: str = "uniform", eps: float = 1e-3) -> torch.Tensor:
    """[size] weights: ones ("uniform") or 1 − |2j/(size − 1) − 1| + eps ("triangular")."""
    if kind == "uniform" or size == 1:
        return torch.ones(size)
    if kind == "triangular":
        j = torch.arange(size, dtype=torch.float32)
        return 1.0 - (2.0 * j / (size - 1) - 1.0).abs() + eps
    raise ValueError(f"unknown window weighting {kind!r}; choose uniform or triangular")


def fuse_windows(fn: WindowFn, x: torch.Tensor, window: int, overlap: int, dim: int = 2,
                 weighting: str = "uniform", first: int | None = None) -> torch.Tensor:
    """Σ_k w_k·fn(x[window k], span_k) / Σ_k w_k along `dim` (see the module docstring); fn keeps the shape.
    With `first`, the window whose centre is nearest that position runs before the others (in order)."""
    length = x.shape[dim]
    out = torch.zeros_like(x)
    total = torch.zeros(length, dtype=x.dtype, device=x.device)
    view = [1] * x.ndim
    spans = window_spans(length, window, overlap)
    if first is not None:
        spans.insert(0, spans.pop(middle_window(spans, first)))
    for start, end in spans:
        piece = fn(x.narrow(dim, start, end - start), (start, end))
        if piece.shape != x.narrow(dim, start, end - start).shape:
            raise ValueError(f"fuse_windows: fn changed the window's shape to {tuple(piece.shape)}")
        w = window_weights(end - start, weighting).to(x)
        view[dim] = end - start
        out.narrow(dim, start, end - start).add_(piece * w.view(view))
        total[start:end] += w
    view[dim] = length
    return out / total.view(view)
