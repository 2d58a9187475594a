"""Everything `experiments/run.py` does for one job, from a composed config to a finished MLflow run.

1. seed everything; resolve and check `ckpt_path` (it must exist and fit the model) before any training;
2. instantiate the datamodule, the module, the callbacks, the strategy and the trainer from the config;
3. open the MLflow run (the checkpoint's run when resuming; a child of the sweep's parent run in a multirun),
   log the flattened resolved config as params, the config files as artifacts, and tags (git commit,
   overrides, experiment);
4. run the task: fit (then test), validate, test, or a task the module offers (`run_task`);
5. print where the checkpoints, outputs and the MLflow run are; return the optimised metric for sweepers.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import mlflow
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar as ProgressBarBase
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from callbacks.ema import load_ema_weights
from callbacks.mlflow_logger import BufferedMLFlowLogger
from callbacks.progress import ProgressBar
from callbacks.run_state import RunState, read_checkpoint_meta
from experiments import tracking
from experiments.config_check import check_config
from lightning_modules.checkpoint_io import (
    is_sharded_checkpoint,
    newest_checkpoint,
    read_module_state,
    sharded_tensor_metadata,
)
from lightning_modules.parallel import ParallelConfig, meta_build_guard, meta_init_config

STANDARD_TASKS = ("fit", "validate", "test")
EMA_TASKS = ("sample", "evaluate", "edit")  # tasks that use a checkpoint's EMA weights when it has them


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


# -- checkpoints ------------------------------------------------------------------------------------------------
def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """`ckpt_path`: null, a path, or "last" (the newest last.ckpt under this experiment's output folder)."""
    if cfg.ckpt_path is None:
        return None
    if cfg.ckpt_path == "last":
        experiment_dir = Path(cfg.paths.log_dir) / cfg.experiment_name
        try:
            return str(newest_checkpoint(experiment_dir))
        except FileNotFoundError:
            raise ConfigError(f"ckpt_path=last: no checkpoints/last.ckpt under {experiment_dir}") from None
    path = Path(cfg.ckpt_path).expanduser()
    if not path.exists():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint file or folder")
    _require_checkpoint(path)
    return str(path.resolve())


def _require_checkpoint(path: Path) -> None:
    if path.is_dir() and not is_sharded_checkpoint(path):
        raise ConfigError(
            f"ckpt_path={path} is a folder but not a sharded (DCP) checkpoint: it has no .metadata file "
            "(give a checkpoint file, or a folder written with strategy=fsdp)")


def checkpoint_tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes stored in a checkpoint file or a sharded (DCP) checkpoint folder."""
    p = Path(path)
    if p.is_dir():
        _require_checkpoint(p)
        try:
            return {name: tuple(m.size) for name, m in sharded_tensor_metadata(p).items()}
        except ValueError as exc:
            raise ConfigError(f"ckpt_path={path}: {exc}") from None
    state = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    if "state_dict" not in state:
        raise ConfigError(f"ckpt_path={path}: not a Lightning checkpoint (no 'state_dict')")
    return {k: tuple(v.shape) for k, v in state["state_dict"].items()}


def _plain_name(name: str) -> str:
    """A tensor's name without the `_checkpoint_wrapped_module.` part activation checkpointing inserts."""
    return name.replace("_checkpoint_wrapped_module.", "")


def check_checkpoint_fits(path: str, module: L.LightningModule) -> None:
    """Fail before training when the checkpoint's tensors do not match the model's names and shapes."""
    stored = {_plain_name(k): v for k, v in checkpoint_tensor_shapes(path).items()}
    expected = {_plain_name(k): tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    wrong = sorted(k for k in set(expected) & set(stored) if expected[k] != stored[k])
    if missing or unexpected or wrong:
        lines = [f"ckpt_path={path} does not match the model {type(module).__name__}:"]
        if missing:
            lines.append(f"  missing in checkpoint: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            lines.append(f"  not in the model: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        for k in wrong[:8]:
            lines.append(f"  {k}: checkpoint {stored[k]} vs model {expected[k]}")
        raise ConfigError("\n".join(lines))


# -- building blocks --------------------------------------------------------------------------------------------
def instantiate_callbacks(cfg: DictConfig) -> list[Callback]:
    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        if "_target_" not in node:
            raise ConfigError(f"callbacks.{name} has no _target_")
        callbacks.append(hydra.utils.instantiate(node))
    return callbacks


def instantiate_strategy(cfg: DictConfig) -> tuple[Any, ParallelConfig | None]:
    """The Lightning strategy and, for sharded strategies, the per-block parallelism for the module."""
    node = OmegaConf.to_container(cfg.strategy, resolve=True)
    parallel = node.pop("parallel", None)
    if "_target_" not in node:
        return node.get("name", "auto"), None
    context_parallel_size = int(node.pop("context_parallel_size", 1))  # ours, not a Lightning argument
    if parallel is not None:
        parallel = ParallelConfig(**parallel, tensor_parallel_size=int(node.get("tensor_parallel_size", 1)),
                                  context_parallel_size=context_parallel_size)
    return hydra.utils.instantiate(node), parallel


def make_logger(cfg: DictConfig, resume_meta: dict[str, Any], parent_run_id: str | None) -> MLFlowLogger | None:
    """The MLflow logger on global rank 0; None on the other ranks, which must not open the store (several
    processes migrating one sqlite file at once corrupt it) and log nothing anyway."""
    if rank_zero_only.rank != 0:
        return None
    tracking_uri = cfg.logger.tracking_uri
    run_id = resume_meta.get("run_id") if resume_meta.get("tracking_uri") in (None, tracking_uri) else None
    tags = {
        "experiment": cfg.experiment_name,
        "git_commit": tracking.git_commit(cfg.paths.root_dir),
        "overrides": " ".join(_task_overrides()),
        "seed": str(cfg.seed),
        "task": cfg.task,
        **{k: str(v) for k, v in (cfg.tags or {}).items()},
    }
    if parent_run_id is not None:
        tags["mlflow.parentRunId"] = parent_run_id
    resumed_status = None  # the run's status before this resume: a resume that fails at once gives it back
    if run_id is not None:
        try:
            resumed_status = MlflowClient(tracking_uri).get_run(run_id).info.status
        except mlflow.exceptions.MlflowException:
            run_id = None  # the checkpoint's run is not in this store (deleted): a new run
    if run_id is None:
        # Create the experiment with an absolute artifact folder before Lightning's logger can create it
        # without one (artifacts would then land relative to the working directory).
        tracking.get_or_create_experiment(MlflowClient(tracking_uri), cfg.experiment_name, cfg.logger.artifact_location)
    return BufferedMLFlowLogger(
        experiment_name=cfg.experiment_name,
        run_name=cfg.run_name or tracking.unique_run_name(cfg.experiment_name),
        resumed_status=resumed_status,
        tracking_uri=tracking_uri,
        tags=tags if run_id is None else None,
        artifact_location=None if tracking.is_remote(tracking_uri) else cfg.logger.artifact_location,
        run_id=run_id,
        log_model=cfg.logger.log_checkpoints,
        synchronous=cfg.logger.synchronous,
        flush_every_s=cfg.logger.flush_every_s,
    )


def _task_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _sweep_parent_run_id() -> str | None:
    if not _is_multirun():
        return None
    marker = Path(HydraConfig.get().sweep.dir) / tracking.PARENT_RUN_FILE
    return marker.read_text().strip() if marker.exists() else None


def _rewrite_argv_for_ddp_children() -> None:
    """Lightning starts DDP ranks >= 1 by re-running `sys.argv`; in a multirun that argv holds the whole
    sweep, so every child would start the sweep again. Give the children this one job's command instead."""
    if not _is_multirun():
        return
    hc = HydraConfig.get()
    keep = [o for o in hc.overrides.task if not o.split("=", 1)[0].lstrip("+~").startswith(("sweep", "hydra/sweeper", "hydra/launcher"))]
    sys.argv = [sys.argv[0], *keep, "hydra.mode=RUN"]
    with read_write(hc), open_dict(hc):  # Lightning puts run.dir on the children's command line
        hc.run.dir = hc.runtime.output_dir


@rank_zero_only
def _log_config(logger: MLFlowLogger, cfg: DictConfig, resuming: bool) -> None:
    client, run_id = logger.experiment, logger.run_id
    if not resuming and cfg.logger.log_params:
        tracking.log_params(client, run_id, cfg)
    client.log_text(run_id, OmegaConf.to_yaml(cfg, resolve=True), "config/config_resolved.yaml")
    client.log_text(run_id, "\n".join(_task_overrides()) + "\n", "config/overrides.txt")


@rank_zero_only
def _print_summary(trainer: L.Trainer, logger: MLFlowLogger | None, cfg: DictConfig, status: str,
                   failure: BaseException | None = None) -> None:
    from experiments.console import advice

    checkpoint_dirs = sorted({cb.dirpath for cb in trainer.checkpoint_callbacks if cb.dirpath})
    last = [cb.last_model_path for cb in trainer.checkpoint_callbacks
            if getattr(cb, "last_model_path", "") and Path(cb.last_model_path).exists()]
    print(f"\n== run {status} ==")
    print(f"outputs:     {cfg.paths.output_dir}  (console: run.log)")
    print(f"checkpoints: {', '.join(checkpoint_dirs) or '-'}{'  (last: ' + last[0] + ')' if last else ''}")
    print(f"mlflow run:  {logger.run_id if logger is not None and trainer.logger is logger else '- (fast_dev_run logs nothing)'}  experiment '{cfg.experiment_name}' at {cfg.logger.tracking_uri}")
    print(f"compare:     {tracking.ui_command(cfg.logger.tracking_uri)}")
    again = [o for o in _task_overrides() if not o.startswith("ckpt_path=")]
    if failure is not None:
        where = f" at step {trainer.global_step}" if cfg.task == "fit" else ""
        print(f"failed:      {type(failure).__name__}{where} (the message is below; the traceback in run.log)")
    todo = advice(failure)
    if not last:
        if failure is not None:
            print("resume:      nothing to resume (no checkpoint was written)" + (f"; {todo}" if todo else ""))
        return
    command = f"python experiments/run.py {' '.join(again)} ckpt_path={last[0]}"
    if todo is None:
        print(f"resume:      {command}")
    else:
        print(f"resume:      not as is: {todo}; then\n             {command}")


# -- the job ------------------------------------------------------------------------------------------------------
def threads_per_process(cfg: DictConfig, cores: int | None = None) -> int:
    """`cfg.threads`, capped so that the trainer's CPU processes on this machine do not share cores: 2 gloo
    processes x 2 threads on 2 cores made the FSDP quickstart ~20% slower than 2 x 1."""
    threads = int(cfg.threads)
    trainer = cfg.get("trainer") or {}
    devices = trainer.get("devices", 1)
    if trainer.get("accelerator") == "cpu" and isinstance(devices, int) and devices > 1:
        threads = min(threads, max(1, (cores or os.cpu_count() or 1) // devices))
    return threads


def run(cfg: DictConfig) -> float | None:
    """Run one job of the composed config; return `cfg.optimized_metric` (for sweepers) when set."""
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    threads_before = torch.get_num_threads()
    if cfg.get("threads"):
        torch.set_num_threads(threads_per_process(cfg))
    ckpt_path = resolve_ckpt_path(cfg)
    resume_meta = read_checkpoint_meta(ckpt_path) if ckpt_path else {}

    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data, _convert_="object")
    strategy, parallel = instantiate_strategy(cfg)
    if parallel is not None and parallel.meta_init and cfg.task in STANDARD_TASKS:
        # Networks that define init_weights() are built on the meta device and get their shards and values in
        # configure_model, after FSDP2 (lightning_modules/parallel.py). Custom tasks load weights into a plain
        # module outside the trainer, so they build it as usual.
        model_cfg = OmegaConf.create(meta_init_config(OmegaConf.to_container(cfg.model, resolve=True)))
        with meta_build_guard():
            module: L.LightningModule = hydra.utils.instantiate(model_cfg, _convert_="object")
    else:
        module = hydra.utils.instantiate(cfg.model, _convert_="object")
    module.parallel = parallel
    if ckpt_path:
        check_checkpoint_fits(ckpt_path, module)

    callbacks = instantiate_callbacks(cfg)
    # First, so that the training stream's random state and logging step are back before any other callback's
    # on_train_batch_start (e.g. the learning-rate monitor logs there).
    callbacks.insert(0, RunState(cfg.logger.tracking_uri, cfg.experiment_name))
    if ckpt_path:
        # A resumed run keeps writing next to the checkpoint it came from.
        for cb in callbacks:
            if isinstance(cb, ModelCheckpoint):
                cb.dirpath = str(Path(ckpt_path).parent)
    if cfg.trainer.get("enable_progress_bar", True) and not any(isinstance(cb, ProgressBarBase) for cb in callbacks):
        callbacks.append(ProgressBar())
    logger = make_logger(cfg, resume_meta, _sweep_parent_run_id())
    if logger is None:  # ranks > 0 have no logger, and LearningRateMonitor refuses to run without one
        callbacks = [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=logger if logger is not None else False, strategy=strategy
    )
    if logger is not None and trainer.logger is logger:  # fast_dev_run swaps in a dummy logger
        _log_config(logger, cfg, resuming=bool(resume_meta.get("run_id")))
    _rewrite_argv_for_ddp_children()

    launch_env = {k: os.environ.get(k) for k in DDP_LAUNCH_ENV}
    status, failure = "FAILED", None
    try:
        result = _run_task(cfg, trainer, module, datamodule, ckpt_path)
        status = "FINISHED"
    except BaseException as exc:
        failure = exc
        raise
    finally:
        if logger is not None and trainer.logger is logger:
            logger.flush()
            # only with a store in use: without one, mlflow would create its default ./mlflow.db
            mlflow.flush_async_logging()
        torch.set_num_threads(threads_before)  # the next job of an in-process sweep starts clean
        _print_summary(trainer, logger, cfg, status, failure)
        if _is_multirun():
            _reset_ddp_launch(launch_env)
    return result


# Set by Lightning's subprocess launcher in the parent process; a second job in the same process would read
# them as "ranks were started externally" and wait for children that never come.
DDP_LAUNCH_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _reset_ddp_launch(saved: dict[str, str | None]) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _run_task(cfg, trainer: L.Trainer, module, datamodule, ckpt_path: str | None) -> float | None:
    task = cfg.task
    metrics: dict[str, Any] = {}
    if task == "fit":
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics.update(trainer.callback_metrics)  # test() replaces callback_metrics; keep val/* for sweepers
        if cfg.test_after_fit and not trainer.interrupted and hasattr(module, "test_step"):
            trainer.test(module, datamodule=datamodule)
    elif task in ("validate", "test"):
        getattr(trainer, task)(module, datamodule=datamodule, ckpt_path=ckpt_path)
    else:
        if ckpt_path:
            module = _load_weights(module, ckpt_path)
            if task in EMA_TASKS and load_ema_weights(module, ckpt_path):
                print(f"[runner] task={task}: the EMA weights of {ckpt_path}")
        module.run_task(task, trainer, datamodule, cfg)
    metrics.update(trainer.callback_metrics)
    if cfg.get("optimized_metric"):
        if cfg.optimized_metric not in metrics:
            raise ConfigError(f"optimized_metric={cfg.optimized_metric} was not logged; logged: {sorted(metrics)}")
        return float(metrics[cfg.optimized_metric])
    return None


def _load_weights(module: L.LightningModule, ckpt_path: str) -> L.LightningModule:
    """The checkpoint's module weights (training weights; `_run_task` then puts the EMA in for EMA_TASKS)
    into the plain `module`, in this one process: a file, or a sharded folder
    written by any number of ranks. Names match with or without activation checkpointing's wrapper; a missing or
    unexpected tensor is an error."""
    by_plain = {_plain_name(k): k for k in module.state_dict()}
    try:
        stored = read_module_state(ckpt_path)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"ckpt_path={ckpt_path}: {exc}") from None
    missing = sorted(set(by_plain) - {_plain_name(k) for k in stored})
    unexpected = sorted(k for k in stored if _plain_name(k) not in by_plain)
    if missing or unexpected:
        raise ConfigError(f"ckpt_path={ckpt_path} does not match the model {type(module).__name__}: missing in "
                          f"checkpoint {missing[:8]}, not in the model {unexpected[:8]}")
    module.load_state_dict({by_plain[_plain_name(k)]: v for k, v in stored.items()})
    return module
