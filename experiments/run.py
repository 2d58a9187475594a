"""The one entry point: `python experiments/run.py experiment=<name> [key=value ...]`.

    python experiments/run.py --help                 # config groups and their options
    python experiments/run.py list                   # the experiments
    python experiments/run.py experiment=digits_classifier trainer.max_epochs=3
    python experiments/run.py -m experiment=digits_classifier seed=0,1,2 model.optimizer.lr=1e-3,3e-3
    python experiments/run.py experiment=digits_classifier ckpt_path=last     # resume the newest run

Each job's console is recorded in `run.log` in its output folder. An error that is the user's to fix (a config
value, a data file, a resume path, a non-finite loss) prints one message naming what is wrong, without a
traceback (which goes to run.log); an internal error prints its traceback (`experiments/console.py`).
Lightning, torch and MLflow are imported only when a job runs, so `list` and `--help` answer at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))
# Outputs, data and the MLflow store live under the project, whatever the working directory (conf/paths).
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

CONFIG_DIR = ROOT / "conf"


def register_resolvers() -> None:
    """The config's own resolvers (e.g. `${mul:a,b}`); also for in-process composition (experiments/compose.py)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("mul"):
        OmegaConf.register_new_resolver("mul", lambda *xs: __import__("math").prod(int(x) for x in xs))
    if not OmegaConf.has_resolver("add"):
        OmegaConf.register_new_resolver("add", lambda *xs: sum(int(x) for x in xs))
    if not OmegaConf.has_resolver("div"):
        OmegaConf.register_new_resolver("div", lambda a, b: int(a) // int(b))
    if not OmegaConf.has_resolver("run_folder"):
        OmegaConf.register_new_resolver("run_folder", run_folder_name, use_cache=True)
    if not OmegaConf.has_resolver("cpu_precision"):
        OmegaConf.register_new_resolver("cpu_precision", cpu_precision, use_cache=True)


def cpu_precision() -> str:
    """`${cpu_precision:}`, a CPU run's `trainer.precision`: "bf16-mixed" where the CPU's bfloat16 matmuls are fast
    (AMX or AVX512-BF16: `lightning_modules.optimizers.fast_bfloat16`), else "32-true" (elsewhere bfloat16 is
    emulated and ~30x slower)."""
    import torch

    from lightning_modules.optimizers import fast_bfloat16

    return "bf16-mixed" if fast_bfloat16(torch.device("cpu")) else "32-true"


def run_folder_name() -> str:
    """A run's folder name (conf/hydra): its start time, then the process id, so that two runs of one experiment
    started in the same second write two folders (one would otherwise version the other's `last.ckpt` as
    `last-v1.ckpt`). The processes of a torchrun job (RANK set) keep the time alone: they share one folder."""
    from datetime import datetime

    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return stamp if "RANK" in os.environ else f"{stamp}_{os.getpid()}"


def list_experiments() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def config_groups() -> dict[str, list[str]]:
    """Config group -> its options, read from conf/ (Hydra's own --help composes the config ~250 times: seconds)."""
    groups: dict[str, list[str]] = {}
    for folder in sorted(p for p in CONFIG_DIR.rglob("*") if p.is_dir()):
        name = folder.relative_to(CONFIG_DIR).as_posix()
        options = sorted(f.stem for f in folder.glob("*.yaml"))
        if options and name.split("/")[0] not in ("hydra", "local"):
            groups[name] = options
    return groups


HELP = """run.py: run an experiment (Hydra + Lightning + MLflow).

  python experiments/run.py experiment=<name> [key=value ...]     train (then test) and log to MLflow
  python experiments/run.py list                                   the experiments
  python experiments/run.py experiment=<name> ckpt_path=last       resume the newest run of an experiment
  python experiments/run.py -m experiment=<name> seed=0,1,2        a sweep: one MLflow parent run, a child per job
  python experiments/run.py experiment=<name> --cfg job            the composed config (add --resolve)
  python experiments/run.py --hydra-help                           Hydra's own options

== Configuration groups ==
Compose your configuration from those groups (group=option)

{groups}

Override any value of the config (foo.bar=value); a key that does not exist is an error that names it.
"""


def print_help() -> None:
    groups = "\n".join(f"{name}: {', '.join(options)}" for name, options in config_groups().items())
    print(HELP.format(groups=groups))


def _is_rank_zero() -> bool:
    """Whether this process is rank 0 (DDP children of this process write through its console already)."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def main() -> None:
    import hydra
    from omegaconf import DictConfig


    register_resolvers()

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
    def job(cfg: DictConfig) -> float | None:
        return run_job(cfg)

    job()


def run_job(cfg) -> float | None:
    """One job with its console recorded to <output dir>/run.log; user errors told in one line."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from experiments import console

    output_dir = Path(HydraConfig.get().runtime.output_dir)
    with console.record(output_dir / "run.log") if _is_rank_zero() else _nothing() as recording:
        try:
            from experiments.runner import run  # here, not at the top: `list` and `--help` need no Lightning

            return run(cfg)
        except BaseException as exc:
            message = console.user_error(exc) if isinstance(exc, Exception) else None
            if recording is not None:
                recording.file_only(console.format_traceback(exc))
            if message is None:
                raise  # an internal error: Hydra prints its traceback
            print(f"error: {message}", file=sys.stderr)
            if HydraConfig.get().mode == RunMode.MULTIRUN:
                raise  # the sweep decides whether to go on
            raise SystemExit(1) from None


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("list", "--list"):
        print("experiments (python experiments/run.py experiment=<name>):")
        print("\n".join(f"  {name}" for name in list_experiments()))
        sys.exit(0)
    if sys.argv[1:] in (["--help"], ["-h"]):  # with overrides, Hydra's help shows their composed config
        print_help()
        sys.exit(0)
    main()
