"""Automatic evaluation on the synthetic shapes world: a probe network and the metrics built on it.

The probe is a small video network (`VideoProbe`) trained on real world clips to recognise, for every attribute a of
A = {shape, colour, motion}, which values are present (multi-label: a clip holds 1-3 objects):

    f = Probe(video) ∈ R^F,   logits_a = W_a f,   L = Σ_a BCE(logits_a, multi-hot_a(meta))

Metrics for generated videos (prompts taken from held-out captions, whose json ground truth is known):

- text alignment, per attribute: with k = the number of distinct values of a in the prompt's scene, the fraction
  of those values among the probe's top-k predictions, averaged over videos (top-1 accuracy for one object);
  `alignment` is the mean over attributes. `alignment_real` is the same on the real held-out clips (the
  ceiling the probe allows).
- Fréchet distance in the probe's feature space (torchmetrics' FID with the probe as the feature extractor):

    FD = ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2(Σ_r Σ_g)^½)      over features f of real (r) and generated (g) clips

  With few clips (tens) and F = 32 features the covariance estimates are rough: compare FD between runs of the
  same evaluation size, not with published FIDs.

The probe is trained once per (shards, clip size, probe config) and cached under `cache_dir`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from datamodules.synthetic.world import MOTIONS, OBJECT_COLOURS, SHAPES
from lightning_modules.evaluation.base import Evaluator

ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": tuple(OBJECT_COLOURS), "motion": MOTIONS}


def attribute_targets(metas: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Multi-hot [B, K_a] per attribute from the world's json ground truth ("objects": [{shape, colour, motion}])."""
    targets = {a: torch.zeros(len(metas), len(values)) for a, values in ATTRIBUTES.items()}
    for i, meta in enumerate(metas):
        objects = (meta or {}).get("objects") or []
        if not objects:
            raise ValueError(f"probe: sample {i} has no 'objects' in its json (not a shapes-world scene)")
        for obj in objects:
            for a, values in ATTRIBUTES.items():
                if obj.get(a) in values:
                    targets[a][i, values.index(obj[a])] = 1.0
    return targets


@dataclass
class ProbeConfig:
    """Probe size and training. width: channels of the first conv (doubled twice); features: F."""

    width: int = 16
    features: int = 32
    steps: int = 600
    lr: float = 2e-3
    seed: int = 0


class VideoProbe(nn.Module):
    """Per-frame conv features → appearance (max over T, H, W) and motion (K soft-argmax keypoint tracks).

    h = Conv(video) [B, C, T, h, w] (4 conv layers with (1, 3, 3) kernels, two of stride 2);
    appearance = max_{t,y,x} h;
    keypoints: p_k = softmax_{y,x}(W_k h) per frame, track_k(t) = Σ p_k·(x, y) ∈ [−1, 1]²;
    motion = per track: mean and mean |·| of velocity (first differences) and acceleration (second
    differences), and the std of the positions (zeros for clips shorter than 3 frames);
    f = MLP([appearance; 10·motion]) ∈ R^F.
    """

    def __init__(self, width: int = 16, features: int = 32, keypoints: int = 8) -> None:
        super().__init__()
        self.num_features = features  # read by torchmetrics' FID
        c1, c2, c3 = width, 2 * width, 4 * width

        def conv(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv3d(cin, cout, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1)),
                    nn.GroupNorm(4, cout), nn.GELU()]

        self.body = nn.Sequential(*conv(3, c1, 1), *conv(c1, c2, 2), *conv(c2, c2, 1), *conv(c2, c3, 2))
        self.keypoints = nn.Conv3d(c3, keypoints, 1)
        self.to_features = nn.Sequential(nn.Linear(c3 + 10 * keypoints, 2 * features), nn.GELU(),
                                         nn.Linear(2 * features, features))
        self.heads = nn.ModuleDict({a: nn.Linear(features, len(v)) for a, v in ATTRIBUTES.items()})

    def tracks(self, h: torch.Tensor) -> torch.Tensor:
        """[B, K, T, 2] expected (x, y) of each keypoint's spatial softmax per frame."""
        b, _, t, height, width = h.shape
        p = rearrange(self.keypoints(h), "b k t y x -> b k t (y x)").softmax(-1)
        p = rearrange(p, "b k t (y x) -> b k t y x", y=height)
        ys = torch.linspace(-1, 1, height, device=h.device)
        xs = torch.linspace(-1, 1, width, device=h.device)
        return torch.stack([(p.sum(3) * xs).sum(3), (p.sum(4) * ys).sum(3)], dim=-1)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, T, H, W] in [-1, 1] → features [B, F]."""
        h = self.body(video.float())
        appearance = h.amax(dim=(2, 3, 4))
        track = self.tracks(h)
        if track.shape[2] >= 3:
            velocity = track.diff(dim=2)
            acceleration = velocity.diff(dim=2)
            stats = [velocity.mean(2), velocity.abs().mean(2), acceleration.mean(2), acceleration.abs().mean(2),
                     track.std(2)]
        else:
            stats = [torch.zeros_like(track[:, :, 0])] * 5
        motion = rearrange(torch.cat(stats, dim=-1), "b k s -> b (k s)")
        return self.to_features(torch.cat([appearance, 10.0 * motion], dim=1))

    def classify(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        f = nn.functional.gelu(self(video))
        return {a: head(f) for a, head in self.heads.items()}


def probe_loss(probe: VideoProbe, video: torch.Tensor, metas: Sequence[dict]) -> torch.Tensor:
    targets = attribute_targets(metas)
    logits = probe.classify(video)
    return sum(nn.functional.binary_cross_entropy_with_logits(logits[a], targets[a].to(logits[a])) for a in ATTRIBUTES)


def topk_alignment(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per attribute, per sample: |top-k(logits) ∩ true values| / k with k = number of true values → [B]."""
    out = {}
    for a, target in targets.items():
        target = target.to(logits[a].device)
        k = target.sum(1).long().clamp_min(1)
        order = logits[a].argsort(dim=1, descending=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        hits = ((ranks < k[:, None]) & (target > 0)).sum(1)
        out[a] = hits.float() / k.float()
    return out


def train_probe(batches: Iterable[dict[str, Any]], config: ProbeConfig, device: torch.device | str = "cpu") -> VideoProbe:
    """Train a probe on `config.steps` batches with "video" and "meta" (real clips); returns it in eval mode.
    Gradients are enabled here even inside an evaluation loop's inference mode."""
    with torch.inference_mode(False), torch.enable_grad():
        return _train_probe(batches, config, device)


def _train_probe(batches: Iterable[dict[str, Any]], config: ProbeConfig, device: torch.device | str) -> VideoProbe:
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(config.seed)
    probe = VideoProbe(config.width, config.features).to(device)
    torch.random.set_rng_state(generator_state)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=config.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.steps, pct_start=0.1)
    step = 0
    for batch in batches:
        video = batch["video"]
        if video.shape[2] < 2:
            continue
        loss = probe_loss(probe, video.to(device), batch["meta"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        step += 1
        if step >= config.steps:
            break
    if step < config.steps:
        raise ValueError(f"train_probe: the data ran out after {step} of {config.steps} steps")
    return probe.eval().requires_grad_(False)


def probe_from_datamodule(datamodule: Any, config: ProbeConfig, cache_dir: str | Path | None,
                          device: torch.device | str = "cpu") -> VideoProbe:
    """The probe for a shard datamodule's training clips (its first video source), trained once and cached as
    `<cache_dir>/probe-<hash>.pt` (hash of the shards, the bucket table and `config`)."""
    from datamodules.stream_dataset import StreamDataset
    from datamodules.stream_loader import ShardLoader

    datamodule.setup("fit")
    source = next((s for s in datamodule.sources(train=True) if s.name != "image"), None)
    if source is None:
        raise ValueError(f"probe: {type(datamodule).__name__} has no video source to train the probe on")
    table = getattr(source.handler, "table", None)
    buckets = sorted(b.name for b in table.buckets.values()) if table is not None else []
    key = json.dumps({"shards": source.shards, "buckets": buckets, "config": asdict(config)}, sort_keys=True)
    path = Path(cache_dir) / f"probe-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt" if cache_dir else None
    if path is not None and path.is_file():
        probe = VideoProbe(config.width, config.features)
        probe.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return probe.to(device).eval().requires_grad_(False)
    dataset = StreamDataset([source], seed=config.seed, shuffle=True, shuffle_buffer=128)
    loader = ShardLoader(dataset, config.steps, num_workers=min(1, int(getattr(datamodule, "num_workers", 0))))
    probe = train_probe(iter(loader), config, device)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{id(probe)}")
        torch.save(probe.state_dict(), tmp)
        tmp.replace(path)
    return probe


class ProbeEvaluator(Evaluator):
    """Text alignment and Fréchet distance of samples, judged by a probe trained on the datamodule's real clips.

    Logs alignment, alignment_<attribute>, alignment_real, alignment_real_<attribute> and fd (see the module
    docstring). Needs batches with "video" and the world's "meta" (shapes-world scenes); other batches and
    single images are skipped. Under `trainer.fast_dev_run` (a wiring check) the probe is not trained.

    Args:
        cache_dir: where trained probes are kept (None: not cached); width, features, steps, lr: `ProbeConfig`.
    """

    def __init__(self, cache_dir: str | None = None, width: int = 16, features: int = 32, steps: int = 600,
                 lr: float = 2e-3) -> None:
        self.cache_dir = cache_dir
        self.config = ProbeConfig(width=width, features=features, steps=steps, lr=lr)
        self.probe: VideoProbe | None = None

    def start(self, module: Any, trainer: Any) -> None:
        self.probe, self.fid, self.scores = None, None, {}
        if trainer is None or trainer.datamodule is None or trainer.fast_dev_run:
            return
        self.probe = probe_from_datamodule(trainer.datamodule, self.config, self.cache_dir, module.device)
        self.fid = FrechetInceptionDistance(feature=self.probe, reset_real_features=True)
        self.fid.to(next(self.probe.parameters()).device)
        self.scores = {f"{kind}_{a}": [] for kind in ("fake", "real") for a in ATTRIBUTES}

    @torch.no_grad()
    def _score(self, video: torch.Tensor, metas: Sequence[dict], kind: str) -> None:
        device = next(self.probe.parameters()).device
        video = video.to(device).float().clamp(-1, 1)
        for a, hits in topk_alignment(self.probe.classify(video), attribute_targets(metas)).items():
            self.scores[f"{kind}_{a}"].append(hits.cpu())
        self.fid.update(video, real=kind == "real")

    def update(self, generated: torch.Tensor, batch: dict[str, Any], extras: dict[str, torch.Tensor]) -> None:
        """Generated clips for the batch's captions, scored against the scenes' ground truth; the batch's real
        clips are scored too (the ceiling)."""
        if self.probe is None or generated.shape[2] == 1 or "video" not in batch or "meta" not in batch:
            return
        self._score(generated, batch["meta"], "fake")
        self._score(batch["video"], batch["meta"], "real")

    def compute(self) -> dict[str, float]:
        if self.probe is None:
            return {}
        out: dict[str, float] = {}
        for a in ATTRIBUTES:
            for kind, prefix in (("fake", "alignment"), ("real", "alignment_real")):
                scores = self.scores[f"{kind}_{a}"]
                if scores:
                    out[f"{prefix}_{a}"] = float(torch.cat(scores).mean())
        for prefix in ("alignment", "alignment_real"):
            values = [out[f"{prefix}_{a}"] for a in ATTRIBUTES if f"{prefix}_{a}" in out]
            if values:
                out[prefix] = sum(values) / len(values)
        if int(self.fid.real_features_num_samples) >= 2 and int(self.fid.fake_features_num_samples) >= 2:
            out["fd"] = float(self.fid.compute())
        return out
