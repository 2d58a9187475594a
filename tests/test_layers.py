"""The floors of the design hold: import-linter's layers contract in pyproject.toml (experiments > callbacks >
lightning_modules > datamodules | kernels), lazy imports inside functions included."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT

# The CLI of the interpreter running the tests (not whichever `lint-imports` is first on PATH); no cache, so the
# check reads the working tree as it is and leaves no cache folder behind.
LINT_IMPORTS = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def test_imports_only_go_down_the_floors() -> None:
    proc = subprocess.run([sys.executable, "-c", LINT_IMPORTS, "--no-cache"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"import-linter found imports that go up a floor:\n{report}"
    assert "Contracts: 1 kept, 0 broken." in report, report  # the floors contract was read and checked
