"""Attention benchmark: our Triton kernels against torch SDPA and FlexAttention, in one run, on one GPU.

    python experiments/benchmarks/attention.py                      # head dims 64, 128; N = 1K … 32K; bf16
    python experiments/benchmarks/attention.py --head-dims 128 --seqlens 4096 8192
    python experiments/benchmarks/attention.py --smoke              # CPU: tiny sizes through the Triton interpreter

Variants (non-causal; B·N = --tokens tokens per step, H·D = 2048 as in the FlashAttention-3 plots; bf16 by default):
- dense:  q, k, v [B, H, N, D].  Ours: kernels.attention(backend="triton"). Flex: no mask.
- packed: the B·N tokens as one pack of documents of uneven lengths (N/2 + 37, N/4, the rest of each N).
  Ours: kernels.varlen_attention. Flex: the document block mask. SDPA: one call per document.
- guided / guided-concat: AVID middle-frame guidance, 16 frames of S = N/16 tokens and a cached anchor frame
  of S tokens. Ours: kernels.guided_attention. Flex: own-frame block mask (+ a second, unmasked call on the
  anchor and the blend; or for concat one call over [K; K_a] with the equivalent mask). SDPA: 4-D maskless
  calls, frames folded into the batch (kernels.reference.sdpa_guided_attention, what backend="torch" runs).

SDPA runs in several rows per variant: "sdpa" = its own choice (the default backend is recorded in the JSON),
and with its backend pinned by `torch.nn.attention.sdpa_kernel`: "sdpa-cudnn" (cuDNN attention) and
"sdpa-flash" (FlashAttention-2) on CUDA; "sdpa-flash" and "sdpa-math" on the CPU smoke run. A pinned backend that
cannot take the inputs fails its row (printed) without stopping the others. The dense check compares ours with
the fastest SDPA row: kernels.attention's backend="auto" stays SDPA (kernels.runtime.AUTO_ON_CUDA) unless
ours wins there.

FLOPs count the useful work only (4·Σ Lq·Lk·D per head fwd; fwd+bwd = 3.5 × fwd), the same for every
implementation of a variant, so TFLOP/s ratios are speed ratios. Prints a table and writes JSON with the
device name to experiments/benchmarks/results/. Without CUDA (and without --smoke) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
FRAMES = 16
GUIDANCE_WEIGHT = 0.4
TARGETS = {"dense": ("sdpa", 0.9), "packed": ("flex", 1.3), "guided": ("flex", 1.3), "guided-concat": ("flex", 1.3)}
# SDPA rows with a pinned backend: (row suffix, torch.nn.attention.SDPBackend member name).
SDPA_PINS = {"cuda": [("cudnn", "CUDNN_ATTENTION"), ("flash", "FLASH_ATTENTION")],
             "cpu": [("flash", "FLASH_ATTENTION"), ("math", "MATH")]}


@dataclass
class Row:
    variant: str
    head_dim: int
    seqlen: int
    batch: int
    heads: int
    impl: str
    fwd_ms: float | None
    fwd_tflops: float | None
    fwdbwd_ms: float | None
    fwdbwd_tflops: float | None
    max_abs_err: float | None  # forward output against ours


@dataclass
class Case:
    """One variant at one size: its inputs, useful fwd FLOPs, and a forward function per implementation."""

    variant: str
    flops: float
    inputs: list  # tensors that receive gradients
    impls: dict[str, Callable[[], object]]
    backward: set[str]  # implementations whose backward runs here

    def pin_sdpa(self, device_type: str) -> None:
        """Add a row per pinned SDPA backend (see the module docstring), running the "sdpa" implementation
        inside `sdpa_kernel([backend])`: a backend that cannot run the inputs raises instead of falling back."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def pinned(fn: Callable[[], object], backend: SDPBackend) -> Callable[[], object]:
            def run() -> object:
                with sdpa_kernel([backend]):
                    return fn()  # the backward node is the pinned kernel's, so fwd+bwd times it too
            return run

        for suffix, member in SDPA_PINS[device_type]:
            name = f"sdpa-{suffix}"
            self.impls[name] = pinned(self.impls["sdpa"], getattr(SDPBackend, member))
            self.backward.add(name)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--tokens", type=int, default=32768, help="B·N per step (B = tokens // N, at least 1)")
    p.add_argument("--variants", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON results")
    p.add_argument("--smoke", action="store_true",
                   help="CPU check of the code path: tiny sizes, Triton interpreter, float32, one timing each")
    return p.parse_args(argv)


def build_case(variant: str, batch: int, heads: int, seqlen: int, head_dim: int, dtype, device: str,
               smoke: bool) -> Case:
    """Inputs and implementations of one variant (imports here: TRITON_INTERPRET must be set before)."""
    import torch
    import torch.nn.functional as F
    from einops import rearrange
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import kernels
    from kernels.reference import sdpa_guided_attention

    # One compiled graph per shape x grad mode x mask: the default recompile limit (8) is hit within one head dim,
    # after which dynamo falls back to the unfused kernel that materialises N x N scores (out of memory).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    compiled = flex_attention if smoke else torch.compile(flex_attention, dynamic=False)

    def flex(*tensors, **kw):  # FlexAttention refuses CPU inputs that require grad (no CPU backward)
        return compiled(*(t.detach() if smoke else t for t in tensors), **kw)

    def block_mask(mask_mod, q_len: int, kv_len: int):
        """Same mask for every sample and head; compiled creation avoids a dense q_len × kv_len mask on GPU."""
        return create_block_mask(mask_mod, None, None, q_len, kv_len, device=device, _compile=not smoke)

    rand = lambda *shape: torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
    tau = 1.0 / math.sqrt(head_dim)

    if variant == "dense":
        q, k, v = (rand(batch, heads, seqlen, head_dim) for _ in range(3))
        return Case(variant, 4.0 * batch * heads * seqlen * seqlen * head_dim, [q, k, v], {
            "ours": lambda: kernels.attention(q, k, v, backend="triton"),
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
            "flex": lambda: flex(q, k, v),
        }, {"ours", "sdpa", "flex"})

    if variant == "packed":
        pattern = [seqlen // 2 + min(37, seqlen // 8), seqlen // 4]
        lengths = [n for _ in range(batch) for n in (*pattern, seqlen - sum(pattern))]
        total = sum(lengths)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device, dtype=torch.int32)
        doc = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                      torch.tensor(lengths, device=device))
        mask = block_mask(lambda b, h, qi, ki: doc[qi] == doc[ki], total, total)
        q, k, v = (rand(total, heads, head_dim) for _ in range(3))
        bounds = cu.tolist()

        def sdpa_loop():  # 4-D [1, H, L, D] per document: SDPA's fused backends refuse 3-D inputs
            outs = [F.scaled_dot_product_attention(*(rearrange(t[a:b], "t h d -> 1 h t d") for t in (q, k, v)))
                    for a, b in zip(bounds[:-1], bounds[1:])]
            return rearrange(torch.cat(outs, dim=2), "1 h t d -> t h d")

        as_bhld = lambda t: rearrange(t, "t h d -> 1 h t d")
        return Case(variant, sum(4.0 * heads * n * n * head_dim for n in lengths), [q, k, v], {
            "ours": lambda: kernels.varlen_attention(q, k, v, cu, cu, max_seqlen_q=max(lengths),
                                                     max_seqlen_k=max(lengths), backend="triton"),
            "sdpa": sdpa_loop,
            "flex": lambda: rearrange(flex(as_bhld(q), as_bhld(k), as_bhld(v), block_mask=mask), "1 h t d -> t h d"),
        }, {"ours", "sdpa", "flex"})

    # guided, guided-concat: frame-major clip of FRAMES frames and an anchor frame of the same size
    frame_len = max(16, seqlen // FRAMES)
    length = frame_len * (seqlen // frame_len)
    q, k, v = (rand(batch, heads, length, head_dim) for _ in range(3))
    ka, va = (rand(batch, heads, frame_len, head_dim) for _ in range(2))
    frame_of = lambda i: i // frame_len
    mode = "concat" if variant == "guided-concat" else "blend"
    flops = 4.0 * batch * heads * length * 2 * frame_len * head_dim
    ours = lambda: kernels.guided_attention(q, k, v, ka, va, frame_len=frame_len, weight=GUIDANCE_WEIGHT,
                                            mode=mode, backend="triton")
    sdpa = lambda: sdpa_guided_attention(q, k, v, ka, va, frame_len, GUIDANCE_WEIGHT, mode, None, tau)
    if mode == "blend":
        own = block_mask(lambda b, h, qi, ki: frame_of(qi) == frame_of(ki), length, length)

        def flex_guided():
            w = GUIDANCE_WEIGHT
            return (1 - w) * flex(q, k, v, block_mask=own) + w * flex(q, ka, va)
    else:
        both = block_mask(lambda b, h, qi, ki: (ki >= length) | (frame_of(qi) == frame_of(ki)), length,
                          length + frame_len)
        k_cat, v_cat = torch.cat([k, ka], 2), torch.cat([v, va], 2)

        def flex_guided():
            return flex(q, k_cat, v_cat, block_mask=both)
    return Case(variant, flops, [q, k, v, ka, va], {"ours": ours, "sdpa": sdpa, "flex": flex_guided},
                {"ours", "sdpa", "flex"})


def timer(smoke: bool) -> Callable[[Callable[[], object], list], float]:
    """Median milliseconds of fn: triton's do_bench on the GPU, a single wall-clock call in smoke mode."""
    if smoke:
        def once(fn, grads):
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        return once
    import triton.testing

    return lambda fn, grads: triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grads,
                                                     return_mode="median")


def run_case(case: Case, smoke: bool, meta: dict) -> list[Row]:
    import torch

    time_ms = timer(smoke)
    with torch.no_grad():
        reference = case.impls["ours"]().float()
    rows = []
    for impl, fn in case.impls.items():
        try:
            with torch.no_grad():
                out = fn()
                err = (out.float() - reference).abs().max().item()
                fwd = time_ms(fn, None)
            fwdbwd = None
            # FlexAttention has no CPU backward: the smoke run times its forward only.
            if impl in case.backward and not (smoke and impl == "flex"):
                dout = torch.randn_like(reference).to(out.dtype)
                fwdbwd = time_ms(lambda fn=fn, dout=dout: fn().backward(dout), case.inputs)
        except Exception as exc:  # one failing baseline must not hide the others
            print(f"  {case.variant} {impl} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            fwd = fwdbwd = err = None
        tflops = lambda ms, factor: None if ms is None else factor * case.flops / (ms * 1e-3) / 1e12
        rows.append(Row(case.variant, meta["head_dim"], meta["seqlen"], meta["batch"], meta["heads"], impl, fwd,
                        tflops(fwd, 1.0), fwdbwd, tflops(fwdbwd, 3.5), err))
    return rows


def targets(rows: list[Row]) -> list[dict]:
    """Ours ÷ baseline TFLOP/s per size, against the issue's targets (dense ≥ 0.9 SDPA, others ≥ 1.3 Flex)."""
    found = []
    for row in rows:
        if row.impl != "ours":
            continue
        family, target = TARGETS[row.variant]
        bases = [r for r in rows if (r.impl == family or r.impl.startswith(family + "-")) and
                 (r.variant, r.head_dim, r.seqlen) == (row.variant, row.head_dim, row.seqlen)]
        for phase in ("fwd", "fwdbwd"):
            # the fastest member of the baseline family (e.g. SDPA with cuDNN or with flash pinned)
            timed = [b for b in bases if getattr(b, f"{phase}_tflops")]
            base = max(timed, key=lambda b: getattr(b, f"{phase}_tflops"), default=None)
            ours, theirs = getattr(row, f"{phase}_tflops"), getattr(base, f"{phase}_tflops") if base else None
            ratio = ours / theirs if ours and theirs else None
            found.append({"variant": row.variant, "head_dim": row.head_dim, "seqlen": row.seqlen, "phase": phase,
                          "baseline": base.impl if base else family, "ratio": ratio, "target": target,
                          "met": None if ratio is None else ratio >= target})
    return found


def dense_verdict(checks: list[dict]) -> str | None:
    """What the dense rows say about kernels.runtime.AUTO_ON_CUDA["attention"] (None without dense checks)."""
    ratios = [c["ratio"] for c in checks if c["variant"] == "dense"]
    if not ratios:
        return None
    if all(r is not None and r > 1.0 for r in ratios):
        return ("ours beats the fastest SDPA backend at every dense size and phase: dense backend='auto' could "
                "move to Triton (kernels.runtime.AUTO_ON_CUDA['attention'] = 'triton')")
    return "SDPA is faster (or as fast) somewhere: dense backend='auto' stays SDPA"


def print_table(rows: list[Row], checks: list[dict]) -> None:
    cell = lambda x, width, spec: f"{'-':>{width}}" if x is None else f"{x:>{width}{spec}}"
    print(f"{'variant':<14}{'D':>5}{'N':>7}{'B':>4}{'H':>4}  {'impl':<11}{'fwd ms':>10}{'TFLOP/s':>9}"
          f"{'f+b ms':>10}{'TFLOP/s':>9}{'max err':>10}")
    for r in rows:
        print(f"{r.variant:<14}{r.head_dim:>5}{r.seqlen:>7}{r.batch:>4}{r.heads:>4}  {r.impl:<11}"
              f"{cell(r.fwd_ms, 10, '.3f')}{cell(r.fwd_tflops, 9, '.1f')}{cell(r.fwdbwd_ms, 10, '.3f')}"
              f"{cell(r.fwdbwd_tflops, 9, '.1f')}{cell(r.max_abs_err, 10, '.2e')}")
    if not checks:
        print("\n(smoke run: timings of the interpreter and of eager CPU code, no targets checked)")
        return
    print("\ntargets (ours / baseline TFLOP/s):")
    for c in checks:
        verdict = {True: "met", False: "NOT met", None: "n/a"}[c["met"]]
        print(f"  {c['variant']:<14} D={c['head_dim']:<4} N={c['seqlen']:<6} {c['phase']:<7} vs {c['baseline']:<10}"
              f" {cell(c['ratio'], 6, '.2f')}x (target {c['target']}x): {verdict}")
    if dense_verdict(checks):
        print(f"\ndense attention: {dense_verdict(checks)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels (and its @triton.jit) is imported
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch
    import triton

    if args.smoke:
        device, dtype, device_name = "cpu", torch.float32, f"cpu ({platform.processor() or platform.machine()})"
        head_dims, seqlens, tokens, heads_of = [32], [64], 64, lambda d: 2
    else:
        if not torch.cuda.is_available():
            print("attention benchmark: no CUDA device found, nothing measured. It needs a GPU; "
                  "`--smoke` checks the code path on CPU through the Triton interpreter.")
            return 0
        device, dtype, device_name = "cuda", getattr(torch, args.dtype), torch.cuda.get_device_name()
        head_dims, seqlens, tokens, heads_of = args.head_dims, args.seqlens, args.tokens, lambda d: max(1, 2048 // d)

    import kernels

    if args.smoke and not kernels.INTERPRETING:
        print("attention benchmark --smoke: kernels were imported without TRITON_INTERPRET=1", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    rows: list[Row] = []
    sdpa_backend = None
    for head_dim in head_dims:
        for seqlen in seqlens:
            batch, heads = max(1, tokens // seqlen), heads_of(head_dim)
            meta = dict(head_dim=head_dim, seqlen=seqlen, batch=batch, heads=heads)
            for variant in args.variants:
                case = build_case(variant, batch, heads, seqlen, head_dim, dtype, device, args.smoke)
                case.pin_sdpa(device)
                if variant == "dense" and sdpa_backend is None:
                    sdpa_backend = sdpa_backend_name(*case.inputs)
                rows.extend(run_case(case, args.smoke, meta))
                print(f"done: {variant} D={head_dim} N={seqlen}", file=sys.stderr, flush=True)
                del case
                if device == "cuda":
                    torch.cuda.empty_cache()
    checks = [] if args.smoke else targets(rows)
    print_table(rows, checks)
    result = {"device": device_name, "smoke": args.smoke, "dtype": str(dtype).removeprefix("torch."),
              "torch": torch.__version__, "triton": triton.__version__, "sdpa_default_backend": sdpa_backend,
              "tokens_per_step": tokens, "frames": FRAMES, "guidance_weight": GUIDANCE_WEIGHT,
              "flops": "fwd = 4·Σ Lq·Lk·D·H (useful work only); fwd+bwd = 3.5 × fwd",
              "sdpa_pins": [f"sdpa-{suffix}: {member}" for suffix, member in SDPA_PINS[device]],
              "rows": [asdict(r) for r in rows], "targets": checks, "dense_verdict": dense_verdict(checks)}
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower()
    path = args.out / f"attention_{slug}{'_smoke' if args.smoke else ''}_{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")
    return 0


def sdpa_backend_name(q, k, v, *_) -> str:
    """The backend SDPA picks by default for these inputs (private torch API; 'unknown' if it moves)."""
    import torch
    from torch.nn.attention import SDPBackend

    try:
        choice = torch._fused_sdp_choice(q, k, v)
    except (AttributeError, RuntimeError):
        return "unknown"
    names = {int(member.value): name for name, member in SDPBackend.__members__.items()}
    return names.get(int(choice), "unknown")


if __name__ == "__main__":
    sys.exit(main())
