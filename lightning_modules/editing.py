"""Movie Gen Edit (arXiv 2410.13720 §5): instruction-guided video editing on the generation core.

The editor is a configuration of `GenerationModule` (conf/model/edit_tiny.yaml): the source video's latent
concatenated on the channels (`conditioning.SourceVideo`, zero weights at the start, zeros for text-to-video),
the instruction as the text, and a task embedding (`conditioning.TaskTokens`: 4 tokens and a vector added to the
time embedding). Stages (conf/experiment/edit_stage*.yaml, each starting from the previous one's checkpoint):
I single-frame editing, II animated frame editing + instruction-guided segmentation, III backtranslation. The
training pairs are made in `datamodules.edits`; this module adds what needs the model:

    EditingModule.backtranslate   stage III: x' = edit(x, instruction) by the model itself (no gradient); the
                                  training pair is source x', prompt the inverse instruction, target the real x
    sdedit                        the SDEdit baseline (Meng et al., 2021) with a text-to-video model: noise the
                                  source to time t_0, X_{t_0} = t_0·Enc(x) + (1 − (1 − σ_min)·t_0)·ε, and solve
                                  t_0 → 1 with the instruction as the prompt
    edit_to_files                 `task=edit`: a video file and an instruction → the edited mp4

    python experiments/run.py experiment=edit_stage2 task=edit ckpt_path=last edit.video=<clip.mp4> \
        edit.instruction="Make the red circle blue."
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lightning_modules.conditioning import resize_video
from lightning_modules.evaluation.samples import log_artifacts, slug, write_clip
from lightning_modules.generation import GenerationModule, read_inputs


class EditingModule(GenerationModule):
    """`GenerationModule` that completes stage III's backtranslation batches (those with "inverse_text").

    Args:
        backtranslation_steps: solver steps of the model's own edit; **kwargs: `GenerationModule`'s.
    """

    def __init__(self, *args: Any, backtranslation_steps: int = 10, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.backtranslation_steps = int(backtranslation_steps)

    @torch.no_grad()
    def backtranslate(self, batch: dict[str, Any]) -> dict[str, Any]:
        """{video: x (real), text: c, inverse_text: c⁻¹} → {video: x, source: edit(x, c), text: c⁻¹}: the target
        is always the real clip; the model's own (imperfect) edit is only ever an input."""
        video = batch["video"].float()
        request = {"source": video, "text": list(batch["text"]), "task": list(batch["task"]), "fps": batch["fps"]}
        was_training = self.training
        self.eval()
        try:
            edited = self.generate(request, *video.shape[2:], steps=self.backtranslation_steps,
                                   seed=int(torch.randint(0, 2**31 - 1, (1,))))
        finally:
            self.train(was_training)
        return {"video": video, "source": edited, "text": list(batch["inverse_text"]), "task": list(batch["task"]),
                "fps": batch["fps"], "meta": batch.get("meta"), "edited_text": list(batch["text"])}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if "inverse_text" in batch:
            batch = self.backtranslate(batch)
        return super().training_step(batch, batch_idx)


@torch.no_grad()
def sdedit(module: GenerationModule, source: torch.Tensor, instruction: list[str], fps: torch.Tensor,
           strength: float = 0.6, steps: int | None = None, seed: int = 0) -> torch.Tensor:
    """SDEdit with a text-to-video `module`: X_{t_0} = path(Enc(source), t_0, ε) at t_0 = 1 − strength (strength
    1: pure text-to-video, 0: the source unchanged), then the module's solver and guidance from t_0 to 1 with the
    instruction as the prompt. Noise ε is seeded per sample as in `generate`. Returns [B, 3, T, H, W]."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"sdedit: strength={strength} must be in (0, 1]")
    start = 1.0 - float(strength)
    source = source.to(module.device).float()
    x1 = module.encode(source)
    noise = module.noise(tuple(x1.shape[1:]), seed, x1.shape[0]).to(x1)
    x_start = module.objective.path.sample(x1, torch.full((x1.shape[0],), start, device=x1.device), noise)[1]
    batch = {"text": list(instruction), "fps": fps}
    return module.generate(batch, *source.shape[2:], steps=steps, noise=x_start, start_time=start)


def edit_to_files(module: GenerationModule, trainer: Any, options: dict[str, Any]) -> list[Path]:
    """`task=edit`: edit.video (a video file), edit.instruction (text) → <output_dir>/<name>_<instruction>.mp4
    (default output_dir: <run dir>/edited), resized to the model's sample size and cut to sample.frames frames;
    the source is written beside it (…_source.mp4)."""
    for key in ("video", "instruction"):
        if not options.get(key):
            raise ValueError(f"task=edit needs edit.{key}=<{'a video file' if key == 'video' else 'text'}>")
    if not Path(options["video"]).is_file():
        raise FileNotFoundError(f"edit.video={options['video']}: no such file")
    module.to(trainer.strategy.root_device).eval()
    cfg = module.sample_cfg
    request = read_inputs(options["video"])[0]
    source = resize_video(request["source"][:, :, : cfg.frames], cfg.height, cfg.width)
    instruction, fps = str(options["instruction"]), float(request["fps"][0])
    batch = {"source": source, "text": [instruction], "fps": request["fps"], "task": ["edit"]}
    edited = module.generate(batch, *source.shape[2:], seed=module.sampler.seed)[0]
    folder = Path(options.get("output_dir") or Path(trainer.default_root_dir) / "edited")
    stem = folder / f"{slug(request['name'])}_{slug(instruction)}"
    written = write_clip(stem, edited.cpu(), instruction, fps)
    written += write_clip(folder / f"{slug(request['name'])}_source", source[0], "", fps)
    log_artifacts(trainer, written, "edited")
    print(f"[edit] {source.shape[2]} frames, {instruction!r} -> {stem}.mp4")
    return written
