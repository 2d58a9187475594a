"""The one entry point: `python experiments/run.py experiment=<name> [key=value ...]`.

    python experiments/run.py --help                 # config groups and their options
    python experiments/run.py list                   # the experiments
    python experiments/run.py experiment=digits_classifier trainer.max_epochs=3
    python experiments/run.py -m experiment=digits_classifier seed=0,1,2 model.optimizer.lr=1e-3,3e-3
    python experiments/run.py experiment=digits_classifier ckpt_path=last     # resume the newest run
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

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from experiments.runner import run  # noqa: E402

CONFIG_DIR = ROOT / "conf"

if not OmegaConf.has_resolver("mul"):
    OmegaConf.register_new_resolver("mul", lambda *xs: __import__("math").prod(int(x) for x in xs))


def list_experiments() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("list", "--list"):
        print("experiments (python experiments/run.py experiment=<name>):")
        print("\n".join(f"  {name}" for name in list_experiments()))
        sys.exit(0)
    main()
