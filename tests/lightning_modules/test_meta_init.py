"""The meta-init contract of lightning_modules/parallel.py in one process: a network built on the meta device
and materialised is initialised like a normal build (same zero and one tensors, same spreads), frozen parts
loaded from disk and plain buffers survive, loaded weights win over the init, and every way to end up with
uninitialised memory is an error."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from lightning.fabric.utilities.init import _materialize_distributed_module
from omegaconf import OmegaConf
from torch import nn

from lightning_modules.base import BaseModule
from lightning_modules.nn.codecs import TAECodec
from lightning_modules.nn.dit import DiT
from lightning_modules.nn.tae import TAE
from lightning_modules.nn.text import ByteEncoder, TextConditioner
from lightning_modules.parallel import (
    build_on_meta,
    has_meta_tensors,
    materialise,
    meta_build_guard,
    meta_init_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DIT = dict(in_channels=4, dim=64, depth=2, heads=4, ffn_dim=128, max_t=8, max_h=8, max_w=8, qk_norm=True,
           fps_embedding=True, cond_channels=2)
TAE_TINY = dict(in_channels=3, latent_channels=4, base_channels=8, channel_mults=[1, 2], temporal_down=[True],
                num_res_blocks=1, heads=1, norm_groups=4)


def compare_inits(normal: nn.Module, materialised: nn.Module) -> None:
    """Same names, the same tensors all-zero and all-one, each random tensor's spread within 15% and its mean
    within sampling error."""
    a, b = normal.state_dict(), materialised.state_dict()
    assert a.keys() == b.keys()
    for name, x in a.items():
        y = b[name]
        assert not y.is_meta and y.isfinite().all(), name
        for value in (0.0, 1.0):
            assert bool((x == value).all()) == bool((y == value).all()), f"{name}: all == {value} in one build only"
        if x.numel() > 16 and x.std() > 0:
            assert y.std().item() == pytest.approx(x.std().item(), rel=0.15), name
            # means of two samples of n draws: 4 standard errors of their difference
            assert abs(y.mean().item() - x.mean().item()) < 4 * x.std().item() * (2 / x.numel()) ** 0.5, name


def test_dit_built_on_meta_is_initialised_like_a_normal_build() -> None:
    torch.manual_seed(0)
    normal = DiT(**DIT)
    with torch.device("meta"):
        meta = DiT(**DIT)
    done = materialise(meta, "cpu")
    assert done is not None and done.owners == ["<root>"] and not has_meta_tensors(meta)
    compare_inits(normal, meta)
    # the adaLN-Zero layers and the new condition channels are exactly zero, the tables N(0, 0.02²)
    for layer in (meta.proj_out, meta.modulation[-1], meta.modulation_out[-1], meta.fps.mlp[-1]):
        assert torch.count_nonzero(layer.weight) == 0 and torch.count_nonzero(layer.bias) == 0
    assert torch.count_nonzero(meta.patchify.weight[:, DIT["in_channels"]:]) == 0
    assert meta.pos.t.std().item() == pytest.approx(0.02, rel=0.2)

    # Why the framework materialises itself: Lightning's generic path calls reset_parameters() on every
    # submodule, which re-randomises adaLN-Zero's zero layers (and cannot set the custom tables).
    with torch.device("meta"):
        lightning_way = DiT(**DIT)
    with pytest.warns(UserWarning, match="Parameter initialization incomplete"):
        _materialize_distributed_module(lightning_way, torch.device("cpu"))
    assert torch.count_nonzero(lightning_way.proj_out.weight) > 0


def test_text_conditioner_and_byte_encoder_built_on_meta() -> None:
    def build() -> TextConditioner:
        return TextConditioner({"byte": ByteEncoder(dim=48, depth=2, heads=4, max_length=64)}, dim=64)

    torch.manual_seed(0)
    normal = build()
    with torch.device("meta"):
        meta = build()
    materialise(meta, "cpu")
    compare_inits(normal, meta)
    assert meta.encoders["byte"].pos.std().item() == pytest.approx(0.02, rel=0.2)
    tokens, mask = meta(["a red ball", ""])
    assert tokens.shape == (2, 11, 64) and tokens.isfinite().all() and mask.sum().item() == 12


class TinyGenerator(BaseModule):
    """A LightningModule shaped like the generation core: a backbone, a text conditioner, a frozen codec loaded
    from a checkpoint in its constructor, and buffers of its own."""

    def __init__(self, net: DiT, text: TextConditioner, codec: TAECodec, optimizer, latent_std: float = 2.0) -> None:
        super().__init__(optimizer)
        self.net, self.text, self.codec = net, text, codec
        self.register_buffer("latent_std", torch.full((1, net.in_channels, 1, 1, 1), latent_std))

    def shard_units(self) -> list[nn.Module]:
        return [*self.net.blocks, self.text]


def tiny_config(tae_checkpoint: Path) -> dict:
    path = f"{__name__}.TinyGenerator"
    return {
        "_target_": path, "latent_std": 3.0,
        "net": {"_target_": "lightning_modules.nn.dit.DiT", **DIT},
        "text": {"_target_": "lightning_modules.nn.text.TextConditioner", "dim": DIT["dim"], "encoders": {
            "byte": {"_target_": "lightning_modules.nn.text.ByteEncoder", "dim": 32, "depth": 1, "heads": 2,
                     "max_length": 32}}},
        "codec": {"_target_": "lightning_modules.nn.codecs.TAECodec", "checkpoint": str(tae_checkpoint),
                  "net": {"_target_": "lightning_modules.nn.tae.TAE", **TAE_TINY}},
        "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
    }


@pytest.fixture
def tae_checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(5)
    path = tmp_path / "tae.pt"
    torch.save(TAE(**TAE_TINY).state_dict(), path)
    return path


def test_config_builds_only_networks_with_init_weights_on_meta(tae_checkpoint: Path) -> None:
    cfg = tiny_config(tae_checkpoint)
    rewritten = meta_init_config(cfg)
    meta_target = f"{build_on_meta.__module__}.{build_on_meta.__name__}"
    assert rewritten["net"]["_target_"] == meta_target and rewritten["net"]["_args_"] == [cfg["net"]["_target_"]]
    assert rewritten["text"]["_target_"] == meta_target
    assert rewritten["text"]["encoders"]["byte"]["_target_"] == meta_target
    assert rewritten["codec"] == cfg["codec"] and rewritten["optimizer"] == cfg["optimizer"]
    assert rewritten["_target_"] == cfg["_target_"]

    with meta_build_guard():
        module = hydra.utils.instantiate(OmegaConf.create(rewritten), _convert_="object")
    assert all(p.is_meta for p in module.net.parameters()) and all(p.is_meta for p in module.text.parameters())
    assert module.latent_std.flatten().tolist() == [3.0] * DIT["in_channels"]
    stored = torch.load(tae_checkpoint, weights_only=True)
    assert all(torch.equal(v, stored[k]) for k, v in module.codec.net.state_dict().items())

    module.configure_model()  # no trainer, no mesh: materialise on the CPU
    assert not has_meta_tensors(module)
    assert module.latent_std.flatten().tolist() == [3.0] * DIT["in_channels"]
    assert all(torch.equal(v, stored[k]) for k, v in module.codec.net.state_dict().items())
    assert torch.count_nonzero(module.net.proj_out.weight) == 0
    assert module.text.encoders["byte"].pos.std().item() == pytest.approx(0.02, rel=0.25)


def test_weights_loaded_before_configure_model_win_over_the_init(tae_checkpoint: Path) -> None:
    trained = DiT(**DIT)
    for p in trained.parameters():
        nn.init.normal_(p)  # not an initialisation the DiT would draw
    with meta_build_guard():
        module = hydra.utils.instantiate(OmegaConf.create(meta_init_config(tiny_config(tae_checkpoint))),
                                         _convert_="object")
    # the previous stage had the backbone but another output layer, and no text conditioner: those keep
    # their fresh initialisation, the rest of the backbone (initialised again with it) its loaded values
    stage = {f"net.{k}": v for k, v in trained.state_dict().items() if not k.startswith("proj_out.")}
    missing, unexpected = module.load_state_dict(stage, strict=False)
    assert not unexpected and all(k.startswith(("text.", "net.proj_out.", "latent_std")) for k in missing)
    module.configure_model()
    for name, value in trained.state_dict().items():
        if not name.startswith("proj_out."):
            assert torch.equal(module.net.state_dict()[name], value), name
    assert torch.count_nonzero(module.net.proj_out.weight) == 0
    assert not has_meta_tensors(module.text) and all(p.isfinite().all() for p in module.text.parameters())


class Forgetful(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.kept = nn.Parameter(torch.zeros(3))
        self.forgotten = nn.Parameter(torch.zeros(3))

    def init_weights(self) -> None:
        nn.init.zeros_(self.kept)


def test_uninitialised_memory_is_an_error() -> None:
    with torch.device("meta"):
        forgetful = Forgetful()
    with pytest.raises(RuntimeError, match=r"left 1 tensors uninitialised: \['forgotten'\]"):
        materialise(forgetful, "cpu")

    root = nn.Module()
    with torch.device("meta"):
        root.plain = nn.Linear(3, 3)  # no init_weights above it
    with pytest.raises(ValueError, match=r"no module above them defines init_weights.*plain.weight"):
        materialise(root, "cpu")

    normal = DiT(**DIT)
    with torch.device("meta"):
        meta = DiT(**DIT)
    with meta_build_guard(), pytest.raises(UserWarning, match="meta parameter"):
        meta.load_state_dict(normal.state_dict())  # what a constructor loading a checkpoint would silently skip
