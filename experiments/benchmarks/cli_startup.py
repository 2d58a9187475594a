"""How long the command line takes to answer when it runs no job: `list` and `--help` (target: under 2 s), beside
the time to import what a job needs (Lightning, torch, MLflow, the runner) and a config error that Hydra reports.

    python experiments/benchmarks/cli_startup.py [--repeats 5]

Each command runs in a fresh interpreter, as a user types it; the median and the range of `repeats` runs are
reported. Prints a table and writes experiments/benchmarks/results/cli_startup.json. A benchmark, not a test:
on a loaded machine the times grow, the ratios do not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "benchmarks" / "results"

COMMANDS = {
    "list": [sys.executable, "experiments/run.py", "list"],
    "--help": [sys.executable, "experiments/run.py", "--help"],
    "--help with overrides (Hydra's)": [sys.executable, "experiments/run.py", "experiment=quickstart", "--help"],
    "import experiments.runner (a job's imports)": [sys.executable, "-c", "import experiments.runner"],
    "unknown key (Hydra composition error)": [sys.executable, "experiments/run.py", "experiment=digits_classifier",
                                              "trainer.max_epochz=3"],
}


def time_command(command: list[str], repeats: int) -> list[float]:
    times = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, env=env, capture_output=True, check=False)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for name, command in COMMANDS.items():
        times = time_command(command, args.repeats)
        rows.append({"command": name, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)})
    width = max(len(r["command"]) for r in rows)
    print(f"{'command':<{width}}  median (s)  min (s)  max (s)")
    for r in rows:
        print(f"{r['command']:<{width}}  {r['median_s']:10.2f}  {r['min_s']:7.2f}  {r['max_s']:7.2f}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "cli_startup.json"
    out.write_text(json.dumps({"repeats": args.repeats, "cpus": os.cpu_count(), "load_1min": load,
                               "python": platform.python_version(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out} (load average {load})")


if __name__ == "__main__":
    main()
