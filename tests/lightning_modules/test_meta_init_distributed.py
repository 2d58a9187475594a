"""Paper scale without the memory, on 2 gloo processes: a DiT built on the meta device, checkpointed and sharded
with FSDP2, then materialised per shard (lightning_modules/parallel.py) holds about half of its parameter bytes
on each rank, never allocates the whole model while building, is initialised like a normal build, and trains.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import psutil
import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from lightning_modules.nn.dit import DiT
from lightning_modules.parallel import ParallelConfig, apply_parallelism, local_parameter_bytes, materialise
from tests.helpers import spawn_gloo

# ~12.7M parameters, 51 MB in fp32: large against the noise of a process's resident memory (a few MB).
DIT = dict(in_channels=4, dim=384, depth=4, heads=4, ffn_dim=1536, max_t=2, max_h=4, max_w=4, qk_norm=True,
           fps_embedding=True, cond_channels=2)
STEPS = 6


class Holder(nn.Module):
    """Stands in for the LightningModule: a network built on meta next to a buffer built as usual."""

    def __init__(self, net: DiT) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("latent_std", torch.full((1, net.in_channels, 1, 1, 1), 2.0))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.net(x / self.latent_std, t, context, cond=cond)


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _reset_peak_rss() -> None:
    """Start the process's resident-memory high-water mark (VmHWM) again from now (Linux >= 4.0). Not
    getrusage's ru_maxrss: a spawned process inherits its parent's (the pytest process's) peak through exec."""
    Path("/proc/self/clear_refs").write_text("5")


def _peak_rss() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def _build_sharded(mesh, config: dict) -> tuple[Holder, object]:
    with torch.device("meta"):
        net = DiT(**config)
    root = Holder(net)
    apply_parallelism(root, list(net.blocks), mesh, ParallelConfig(activation_checkpointing=True))
    return root, materialise(root, "cpu", mesh)


def _worker(rank: int, out_dir: str) -> None:
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)  # as seed_everything: the same seed on every rank
    # The first build imports and sets up ~30 MB of code and caches (DTensor ops, FSDP): do it on a tiny model
    # so that the measurement below sees the model's memory only.
    _build_sharded(mesh, dict(DIT, dim=32, ffn_dim=64, depth=2))

    _reset_peak_rss()
    rss_before = _rss()
    root, report = _build_sharded(mesh, DIT)
    # The resident-memory high-water mark during the build over the resident memory just before it: what the
    # build held at its peak (plus any noise of the process, so an upper bound).
    build_peak_growth = _peak_rss() - rss_before
    # The same measure around a normal build (not sharded), for comparison: it allocates the whole model.
    _reset_peak_rss()
    rss_before = _rss()
    normal = DiT(**DIT)
    normal_build_peak_growth = _peak_rss() - rss_before
    del normal

    full = {name: p.full_tensor() for name, p in root.named_parameters()}  # collective: every rank takes part
    g = torch.Generator().manual_seed(1)
    x, target = torch.randn(2, 4, 2, 8, 8, generator=g), torch.randn(2, 4, 2, 8, 8, generator=g)
    t, context = torch.rand(2, generator=g), torch.randn(2, 5, DIT["dim"], generator=g)
    cond = torch.randn(2, DIT["cond_channels"], 2, 8, 8, generator=g)
    optimizer = torch.optim.AdamW(root.parameters(), lr=1e-3)
    losses = []
    for _ in range(STEPS):
        loss = nn.functional.mse_loss(root(x, t, context, cond), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    if rank == 0:
        stats = {name: {"zero": bool((v == 0).all()), "one": bool((v == 1).all()), "std": v.std().item(),
                        "halves_equal": bool(v.shape[0] > 1 and torch.equal(v[: v.shape[0] // 2], v[v.shape[0] // 2: 2 * (v.shape[0] // 2)]))}
                 for name, v in full.items()}
    else:
        stats = {}
    result = {
        "local_param_bytes": local_parameter_bytes(root),
        "full_param_bytes": sum(v.numel() * v.element_size() for v in full.values()),
        "materialised_local_bytes": report.local_bytes,
        "build_peak_growth": build_peak_growth,
        "normal_build_peak_growth": normal_build_peak_growth,
        "latent_std": root.latent_std.flatten().tolist(),
        "condition_weights_zero": bool((full["net.patchify.weight"][:, DIT["in_channels"]:] == 0).all()),
        "latent_weights_zero": bool((full["net.patchify.weight"][:, : DIT["in_channels"]] == 0).all()),
        "losses": losses,
        "stats": stats,
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("meta_init")
    spawn_gloo(_worker, 2, str(out))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_each_rank_holds_half_the_parameters_and_never_the_whole_model(results: list[dict]) -> None:
    for r in results:
        full = r["full_param_bytes"]
        print(f"local {r['local_param_bytes'] / 2**20:.1f} MiB of {full / 2**20:.1f} MiB "
              f"({r['local_param_bytes'] / full:.3f}); build peak growth {r['build_peak_growth'] / 2**20:.1f} MiB "
              f"({r['build_peak_growth'] / full:.2f} of the full model; a normal build: "
              f"{r['normal_build_peak_growth'] / full:.2f})")
        assert 0.45 <= r["local_param_bytes"] / full <= 0.6
        assert r["materialised_local_bytes"] <= 0.6 * full
        # a normal build allocates the whole model (and more, for the init); this one about half of it
        assert r["build_peak_growth"] < 0.75 * full
        assert r["normal_build_peak_growth"] > 0.85 * full


def test_shards_are_initialised_like_a_normal_build_and_differ_between_ranks(results: list[dict]) -> None:
    stats = results[0]["stats"]
    zero = {n for n, s in stats.items() if s["zero"]}
    expected_zero = {"net.patchify.bias", "net.modulation.1.weight", "net.modulation.1.bias",
                     "net.modulation_out.1.weight", "net.modulation_out.1.bias", "net.proj_out.weight",
                     "net.proj_out.bias", "net.time.mlp.0.bias", "net.time.mlp.2.bias", "net.fps.mlp.0.bias",
                     "net.fps.mlp.2.weight", "net.fps.mlp.2.bias",
                     *(f"net.blocks.{i}._checkpoint_wrapped_module.modulation" for i in range(DIT["depth"]))}
    assert zero == expected_zero
    ones = {n for n, s in stats.items() if s["one"]}
    assert ones == {n for n in stats if n.endswith(("norm1.weight", "norm2.weight", "norm3.weight", "norm_out.weight",
                                                    "q_norm", "k_norm"))}
    assert results[0]["condition_weights_zero"] and not results[0]["latent_weights_zero"]
    for axis in "thw":
        assert stats[f"net.pos.{axis}"]["std"] == pytest.approx(0.02, rel=0.1)
    dim, ffn = DIT["dim"], DIT["ffn_dim"]
    w1 = stats["net.blocks.0._checkpoint_wrapped_module.ffn.w1.weight"]
    assert w1["std"] == pytest.approx((2 / (dim + ffn)) ** 0.5, rel=0.05)  # Xavier-uniform
    # each rank drew its own numbers (on CPU DTensor would give both shards the same ones)
    assert not any(s["halves_equal"] for n, s in stats.items() if not s["zero"] and s["std"] > 0)
    assert results[0]["latent_std"] == results[1]["latent_std"] == [2.0] * DIT["in_channels"]


def test_the_materialised_model_trains(results: list[dict]) -> None:
    losses = results[0]["losses"]
    assert results[1]["losses"] == pytest.approx(losses)
    assert losses[-1] < 0.9 * losses[0], losses
