"""A real Lightning `ModelParallelStrategy` (strategy=fsdp) fit of a module whose DiT is built on the meta device,
as experiments/runner.py builds it under `strategy.parallel.meta_init`. Lightning starts the second rank by
running this file again, so it is a script (run by tests/lightning_modules/test_meta_init_lightning.py):

    python tests/lightning_modules/fsdp_meta_init_run.py <output folder>

Each rank writes rank<k>.json: what it holds of the parameters, the losses, and the state of the model at
the start of fit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402
import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_modules.base import BaseModule  # noqa: E402
from lightning_modules.parallel import (  # noqa: E402
    ParallelConfig,
    local_parameter_bytes,
    meta_build_guard,
    meta_init_config,
)

DIT = dict(in_channels=4, dim=64, depth=2, heads=4, ffn_dim=128, max_t=2, max_h=4, max_w=4)
STEPS = 5


class Regression(BaseModule):
    """Fits the DiT's output to fixed targets; records what the model looks like when fit starts."""

    def __init__(self, net: nn.Module, optimizer, out_dir: str) -> None:
        super().__init__(optimizer)
        self.net, self.out_dir = net, out_dir
        self.register_buffer("latent_std", torch.full((1, net.in_channels, 1, 1, 1), 2.0))
        self.record: dict = {"losses": []}

    def shard_units(self) -> list[nn.Module]:
        return list(self.net.blocks)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.net(x / self.latent_std, t, context)

    def on_fit_start(self) -> None:
        full = {name: p.full_tensor() for name, p in self.named_parameters()}
        self.record.update(
            param_type=type(self.net.proj_out.weight).__name__,
            output_layer_zero=bool((full["net.proj_out.weight"] == 0).all()),
            pos_std=full["net.pos.h"].std().item(),
            local_param_bytes=local_parameter_bytes(self),
            full_param_bytes=sum(v.numel() * v.element_size() for v in full.values()),
            latent_std=self.latent_std.flatten().tolist(),
        )

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, t, context, target = batch
        loss = nn.functional.mse_loss(self(x, t, context), target)
        self.record["losses"].append(loss.item())
        return loss

    def on_fit_end(self) -> None:
        Path(self.out_dir, f"rank{self.global_rank}.json").write_text(json.dumps(self.record))


def main(out_dir: str) -> None:
    L.seed_everything(0)
    torch.set_num_threads(1)
    cfg = {"_target_": f"{__name__}.Regression", "out_dir": out_dir,
           "net": {"_target_": "lightning_modules.nn.dit.DiT", **DIT},
           "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 3e-3}}
    with meta_build_guard():  # what experiments/runner.py does under strategy.parallel.meta_init
        module = hydra.utils.instantiate(OmegaConf.create(meta_init_config(cfg)), _convert_="object")
    assert all(p.is_meta for p in module.net.parameters())
    module.parallel = ParallelConfig(activation_checkpointing=True, meta_init=True)

    # the same batch of 2 on both ranks at every step: the loss curve is the same everywhere
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(2, 4, 2, 8, 8, generator=g), torch.rand(2, generator=g),
             torch.randn(2, 5, DIT["dim"], generator=g), torch.randn(2, 4, 2, 8, 8, generator=g))
    data = TensorDataset(*(t.repeat(STEPS, *[1] * (t.dim() - 1)) for t in batch))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2,
                        tensor_parallel_size=1), max_steps=STEPS, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        use_distributed_sampler=False)
    trainer.fit(module, DataLoader(data, batch_size=2))


if __name__ == "__main__":
    main(sys.argv[1])
