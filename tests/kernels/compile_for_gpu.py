"""Compile every Triton kernel for an H100 (sm_90) on a machine without a GPU, down to a cubin.

The interpreter accepts code the GPU compiler rejects (types that differ between branches, unsupported
constructs), so this catches what the CPU tests cannot. Run it in a process without TRITON_INTERPRET:

    python tests/kernels/compile_for_gpu.py            # first autotuning config of every kernel variant
    python tests/kernels/compile_for_gpu.py --all      # every autotuning config

Prints one line per kernel with its shared memory, and exits 1 if any compile fails. Uses
``triton.compiler.ASTSource`` and ``GPUTarget`` (public in triton 3.x, not a stable API).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

FLOATS = {"qk_scale", "sm_scale", "weight", "eps"}
POINTER_DTYPES = {"LSE": "fp32", "LSEA": "fp32", "DELTA": "fp32", "DELTAA": "fp32", "KPM": "u8", "CU_Q": "i32",
                  "CU_K": "i32", "RSTD": "fp32", "DW_PART": "fp32", "DKA": "fp32", "DVA": "fp32", "DS": "fp32",
                  "DT": "fp32"}


def compile_kernel(kernel, dtype: str, constexprs: dict, num_warps: int, num_stages: int) -> int:
    """Compile for sm_90; returns the shared memory in bytes. Pointer args are upper case in our kernels."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel.fn if hasattr(kernel, "configs") else kernel  # unwrap @triton.autotune
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in FLOATS:
            signature[name] = "fp32"
        elif name.isupper():
            signature[name] = "*" + POINTER_DTYPES.get(name, dtype)
        else:
            signature[name] = "i32"
    compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    return compiled.metadata.shared


def variants(all_configs: bool):
    """(name, kernel, dtype, constexprs, warps, stages) for every kernel variant we launch."""
    from kernels import flash_attention as fa
    from kernels import guidance as ga
    from kernels import norms

    attention = [(fa._attn_fwd, dict(IS_VARLEN=v, HAS_KPM=m)) for v, m in ((False, False), (True, False), (False, True))]
    attention += [(k, dict(IS_VARLEN=v, HAS_KPM=m)) for k in (fa._attn_bwd_dq, fa._attn_bwd_dkdv)
                  for v, m in ((True, False), (False, True))]
    attention += [(ga._guided_fwd, dict(BLEND=b, SAVE_ANCHOR=b)) for b in (True, False)]
    attention += [(k, dict(BLEND=b)) for k in (ga._guided_bwd_dq, ga._guided_bwd_dkdv) for b in (True, False)]
    for dtype, head_dim in (("bf16", 128), ("fp16", 96)):  # 96: head dim padded to a 128 tile
        for kernel, flags in attention:
            configs = kernel.configs if all_configs else kernel.configs[:1]
            for c in configs:
                block_d = 1 << (head_dim - 1).bit_length()
                yield (f"{kernel.fn.__name__} {dtype} D={head_dim} {flags} {c.kwargs}", kernel, dtype,
                       dict(HEAD_DIM=head_dim, BLOCK_D=block_d, **flags, **c.kwargs), c.num_warps, c.num_stages)
    for dtype in ("bf16", "fp32"):
        common = dict(HAS_W=True, HAS_S=True, HAS_T=True, ROWS=16, BLOCK_C=8192)
        yield f"_rms_norm_fwd {dtype}", norms._rms_norm_fwd, dtype, common, 8, 1
        yield (f"_rms_norm_bwd {dtype}", norms._rms_norm_bwd, dtype, dict(common, S_PER_ROW=False, T_PER_ROW=True),
               8, 1)


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_for_gpu: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
        return 2
    failures = 0
    for name, kernel, dtype, constexprs, warps, stages in variants("--all" in sys.argv):
        try:
            shared = compile_kernel(kernel, dtype, constexprs, warps, stages)
            print(f"ok    {name} warps={warps} stages={stages}: {shared // 1024} KiB shared", flush=True)
        except Exception as exc:  # report every kernel, then fail
            failures += 1
            print(f"FAIL  {name}: {type(exc).__name__}: {exc}", flush=True)
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
