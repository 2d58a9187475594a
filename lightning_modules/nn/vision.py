"""Vision networks for reference-image tokens: image [B, 3, H, W] in [-1, 1] → features [B, N, F], attribute `dim` = F.

- `PatchEncoder`: a small image encoder trained from scratch (the default):

      tokens = LN(Conv2d_{k=s=patch}(image) flattened over the patch grid)   [B, (H/p)·(W/p), dim]

- `HFVisionEncoder`: a pretrained Hugging Face vision model (the CLIP vision tower, as Movie Gen's MetaCLIP; SigLIP;
  any AutoModel with `last_hidden_state`) loaded from a local folder (`save_pretrained` output; nothing is
  downloaded): its last hidden states. Images are resized to its `image_size` and normalised with its processor's
  mean and std (preprocessor_config.json; CLIP's when absent). Its weights are a submodule (in checkpoints), so that
  a stage may train it (`conditioning.tokens.ReferenceImage(train_encoder=...)`). Needs `transformers` (dev extra).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class PatchEncoder(nn.Module):
    """See the module docstring. Args: dim (F), patch (pixels per token side), depth (extra 3x3 conv layers)."""

    def __init__(self, dim: int = 64, patch: int = 4, depth: int = 1) -> None:
        super().__init__()
        self.dim = dim
        layers: list[nn.Module] = [nn.Conv2d(3, dim, kernel_size=patch, stride=patch)]
        for _ in range(depth):
            layers += [nn.SiLU(), nn.Conv2d(dim, dim, kernel_size=3, padding=1)]
        self.net = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.norm(rearrange(self.net(image), "b d h w -> b (h w) d"))


class HFVisionEncoder(nn.Module):
    """See the module docstring. Args: path (a local model folder), dim (expected hidden size, checked; None:
    the model's)."""

    VISION_CLASSES = {"clip": "CLIPVisionModel", "clip_vision_model": "CLIPVisionModel",
                      "siglip": "SiglipVisionModel", "siglip_vision_model": "SiglipVisionModel"}

    def __init__(self, path: str, dim: int | None = None) -> None:
        super().__init__()
        try:
            import transformers
        except ImportError as exc:
            raise ImportError("HFVisionEncoder needs the `transformers` package (in the dev extra): "
                              "`pip install -e .[dev]`, or use lightning_modules.nn.vision.PatchEncoder") from exc
        folder = Path(path or "")
        if not path or not folder.is_dir():
            raise FileNotFoundError(f"HFVisionEncoder: path={path!r} is not a local model directory")
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        model_class = getattr(transformers, self.VISION_CLASSES.get(config.model_type, "AutoModel"))
        self.model = model_class.from_pretrained(folder, local_files_only=True)
        vision = getattr(self.model.config, "vision_config", self.model.config)
        self.dim, self.image_size = int(vision.hidden_size), int(vision.image_size)
        if dim is not None and dim != self.dim:
            raise ValueError(f"HFVisionEncoder: {path} has hidden size {self.dim}, the config says dim={dim}")
        processor = folder / "preprocessor_config.json"
        stats = json.loads(processor.read_text()) if processor.is_file() else {}
        self.register_buffer("mean", torch.tensor(stats.get("image_mean", CLIP_MEAN)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(stats.get("image_std", CLIP_STD)).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        pixels = F.interpolate((image + 1) / 2, size=(self.image_size, self.image_size), mode="bicubic",
                               align_corners=False)
        return self.model(pixel_values=(pixels - self.mean) / self.std).last_hidden_state
