"""Paper scale without the hardware: a model config on the meta device, its size, tokens, FLOPs and memory.

    python experiments/plan.py model=moviegen_30b num_gpus=6144
    python experiments/plan.py model=moviegen_30b num_gpus=512 seconds=16 fps=16 height=768 width=768 batch=512
    python experiments/plan.py model=moviegen_tiny num_gpus=1 seconds=1 fps=8 height=32 width=32 json=plan.json

Plan keys (the rest are Hydra overrides of conf/train.yaml): num_gpus (world size = dp x tp x cp), seconds, fps,
height, width (the clip), batch (global batch per step; default one clip per data-parallel rank), micro_batch
(clips per GPU at once), tp (tensor-parallel degree), cp (context-parallel degree: GPUs sharing one clip's
sequence), dtype (bf16: bf16 compute with fp32 master weights; fp32: everything fp32, as on CPU),
checkpointing (activation checkpointing per block, default true), gpu_memory_gb (80), peak_tflops (989, H100
bf16 dense), mfu (0.4, to turn FLOPs into a step time), json (write the numbers to a file).

Counting (per clip; N video tokens, N_c text tokens, L blocks, width d, SwiGLU width f):
    forward FLOPs  = 2·N·P_token + 2·N_c·P_text + L·(4·N²·d + 4·N·N_c·d)
        P_token: parameters applied to every video token (self-attn 4d², cross-attn Q/O 2d², SwiGLU 3df per
        block, patchify, output); P_text: cross-attn K/V (2d² per block) and the text projections;
        the attention terms are QKᵀ and AV of full self-attention and of cross-attention
    training FLOPs = 3 × forward (forward + backward); with activation checkpointing the hardware runs one more
                     forward: 4 × forward
Memory per GPU, as `lightning_modules/model_parallel.py` runs it: dp = num_gpus / (tp·cp) ranks shard the
parameters with FSDP (the cp ranks hold replicas); in each block tensor parallelism splits S parameters (Q, K,
V, O of both attentions, SwiGLU) over tp and replicates the R others (norms, modulation); a = bytes of an
activation (2 for bf16, 4 for fp32), w = bytes of a gathered weight (the same):
    sharded states   = 16 bytes · (L·(S/tp + R) + P_rest) / dp     (fp32 weights, gradients, Adam m and v)
    gathered weights = (2·w + 4) · (S/tp + R)      (current + prefetched block; fp32 block gradients)
    checkpoints      = a · L · micro_batch · N·d / (cp·tp)         (block inputs, sequence-parallel)
    block activations= a · micro_batch · (N/cp) · (10·d/tp + 3·d + (6·d + 4·f)/tp)       (one block, recomputed in
                       the backward; with cp > 1 two of the 6·d, the keys and values, are all-gathered: N, not N/cp)
        what this DiT's block saves for the backward per token, counted with saved-tensor hooks on CPU (fp32,
        PyTorch SDPA): 19·d + 4·f. Of it, 3·d are the all-gathered inputs of the three tensor-parallel sub-layers,
        6·d + 4·f the tensors split by heads or hidden units (Q, K, V, attention outputs; SwiGLU's four), and
        10·d the per-token rest (norms, adaLN, residuals) on this rank's 1/(cp·tp) of the sequence
    without checkpointing every block's activations are kept: L x block activations, no checkpoints
Communication per GPU per step (bytes sent, ring collectives: a group of k moves (k−1)/k of the tensor):
    FSDP  = (dp−1)/dp · (2·w + 4) · P_local·dp      all-gather forward and backward, reduce-scatter fp32 grads
    TP    = (tp−1)/tp · 3 sub-layers · 2 (all-gather + reduce-scatter) · (2 + recompute) passes · a·micro·N/cp·d·L
    CP    = (cp−1)/cp · 2 (K, V) · (2 + recompute) passes · a·micro·N·d/tp·L
The text encoders and the TAE are not counted (the paper precomputes latents; encoders are frozen, replicated
or FSDP-sharded on their own).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

PLAN_KEYS = {"num_gpus": 8, "seconds": 16.0, "fps": 16.0, "height": 768, "width": 768, "batch": None,
             "micro_batch": 1, "tp": 1, "cp": 1, "dtype": "bf16", "checkpointing": "true", "gpu_memory_gb": 80.0,
             "peak_tflops": 989.0, "mfu": 0.4, "json": None}
STRING_KEYS = ("json", "dtype", "checkpointing")


def split_args(argv: list[str]) -> tuple[dict, list[str]]:
    """(plan options, Hydra overrides) from `key=value` arguments."""
    plan, overrides = dict(PLAN_KEYS), []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in PLAN_KEYS:
            default = PLAN_KEYS[key]
            plan[key] = value if default is None or key in STRING_KEYS else type(default)(float(value) if isinstance(default, int) and "." in value else value)
            if key == "batch":
                plan[key] = int(value)
        else:
            overrides.append(arg)
    return plan, overrides


def meta_modules(cfg: DictConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(DiT, codec) of `cfg.model` built on the meta device (no memory, no checkpoint loading)."""
    with torch.device("meta"):
        net = hydra.utils.instantiate(cfg.model.net)
        codec_cfg = cfg.model.codec
        if "net" in codec_cfg:  # a TAE codec: its network alone gives the latent shape
            codec = hydra.utils.instantiate(codec_cfg.net)
        else:
            codec = hydra.utils.instantiate(codec_cfg)
    return net, codec


def latent_grid(codec: torch.nn.Module, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(C, T', H', W') of a clip in the codec's latent space."""
    if hasattr(codec, "latent_shape") and not hasattr(codec, "num_latent_frames"):
        return codec.latent_shape(frames, height, width)
    return tuple(codec.latent_shape((1, 3, frames, height, width))[1:])


def parameter_breakdown(net: torch.nn.Module) -> dict[str, int]:
    count = lambda m: sum(p.numel() for p in m.parameters())
    block = net.blocks[0]
    per_block = {"self_attention": count(block.attn), "cross_attention": count(block.cross),
                 "swiglu": count(block.ffn), "norms_and_modulation": count(block) - count(block.attn)
                 - count(block.cross) - count(block.ffn)}
    total = count(net)
    blocks = sum(count(b) for b in net.blocks)
    return {"total": total, "blocks": blocks, "per_block": count(block), **{f"block_{k}": v for k, v in per_block.items()},
            "embeddings_and_heads": total - blocks}


def tensor_parallel_split(net: torch.nn.Module) -> tuple[int, int]:
    """(S, R) of one block: parameters tensor parallelism splits (the projections of both attentions and
    SwiGLU, `model_parallel._block_plan`) and the ones it replicates (norms, QK-norms, modulation)."""
    block = net.blocks[0]
    layers = [getattr(a, n) for a in (block.attn, block.cross) for n in ("to_q", "to_k", "to_v", "to_out")]
    layers += [block.ffn.w1, block.ffn.w2, block.ffn.w3]
    split = sum(p.numel() for layer in layers for p in layer.parameters())
    return split, sum(p.numel() for p in block.parameters()) - split


def memory_and_communication(params: dict, split: tuple[int, int], text_params: int, n: int, d: int, f: int,
                             layers: int, micro: int, num_gpus: int, tp: int, cp: int, dtype: str = "bf16",
                             checkpointing: bool = True) -> dict:
    """Bytes per GPU (memory) and bytes sent per GPU per step (communication); the formulas are in the module
    docstring."""
    if num_gpus % (tp * cp):
        raise ValueError(f"num_gpus={num_gpus} is not a multiple of tp x cp = {tp * cp}")
    a = w = {"bf16": 2, "fp32": 4}[dtype]
    dp = num_gpus // (tp * cp)
    s, r = split
    per_block = s / tp + r
    local_params = (layers * per_block + params["total"] - layers * (s + r) + text_params) / dp
    states = 16 * local_params
    gathered = (2 * w + 4) * per_block if dp > 1 else 0.0  # one rank: FSDP gathers nothing
    block = a * micro * (n / cp) * (10 * d / tp + 3 * d + (6 * d + 4 * f) / tp)
    if cp > 1:  # the keys and values attention keeps are the whole sequence's
        block += a * micro * 2 * d / tp * (n - n / cp)
    if checkpointing:
        checkpoints, activations = a * layers * micro * n * d / (cp * tp), block
    else:
        checkpoints, activations = 0.0, layers * block
    passes = 3 if checkpointing else 2
    comm = {"fsdp": (dp - 1) / dp * (2 * w + 4) * local_params * dp,
            "tp": (tp - 1) / tp * 3 * 2 * passes * a * micro * n / cp * d * layers,
            "cp": (cp - 1) / cp * 2 * passes * a * micro * n * d / tp * layers}
    return {"dp": dp, "tp": tp, "cp": cp, "states": states, "gathered_weights": gathered,
            "checkpointed_block_inputs": checkpoints, "activations": activations,
            "total": states + gathered + checkpoints + activations, "communication": comm}


def text_context(cfg: DictConfig, dim: int) -> tuple[int, int]:
    """(text tokens N_c, text projection parameters) from the encoders' dims and lengths in the config."""
    tokens = params = 0
    for node in (cfg.model.conditioners.text.encoder.encoders or {}).values():
        if node is None:
            continue
        tokens += int(node.max_length)
        params += int(node.dim) * dim + dim + 2 * dim  # Linear + LayerNorm
    return tokens, params


def plan(cfg: DictConfig, options: dict) -> dict:
    net, codec = meta_modules(cfg)
    frames = max(1, round(options["seconds"] * options["fps"]))
    c, t, h, w = latent_grid(codec, frames, int(options["height"]), int(options["width"]))
    grid = net.grid((t, h, w))
    n = math.prod(grid)
    d, f, layers = net.dim, net.ffn_dim, net.depth
    n_text, text_params = text_context(cfg, d)
    params = parameter_breakdown(net)
    p_text_side = layers * 2 * d * d + text_params  # cross-attn K/V act on text tokens
    p_token = params["total"] - layers * 2 * d * d - sum(p.numel() for p in net.pos.parameters())
    forward = 2 * n * p_token + 2 * n_text * p_text_side + layers * (4 * n * n * d + 4 * n * n_text * d)
    gpus, micro, cp, tp = int(options["num_gpus"]), int(options["micro_batch"]), int(options["cp"]), int(options["tp"])
    batch = int(options["batch"] or max(1, gpus * micro // (cp * tp)))
    bytes_gb = 1024**3
    checkpointing = str(options["checkpointing"]).lower() in ("true", "1", "yes")
    mem = memory_and_communication(params, tensor_parallel_split(net), text_params, n, d, f, layers, micro, gpus, tp,
                                   cp, str(options["dtype"]), checkpointing)
    step_flops = 3 * forward * batch
    result = {
        "model": cfg.model.net._target_, "layers": layers, "width": d, "ffn": f, "heads": net.heads,
        "parameters": params, "text_projection_parameters": text_params,
        "clip": {"seconds": options["seconds"], "fps": options["fps"], "frames": frames, "height": options["height"],
                 "width": options["width"]},
        "latent": [c, t, h, w], "patch": list(net.patch), "token_grid": list(grid), "tokens": n, "text_tokens": n_text,
        "flops_per_clip": {"forward": forward, "training": 3 * forward, "training_with_checkpointing": 4 * forward,
                           "dense_6PN": 6 * params["total"] * n, "self_attention_12LN2d": 12 * layers * n * n * d},
        "step": {"global_batch": batch, "training_flops": step_flops,
                 "seconds_at_mfu": 4 * forward * batch / (gpus * options["peak_tflops"] * 1e12 * options["mfu"])},
        "memory_per_gpu_gb": {"num_gpus": gpus, "micro_batch": micro, "data_parallel": mem["dp"],
                              "tensor_parallel": tp, "context_parallel": cp, "dtype": options["dtype"],
                              "checkpointing": checkpointing,
                              "sharded_states": mem["states"] / bytes_gb, "gathered_weights": mem["gathered_weights"] / bytes_gb,
                              "checkpointed_block_inputs": mem["checkpointed_block_inputs"] / bytes_gb,
                              "one_block_activations": mem["activations"] / bytes_gb, "total": mem["total"] / bytes_gb,
                              "gpu_memory_gb": options["gpu_memory_gb"],
                              "fits": mem["total"] / bytes_gb <= options["gpu_memory_gb"]},
        "communication_per_gpu_gb": {k: v / bytes_gb for k, v in mem["communication"].items()},
    }
    return result


def human(count: float) -> str:
    """12345678 -> '12.35M'."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.3f}{unit}" if unit == "B" else f"{count / size:.2f}{unit}"
    return str(int(count))


def report(r: dict) -> str:
    p, m, fl = r["parameters"], r["memory_per_gpu_gb"], r["flops_per_clip"]
    lines = [
        f"model        {r['layers']} layers, width {r['width']}, FFN {r['ffn']}, {r['heads']} heads",
        f"parameters   {human(p['total'])} (blocks {human(p['blocks'])} = {r['layers']} x {human(p['per_block'])}: "
        f"self-attn {human(p['block_self_attention'])}, cross-attn {human(p['block_cross_attention'])}, "
        f"SwiGLU {human(p['block_swiglu'])}, norms+adaLN {human(p['block_norms_and_modulation'])}; "
        f"embeddings/heads {human(p['embeddings_and_heads'])}); text projections {human(r['text_projection_parameters'])}",
        f"clip         {r['clip']['seconds']:g} s at {r['clip']['fps']:g} fps = {r['clip']['frames']} frames of "
        f"{r['clip']['height']}x{r['clip']['width']} -> latent {'x'.join(map(str, r['latent']))} -> patch "
        f"{tuple(r['patch'])} -> {'x'.join(map(str, r['token_grid']))} = {r['tokens']:,} tokens (+ {r['text_tokens']} text)",
        f"FLOPs/clip   forward {fl['forward']:.3e}, training {fl['training']:.3e} (with activation checkpointing "
        f"{fl['training_with_checkpointing']:.3e}; 6PN {fl['dense_6PN']:.2e} + 12LN^2d {fl['self_attention_12LN2d']:.2e})",
        f"step         global batch {r['step']['global_batch']}: {r['step']['training_flops']:.3e} FLOPs; "
        f"~{r['step']['seconds_at_mfu']:.1f} s on {m['num_gpus']} GPUs at the given MFU",
        f"memory/GPU   {m['num_gpus']} GPUs = dp {m['data_parallel']} (FSDP) x tp {m['tensor_parallel']} x cp "
        f"{m['context_parallel']}, {m['dtype']}, {'' if m['checkpointing'] else 'no '}activation checkpointing, "
        f"micro-batch {m['micro_batch']}: states {m['sharded_states']:.2f} + gathered weights {m['gathered_weights']:.2f} + "
        f"checkpoints {m['checkpointed_block_inputs']:.2f} + activations {m['one_block_activations']:.2f} = "
        f"{m['total']:.2f} GiB ({'fits' if m['fits'] else 'does NOT fit'})",
        "comm/GPU     " + ", ".join(f"{k} {v:.2f}" for k, v in r["communication_per_gpu_gb"].items()) + " GiB sent per step",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> dict:
    from experiments.compose import compose_config

    options, overrides = split_args(argv)
    if not any(o.startswith("model=") for o in overrides):
        overrides.append("model=moviegen_30b")
    cfg = compose_config(overrides, Path(os.environ.get("OUTPUT_DIR", ROOT / "outputs")) / "plan")
    result = plan(cfg, options)
    print(report(result))
    if options["json"]:
        Path(options["json"]).write_text(json.dumps(result, indent=1, default=float))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
