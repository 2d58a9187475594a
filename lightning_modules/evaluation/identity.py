"""Personalization metrics without a face model (Movie Gen §4 judges PT2V with ArcFace): an identity embedding trained
on the world's training identities, the similarity of generated clips to their reference, and how much the clips
copy the reference instead of following the prompt.

Crops. An object of a clip [3, T, H, W] is its object-coloured pixels (`palette.palette_labels`: the nearest palette
entry is one of the 8 object colours; an identity's patchwork is made of them), cropped as references are
(`datamodules.references.masked_crops`: a window of 0.65·min(H, W) centred on them, the rest black) at S x S.

Identity embedding. e(x) = normalise(CNN(x)) ∈ R^E, trained on the datamodule's training clips (training identities
only: held-out identities are new to it as they are to the model) with a cosine classifier, softmax(s·⟨e, w_k⟩),
w_k = normalise(W_k), on crops of real frames and of the clips' references. Trained once (seconds on a CPU) and
cached as `<cache_dir>/identity-<hash>.pt`.

Measures over the test loop's clips of one object (a distractor's colours would join the crop), each beside its
ceiling (the real clip of the same prompt) and floor:

    identity_similarity   cos(ē(clip), e(reference)),  ē(clip) = normalise(mean_t e(crop_t))
                          _real: the real clip;  _floor: the real clip against the reference of another identity
    identity_accuracy     the clip's nearest identity among the evaluated ones (each the mean embedding of its
                          references) is its own; _real; _chance = 1 / the number of identities
    copy_pose             mean_t [s(g_t, r) − mean_θ s(R_θ g_t, r)]: how much more the clip's object matches the
                          reference as it is than turned by θ ∈ {30°, ..., 330°} (s = cosine of the crops' pixels):
                          0 when the clip's pose is unrelated to the reference's, high when it copies it; _real (a
                          cross-paired reference: the pose level of another clip of the identity); _paste (the
                          reference itself as the clip: full copying)
    copy_size             Pearson correlation over clips of the object's area in the clip's crops and in the
                          reference (the crop window is a fixed share of the canvas, so the object's size shows),
                          both centred per identity (an identity's shape sets its area: that is not copying);
                          _real; 1 for a pasted reference

A masked crop centred on the object carries neither its position nor the background, so those cannot be copied
from it: pose (turn) and size are what a paired-trained model can copy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import nn

from datamodules.references import masked_crops
from lightning_modules.evaluation.base import Evaluator, cached_network
from lightning_modules.evaluation.palette import palette_labels, unit
from lightning_modules.evaluation.probe import _video_source, train_batches

OBJECT_COLOURS = 8  # palette_labels: 0..7 are the object colours


def object_crops(video: torch.Tensor, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips [B, 3, T, H, W] in [-1, 1] → (crops [B, T, 3, size, size] in [-1, 1], black outside the object; the
    object's area per frame [B, T] as a share of the canvas)."""
    b, _, t, h, w = video.shape
    mask = palette_labels(video) < OBJECT_COLOURS  # [B, T, H, W]
    frames = rearrange(unit(video), "b c t h w -> (b t) c h w")
    crops = masked_crops(frames, rearrange(mask, "b t h w -> (b t) h w"), size) * 2 - 1
    return rearrange(crops, "(b t) c h w -> b t c h w", b=b), mask.float().mean((-2, -1))


def crop_area(crops: torch.Tensor) -> torch.Tensor:
    """Share of non-black pixels of crops [..., 3, S, S] in [-1, 1] → [...]."""
    return (crops > -0.9).any(-3).float().mean((-2, -1))


def rotate(crops: torch.Tensor, degrees: float) -> torch.Tensor:
    """Crops [N, 3, S, S] turned by `degrees` about their centre (black fill)."""
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]]).to(crops)
    grid = F.affine_grid(theta.expand(len(crops), 2, 3), list(crops.shape), align_corners=False)
    return F.grid_sample(crops + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


def pixel_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of crops [N, 3, S, S] in [-1, 1] as pixels in [0, 1] (black = 0) → [N]."""
    return F.cosine_similarity(((a + 1) / 2).flatten(1), ((b + 1) / 2).flatten(1), dim=1, eps=1e-6)


def pose_copy(crops: torch.Tensor, reference: torch.Tensor, angles: int = 12) -> torch.Tensor:
    """mean_t [s(g_t, r) − mean_θ s(R_θ g_t, r)] of crops [T, 3, S, S] against a reference [3, S, S] (module doc)."""
    r = reference.expand_as(crops)
    turned = torch.stack([pixel_similarity(rotate(crops, 360 * k / angles), r) for k in range(1, angles)])
    return (pixel_similarity(crops, r) - turned.mean(0)).mean()


class IdentityNet(nn.Module):
    """e(x): crops [N, 3, S, S] in [-1, 1] (resized to 16x16) → unit vectors [N, dim]; `classes` cosine logits."""

    def __init__(self, width: int = 32, dim: int = 32, classes: int = 1, scale: float = 10.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.SiLU())
        self.head = nn.Linear(2 * width, dim)
        self.classes = nn.Parameter(torch.randn(classes, dim))
        self.scale = scale

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        if crops.shape[-1] != 16:
            crops = F.interpolate(crops, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
        return F.normalize(self.head(reduce(self.net(crops), "n c h w -> n c", "mean")), dim=-1)

    def logits(self, crops: torch.Tensor) -> torch.Tensor:
        return self.scale * self(crops) @ F.normalize(self.classes, dim=-1).T


@dataclass
class IdentityConfig:
    """Embedding size and training: CNN width, embedding dim, crop size, optimizer steps, batch, learning rate,
    training clips read (each gives its frames' crops and its reference), seed."""

    width: int = 32
    dim: int = 32
    size: int = 16
    steps: int = 300
    batch: int = 128
    lr: float = 3e-3
    clips: int = 512
    seed: int = 0


def training_crops(batches: Sequence[dict[str, Any]] | Any, config: IdentityConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(crops [N, 3, S, S], identity labels [N]) of real clips of one object (their frames) and of every clip's
    reference, until `config.clips` clips were read."""
    crops, labels, seen = [], [], 0
    for batch in batches:
        ids = torch.tensor([int(m["identity"]) for m in batch["meta"]])
        alone = torch.tensor([len(m.get("objects") or []) == 1 for m in batch["meta"]])
        frames, _ = object_crops(batch["video"].float(), config.size)
        crops += [rearrange(frames[alone], "b t c h w -> (b t) c h w")]
        labels += [ids[alone].repeat_interleave(frames.shape[1])]
        if "reference" in batch:
            reference = batch["reference"].float()
            if reference.shape[-1] != config.size:
                reference = F.interpolate(reference, size=(config.size,) * 2, mode="bilinear", antialias=True,
                                          align_corners=False)
            crops.append(reference)
            labels.append(ids)
        seen += len(ids)
        if seen >= config.clips:
            break
    if not crops:
        raise ValueError("identity embedding: no training clips with a meta 'identity' (the world's identity clips)")
    return torch.cat(crops), torch.cat(labels)


def fit_identity(crops: torch.Tensor, labels: torch.Tensor, config: IdentityConfig) -> IdentityNet:
    """Train the cosine classifier (module doc) on crops with identity labels; small noise and colour-free
    brightness jitter so that generated crops (noisier) read as their identity. Returns the net in eval mode."""
    with torch.inference_mode(False), torch.enable_grad():
        generator = torch.Generator().manual_seed(config.seed)
        torch_state = torch.random.get_rng_state()
        torch.manual_seed(config.seed)
        net = IdentityNet(config.width, config.dim, int(labels.max()) + 1)
        torch.random.set_rng_state(torch_state)
        optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.steps)
        for _ in range(config.steps):
            chosen = torch.randint(len(crops), (config.batch,), generator=generator)
            x = crops[chosen] + 0.1 * torch.randn(crops[chosen].shape, generator=generator)
            loss = F.cross_entropy(net.logits(x.clamp(-1, 1)), labels[chosen])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return net.eval().requires_grad_(False)


def identity_from_datamodule(datamodule: Any, config: IdentityConfig, cache_dir: str | Path | None) -> IdentityNet:
    """The embedding of a datamodule's training identity clips, trained once and cached as
    `<cache_dir>/identity-<hash>.pt` (hash of the shards and `config`)."""
    source = _video_source(datamodule)

    def train() -> IdentityNet:
        batch_size = int(getattr(datamodule, "batch_size", 8) or 8)
        batches = train_batches(datamodule, math.ceil(config.clips / batch_size) + 1, config.seed)
        return fit_identity(*training_crops(batches, config), config)

    key = {"shards": source.shards, "config": asdict(config), "version": 1}
    net = cached_network(cache_dir, "identity", key, train,
                         lambda state: IdentityNet(config.width, config.dim, state["classes"].shape[0]))
    return net.eval().requires_grad_(False)


def pearson(x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor) -> float:
    """Correlation of x and y [N], each centred on its mean within its group (groups: int [N] in 0..G-1)."""
    counts = torch.bincount(groups).to(x.dtype).clamp_min(1)

    def centre(v: torch.Tensor) -> torch.Tensor:
        return v - (torch.zeros(len(counts), dtype=v.dtype).index_add_(0, groups, v) / counts)[groups]

    x, y = centre(x), centre(y)
    return float((x * y).sum() / (x.norm() * y.norm()).clamp_min(1e-12))


def standard_error(values: torch.Tensor) -> float:
    """The standard error of the mean of `values` [N]: sample std (n - 1) / sqrt(n); 0 for one value."""
    n = values.numel()
    return float(values.float().std() / n ** 0.5) if n > 1 else 0.0


class IdentityEvaluator(Evaluator):
    """Identity similarity and accuracy, and the copy-paste measures, of samples against their batch's
    "reference" (see the module doc). Needs batches with "video", "reference" and the world's "meta" (identity
    clips); clips with more than one object are left out. Under `trainer.fast_dev_run` nothing is trained.

    Args:
        cache_dir: where trained embeddings are kept (None: not cached); the rest: `IdentityConfig`.
    """

    def __init__(self, cache_dir: str | None = None, **config: Any) -> None:
        self.cache_dir, self.config = cache_dir, IdentityConfig(**config)
        self.net: IdentityNet | None = None
        self.rows: list[dict[str, torch.Tensor]] = []

    def start(self, module: Any, trainer: Any) -> None:
        self.net, self.rows = None, []
        if trainer is None or trainer.datamodule is None or trainer.fast_dev_run:
            return
        self.net = identity_from_datamodule(trainer.datamodule, self.config, self.cache_dir)

    @torch.no_grad()
    def measure(self, generated: torch.Tensor, real: torch.Tensor, reference: torch.Tensor,
                identities: torch.Tensor) -> None:
        """Add clips [B, 3, T, H, W] (generated and real, same prompts) and their references [B, 3, S, S]."""
        size = self.config.size
        if reference.shape[-1] != size:
            reference = F.interpolate(reference, size=(size, size), mode="bilinear", antialias=True,
                                      align_corners=False)
        row = {"identity": identities, "ref": self.net(reference), "ref_area": crop_area(reference)}
        for name, clip in (("fake", generated), ("real", real)):
            crops, _ = object_crops(clip.float().clamp(-1, 1), size)
            embedded = self.net(rearrange(crops, "b t c h w -> (b t) c h w"))
            row[name] = F.normalize(reduce(embedded, "(b t) e -> b e", "mean", b=len(crops)), dim=-1)
            row[f"{name}_area"] = crop_area(crops).mean(1)
            row[f"{name}_pose"] = torch.stack([pose_copy(c, r) for c, r in zip(crops, reference)])
        row["paste_pose"] = torch.stack([pose_copy(r[None], r) for r in reference])
        self.rows.append(row)

    def update(self, generated: torch.Tensor, batch: dict[str, Any], extras: dict[str, torch.Tensor]) -> None:
        if self.net is None or "reference" not in batch or "meta" not in batch or generated.shape[2] < 2:
            return
        n = generated.shape[0]
        metas = list(batch["meta"])[:n]
        alone = torch.tensor([len(m.get("objects") or []) == 1 for m in metas])
        if not alone.any():
            return
        identities = torch.tensor([int(m["identity"]) for m in metas])
        self.measure(generated[alone], batch["video"][:n][alone], batch["reference"][:n][alone].float(),
                     identities[alone])

    def per_clip(self, name: str = "fake") -> dict[str, torch.Tensor]:
        """Per clip of the generated ("fake") or real clips: "similarity" (cosine to the reference), "correct"
        (1 where the nearest identity of the gallery of references is the clip's own) and "pose" (copy_pose)."""
        rows = {k: torch.cat([r[k] for r in self.rows]) for k in self.rows[0]}
        ids, ref = rows["identity"], rows["ref"]
        known = ids.unique()
        gallery = F.normalize(torch.stack([ref[ids == i].mean(0) for i in known]), dim=-1)
        nearest = known[(rows[name] @ gallery.T).argmax(1)]
        return {"similarity": (rows[name] * ref).sum(-1), "correct": (nearest == ids).float(),
                "pose": rows[f"{name}_pose"]}

    def compute(self) -> dict[str, float]:
        """The means over clips, each with its standard error ("_se": sample std / sqrt(n))."""
        if self.net is None or not self.rows:
            return {}
        rows = {k: torch.cat([r[k] for r in self.rows]) for k in self.rows[0]}
        ids, ref = rows["identity"], rows["ref"]
        known, groups = ids.unique(return_inverse=True)
        # the floor: each real clip against the reference of the next clip of another identity
        other = torch.tensor([next((j for j in (*range(i + 1, len(ids)), *range(i)) if ids[j] != ids[i]), i)
                              for i in range(len(ids))])
        out = {"identity_similarity_floor": float((rows["real"] * ref[other]).sum(-1).mean()),
               "identity_accuracy_chance": 1.0 / len(known), "copy_pose_paste": float(rows["paste_pose"].mean()),
               "identity_clips": float(len(ids))}
        for name, suffix in (("fake", ""), ("real", "_real")):
            clips = self.per_clip(name)
            for key, values in (("identity_similarity", clips["similarity"]),
                                ("identity_accuracy", clips["correct"]), ("copy_pose", clips["pose"])):
                out[f"{key}{suffix}"] = float(values.mean())
                out[f"{key}_se{suffix}"] = standard_error(values)
            out[f"copy_size{suffix}"] = pearson(rows[f"{name}_area"], rows["ref_area"], groups)
        return out
