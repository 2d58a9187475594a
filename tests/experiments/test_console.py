"""run.log records a job's console (prints, logging, warnings), a live progress bar only in its last state; run
names are unique; `list` and `--help` need no Lightning."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

from experiments.console import record
from experiments.tracking import unique_run_name
from tests.helpers import ROOT


def test_run_log_records_the_console(tmp_path: Path, capsys) -> None:
    handler = logging.StreamHandler(sys.stderr)  # created before the recording, as Lightning's is
    logger = logging.getLogger("test_console_recording")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with record(tmp_path / "run.log") as recording:
            print("a line")
            logger.warning("a logged line")
            sys.stderr.write(warnings.formatwarning("a warning", UserWarning, "x.py", 1))  # what warn() prints
            for i in range(1, 4):  # a tqdm-style bar: the same line redrawn
                sys.stderr.write(f"\rEpoch 0: {i}/3")
            sys.stderr.write("\n")
            print("\x1b[1mbold\x1b[0m text")
            recording.file_only("a traceback for the file only")
    finally:
        logger.removeHandler(handler)
    seen = capsys.readouterr()
    assert "a line" in seen.out and "a logged line" in seen.err and "\rEpoch 0: 2/3" in seen.err
    assert "a traceback" not in seen.out + seen.err
    text = (tmp_path / "run.log").read_text()
    lines = text.splitlines()
    assert lines[:2] == ["a line", "a logged line"]
    assert "UserWarning: a warning" in text
    assert "Epoch 0: 3/3" in lines and "Epoch 0: 1/3" not in text  # the bar's last state only
    assert "bold text" in lines and "\x1b" not in text
    assert lines[-1] == "a traceback for the file only"
    assert sys.stdout is not None and handler.stream is sys.stderr  # everything put back


def test_run_names_differ_for_the_same_experiment() -> None:
    names = {unique_run_name("quickstart") for _ in range(20)}
    assert len(names) == 20 and all(n.startswith("quickstart-") for n in names)


def test_list_and_help_import_no_lightning() -> None:
    code = ("import runpy, sys; sys.argv = ['run.py', '--help']\n"
            "try:\n    runpy.run_path('experiments/run.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "assert 'lightning' not in sys.modules and 'torch' not in sys.modules, 'heavy import'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    experiments = next(line for line in proc.stdout.splitlines() if line.startswith("experiment: "))
    assert "digits_classifier" in experiments.split(": ", 1)[1].split(", ")
