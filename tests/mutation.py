"""Mutation testing: plant one small bug at a time in a module and check that its tests fail.

    python tests/mutation.py lightning_modules/generative/guidance.py          # one module, its mapped tests
    python tests/mutation.py --all                                             # every module in MODULES
    python tests/mutation.py MODULE --tests tests/x.py tests/y.py --limit 20   # other tests, first 20 mutants
    python tests/mutation.py --all --jobs 2 --sample 40                        # 40 mutants a module, 2 at a time
    python tests/mutation.py MODULE --recheck                                  # rerun its stored survivors only

A mutant changes one site of the module's code (not its docstrings or error messages):
- arithmetic: + <-> -, * <-> /, ** -> *, unary minus dropped;
- comparisons: < <-> <=, > <-> >=, == <-> !=;
- boolean: and <-> or, `not x` -> x;
- numbers: an int n -> n + 1, a float x -> 2x (0.0 -> 1.0); True <-> False.
Each mutant runs the module's tests (`pytest -x`) in a private copy of the repository's tracked files, so the
working tree is never touched and other jobs keep running on the real code. A mutant is killed when the tests
fail (or time out), survived when they pass. The kill rate counts every mutant; a survivor is either a gap in the
tests or equivalent (no behaviour change): EQUIVALENT lists those, with why, and they are left out of the
"non-equivalent" rate. Results: a table, and JSON under experiments/benchmarks/results/mutation.json.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "benchmarks" / "results" / "mutation.json"

# The evaluator's metric tests without the probe's (a module fixture trains a probe for a minute; the metrics do
# not depend on it). Items after a test file go to pytest as they are.
EVALUATION_TESTS = ["tests/lightning_modules/test_evaluation.py", "-k", "not probe"]

#: The modules where a silent numeric bug would corrupt a result, and the tests that should catch it.
MODULES: dict[str, list[str]] = {
    # the generative maths
    "lightning_modules/generative/guidance.py": ["tests/lightning_modules/test_generative.py"],
    "lightning_modules/generative/multidiffusion.py": ["tests/lightning_modules/test_generative.py"],
    "lightning_modules/generative/timesteps.py": ["tests/lightning_modules/test_generative_schedules.py",
                                                  "tests/lightning_modules/test_generative.py"],
    "lightning_modules/generative/paths.py": ["tests/lightning_modules/test_generative_paths.py",
                                              "tests/lightning_modules/test_generative.py"],
    "lightning_modules/generative/solvers.py": ["tests/lightning_modules/test_generative_solvers.py",
                                                "tests/lightning_modules/test_generative.py"],
    # the privacy rules and accounting
    "lightning_modules/privacy/clipping.py": ["tests/privacy/test_update_rules.py"],
    "lightning_modules/privacy/optimizers.py": ["tests/privacy/test_update_rules.py", "tests/privacy/test_distributed.py"],
    "lightning_modules/privacy/accounting.py": ["tests/privacy/test_accounting.py"],
    "lightning_modules/privacy/sampling.py": ["tests/privacy/test_sampling_and_monitor.py"],
    "lightning_modules/privacy/decomposition.py": ["tests/privacy/test_decomposition.py"],
    # the fused norms (Triton, in the interpreter on CPU)
    "kernels/norms.py": ["tests/kernels/test_rms_norm.py"],
    # the loss functions
    "lightning_modules/tae_losses.py": ["tests/lightning_modules/test_tae_losses.py"],
    # the evaluator's metrics
    "lightning_modules/evaluation/frechet.py": EVALUATION_TESTS,
    "lightning_modules/evaluation/world_measures.py": EVALUATION_TESTS,
    "lightning_modules/evaluation/palette.py": EVALUATION_TESTS,
    # training state that silently changes results
    "lightning_modules/schedules.py": ["tests/lightning_modules/test_schedules.py"],
    "callbacks/ema.py": ["tests/callbacks/test_ema.py"],
}

#: Survivors that change nothing a caller can observe: (module, line, mutation) -> why.
EQUIVALENT: dict[tuple[str, int, str], str] = {
    ("lightning_modules/privacy/clipping.py", 25, "1e-12 -> 2e-12"):
        "_TINY only guards 0/0 for an exactly-zero gradient, whose factor multiplies 0 whatever it is",
    ("lightning_modules/privacy/optimizers.py", 144, "Gt -> GtE"):
        "std >= 0 also draws N(0, 0) = 0 when there is no noise: the same gradient",
    ("lightning_modules/privacy/optimizers.py", 145, "Add -> Sub"):
        "g - N(0, s^2) has the law of g + N(0, s^2): the noise is symmetric",
    ("lightning_modules/privacy/clipping.py", 92, "Add -> Sub"):
        "mean_ratio's guard mean + 1e-8: with mean 0 every ratio is 0 and 0 / (+-1e-8) = 0; otherwise 2e-8 is below "
        "any float32 ratio's resolution that matters (the 1.0 + ratio on this line is killed)",
    ("lightning_modules/privacy/clipping.py", 110, "Add -> Sub"):
        "c - N(0, s^2) has the law of c + N(0, s^2): the count noise is symmetric",
    ("lightning_modules/privacy/accounting.py", 115, "0 -> 1"):
        "epsilon()'s default extra_steps only multiplies per_step, whose default () adds no release",
    ("lightning_modules/privacy/accounting.py", 153, "Gt -> GtE"):
        "a bracket whose top spends exactly the target is doubled once more; the bisection then finds the same "
        "smallest sigma to rel_tol",
    ("lightning_modules/privacy/accounting.py", 161, "Gt -> GtE"):
        "the bisection takes one more step when the bracket is exactly rel_tol wide: the result is within rel_tol "
        "of the smallest sigma either way",
    ("lightning_modules/privacy/accounting.py", 152, "1.0 -> 2.0"):
        "the first top of the calibration's bracket: from 1 or 2 the doubling brackets the same smallest sigma and "
        "the bisection returns it to rel_tol",
    ("lightning_modules/privacy/accounting.py", 176, "2 -> 3"):
        "the budget search's first bracket top: from 2 or 3 the doubling keeps eps(lo) <= target < eps(hi) (or "
        "reaches the cap, checked itself), and the integer bisection finds the same largest affordable count",
    ("lightning_modules/privacy/accounting.py", 163, "LtE -> Lt"):
        "eps(mid) <= target vs <: only when eps(mid) equals the target exactly, and then the bisection keeps mid as "
        "lo instead of hi and still returns an affordable sigma within rel_tol of the smallest",
    ("lightning_modules/privacy/sampling.py", 41, "0 -> 1"):
        "PoissonBatchSampler's default seed: callers pass the run's seed; any default is as valid",
    ("lightning_modules/privacy/sampling.py", 45, "False -> True"):
        "DistributedSampler's own shuffle is never used: PoissonBatchSampler replaces __iter__",
    ("lightning_modules/privacy/sampling.py", 62, "Pow -> Mult"):
        "the seed of an epoch's masks is hash(...) mod 2**63; mod 126 is as deterministic and as independent of the "
        "step, only with more (unobservable) collisions between epochs",
    ("lightning_modules/privacy/sampling.py", 62, "63 -> 64"):
        "the modulus of the masks' seed: any large one gives a deterministic seed per (seed, epoch)",
    ("lightning_modules/privacy/sampling.py", 62, "0 -> 1"):
        "a constant in the hashed tuple (seed, epoch, 0): another constant is another, equally valid, seed",
    ("lightning_modules/privacy/sampling.py", 135, "0 -> 1"):
        "dataset[0] only gives an empty batch its structure (keys, shapes); dataset[1] has the same",
    ("lightning_modules/privacy/sampling.py", 64, "Lt -> LtE"):
        "rand() < q vs <= q differ only when a uniform float equals q exactly",
    ("lightning_modules/privacy/decomposition.py", 34, "1e-12 -> 2e-12"):
        "_EPS only guards a zero norm in a denominator (rho, cosine), whose numerator is then 0 too",
    ("lightning_modules/generative/multidiffusion.py", 26, "LtE -> Lt"):
        "length == window: range(0, 1, stride) gives the one span (0, window) = (0, length) anyway",
    ("lightning_modules/generative/timesteps.py", 84, "Lt -> LtE"):
        "of `0.0 < tau < 1.0` the first: tau = (S // 2) / N > 0 whenever S >= 2, the only case that reaches it",
    ("lightning_modules/tae_losses.py", 122, "drop USub"):
        "frames are [N, C, H, W]: shape[2:] is shape[-2:]",
    ("lightning_modules/tae_losses.py", 124, "drop USub"):
        "frames are [N, C, H, W]: diff along dim 2 is diff along dim -2 (the dim=-1 ones are killed)",
    ("lightning_modules/privacy/clipping.py", 97, "LtE -> Lt"):
        "of `total_clipped <= 0 or total <= 0` the second: with |B| = 0 and m > 0 the ratio divides by m/0 = inf, "
        "so the bound is C0 either way (the first is killed: m = 0 gives 0/0)",
    ("lightning_modules/schedules.py", 39, "True -> False"):
        "zip(strict=...) over the param groups and get_lr()'s list, one rate per group: always the same length",
    ("lightning_modules/schedules.py", 65, "LtE -> Lt"):
        "at a phase's end step the next phase starts at pct 0 from the same rate: the schedule is continuous",
    ("lightning_modules/schedules.py", 65, "Sub -> Add"):
        "the step is clamped to total_steps - 1, the last phase's end, so `step <= end` already picks the last phase",
    ("lightning_modules/schedules.py", 59, "Sub -> Add"):
        "a step clamped one or two past the end lies in the last phase, whose pct is clamped to 1: the same rate",
    ("lightning_modules/schedules.py", 66, "1.0 -> 2.0"):
        "min(1.0, pct): the chosen phase always has step <= end (the last: step <= total_steps - 1 = its end), so "
        "pct <= 1 without it (the other 1.0 on this line, a zero-length phase's pct, is killed)",
    ("kernels/norms.py", 37, "Lt -> LtE"):
        "the forward's weight mask: the one extra lane it loads (w[n_cols], one past the weight) only scales a "
        "y lane whose store is masked by `ok` (cols < n_cols)",
    ("kernels/norms.py", 39, "0.0 -> 1.0"):
        "the forward's padding value of w: padding lanes of y are never stored, and w does not enter the row's "
        "statistic",
    ("kernels/norms.py", 70, "0.0 -> 1.0"):
        "the backward's padding value of w: on padding lanes dy loads as 0, so g, g*n, dy*n*w are 0 whatever w is",
    ("kernels/norms.py", 79, "0.0 -> 1.0"):
        "the backward's padding value of x: on padding lanes dy loads as 0, so every sum (g*n, dw, ds) gets 0 there, "
        "and their dx lanes are not stored",
    ("kernels/norms.py", 80, "0.0 -> 1.0"):
        "the backward's rstd of a row past the sequence: its dy and x load as 0 (n = 0, g = 0) and nothing of it "
        "is stored",
    ("kernels/norms.py", 122, "0 -> 1"):
        "the strides returned for an absent scale/shift: the kernels never read them (HAS_S/HAS_T are False) and "
        "the per-row test checks `is not None` first",
    ("kernels/norms.py", 131, "4096 -> 4097"):
        "num_warps (8 from 4096 columns, else 4) only changes how a program is scheduled, not what it computes",
    ("kernels/norms.py", 179, "0 -> 1"):
        "the placeholder for an absent weight's partials: the kernel gets dx instead (HAS_W False) and dweight is "
        "x.new_empty(0) whatever it holds",
    ("callbacks/ema.py", 82, "1 -> 2"):
        "the initial _last_step, a marker for 'no step seen yet': on_train_start replaces it with the step the run "
        "starts from before any batch ends",
    ("callbacks/ema.py", 82, "drop USub"):
        "the same initial _last_step (-1 or 1): on_train_start replaces it before any batch ends",
    ("callbacks/ema.py", 70, "0 -> 1"):
        "the default start_step 0 or 1: the step a batch ends at is >= 1 once an optimizer step was taken (and a "
        "batch without one is skipped before the comparison), so both let every update through",
    ("lightning_modules/evaluation/world_measures.py", 101, "0.0 -> 1.0"):
        "a NaN move comes from a frame where the object is missing: that pair scores 0 (lost in one frame) or is "
        "skipped (empty in both, IoU NaN) whatever it is shifted by",
    ("lightning_modules/evaluation/world_measures.py", 251, "1e-09 -> 2e-09"):
        "the guard of a zero circle residual in line / residual: the ratio is only compared with 1.5, and 1e-9 vs "
        "2e-9 side could only matter for a line residual of 1.5e-9 - 3e-9 side, below a float32 centroid's "
        "resolution",
    ("lightning_modules/evaluation/world_measures.py", 275, "Gt -> GtE"):
        "the fall rule's thresholds (gravity > 0.6, speed_cv > 0.12) as >=: tuned cut-offs of fitted ratios, which "
        "differ only when a ratio equals the float threshold exactly",
    ("lightning_modules/evaluation/palette.py", 187, "Add -> Sub"):
        "of d2[:, k:k + n_bg] (the plain background colours): every background colour is an end of a gradient "
        "segment, never nearer than that segment, so the background minimum is the same without them (the other "
        "Add on this line is killed)",
    ("lightning_modules/evaluation/palette.py", 223, "Add -> Sub"):
        "_alphas' d[:, k:k + n_bg]: as on line 187, the gradient segments already reach every plain background "
        "colour (the other Add on this line is killed)",
    ("lightning_modules/evaluation/palette.py", 192, "1 -> 2"):
        "lru_cache(maxsize) of label_table(), which takes no arguments: one entry either way",
    ("lightning_modules/evaluation/palette.py", 200, "1 -> 2"):
        "lru_cache(maxsize) of alpha_table(), which takes no arguments: one entry either way",
    ("lightning_modules/evaluation/frechet.py", 34, "True -> False"):
        "reset_real_features only matters when a metric is reset and reused; frechet_distance builds a fresh one "
        "per call and computes it once",
    ("lightning_modules/evaluation/frechet.py", 68, "0 -> 1"):
        "an empty set as 1 row of zeros instead of 0 rows: every use needs 2 or more rows (and n = max(len, 2)), so "
        "0 and 1 row are treated alike",
}

SWAP_BINOP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.Pow: ast.Mult,
              ast.FloorDiv: ast.Mult}
SWAP_CMP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
            ast.NotEq: ast.Eq}


@dataclass
class Mutant:
    index: int
    line: int
    description: str
    outcome: str = ""  # killed | survived | timeout | equivalent
    seconds: float = 0.0


def _skipped_nodes(tree: ast.AST) -> set[int]:
    """Nodes not worth mutating: docstrings, error messages, annotations, f-strings."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Module):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                skip.update(id(n) for n in ast.walk(body[0]))
        if isinstance(node, ast.Raise | ast.JoinedStr | ast.Assert):
            skip.update(id(n) for n in ast.walk(node))
        for field in ("annotation", "returns"):
            sub = getattr(node, field, None)
            if isinstance(sub, ast.AST):
                skip.update(id(n) for n in ast.walk(sub))
    return skip


def _sites(tree: ast.AST) -> list[tuple[ast.AST, str]]:
    """Every mutable site, in a fixed order: (node, description)."""
    skip = _skipped_nodes(tree)
    sites = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.BinOp) and type(node.op) in SWAP_BINOP:
            sites.append((node, f"{type(node.op).__name__} -> {SWAP_BINOP[type(node.op)].__name__}"))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.Not):
            sites.append((node, f"drop {type(node.op).__name__}"))
        elif isinstance(node, ast.Compare) and type(node.ops[0]) in SWAP_CMP:
            sites.append((node, f"{type(node.ops[0]).__name__} -> {SWAP_CMP[type(node.ops[0])].__name__}"))
        elif isinstance(node, ast.BoolOp):
            sites.append((node, f"{type(node.op).__name__} -> {'Or' if isinstance(node.op, ast.And) else 'And'}"))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
            sites.append((node, f"{node.value!r} -> {_mutated_constant(node.value)!r}"))
    return sites


def _mutated_constant(value: int | float | bool) -> int | float | bool:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    return 2 * value if value else 1.0


class _Apply(ast.NodeTransformer):
    def __init__(self, target: ast.AST) -> None:
        self.target = target

    def visit(self, node: ast.AST) -> ast.AST:
        node = self.generic_visit(node)
        if node is not self.target:
            return node
        if isinstance(node, ast.BinOp):
            node.op = SWAP_BINOP[type(node.op)]()
        elif isinstance(node, ast.UnaryOp):
            return node.operand
        elif isinstance(node, ast.Compare):
            node.ops[0] = SWAP_CMP[type(node.ops[0])]()
        elif isinstance(node, ast.BoolOp):
            node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        elif isinstance(node, ast.Constant):
            node.value = _mutated_constant(node.value)
        return node


def mutants_of(source: str) -> list[tuple[Mutant, str]]:
    """(mutant, mutated source) for every site of `source`."""
    out = []
    for index in range(len(_sites(ast.parse(source)))):
        tree = ast.parse(source)  # a fresh tree per mutant: the transformer edits in place
        node, description = _sites(tree)[index]
        mutated = ast.unparse(ast.fix_missing_locations(_Apply(node).visit(tree)))
        out.append((Mutant(index, node.lineno, description), mutated))
    return out


def copy_tracked_files(destination: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def run_tests(workdir: Path, tests: list[str], timeout: float) -> str:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PROJECT_ROOT": str(workdir)}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout"
    return "survived" if done.returncode == 0 else "killed"


def evenly(items: list, count: int | None) -> list:
    """`count` items spread evenly over the list (all of them when count is None or larger): a sample of a
    module's mutants that covers the whole file, the same on every run."""
    if count is None or count >= len(items):
        return items
    return [items[(i * len(items)) // count] for i in range(count)]


def run_mutant(module: str, mutant: Mutant, source: str, path: Path, workdir: Path, tests: list[str],
               timeout: float) -> Mutant:
    """Plant one mutant in the working copy and run the tests: killed, survived, timeout or equivalent."""
    start = time.perf_counter()
    path.write_text(source)
    mutant.outcome = run_tests(workdir, tests, timeout)
    mutant.seconds = round(time.perf_counter() - start, 1)
    if mutant.outcome == "survived" and (module, mutant.line, mutant.description) in EQUIVALENT:
        mutant.outcome = "equivalent"
    print(f"  {module}:{mutant.line:<4} {mutant.description:<24} {mutant.outcome} ({mutant.seconds} s)", flush=True)
    return mutant


def mutate_module(module: str, tests: list[str], workdir: Path, limit: int | None, timeout: float,
                  sample: int | None = None) -> dict:
    path = workdir / module
    original = path.read_text()
    if run_tests(workdir, tests, timeout) != "survived":
        raise SystemExit(f"mutation: {' '.join(tests)} fail on the unmutated {module}; fix them first")
    results = []
    try:
        for mutant, source in evenly(mutants_of(original)[:limit], sample):
            results.append(run_mutant(module, mutant, source, path, workdir, tests, timeout))
    finally:
        path.write_text(original)
    return report(module, tests, len(mutants_of(original)), results, killed=0)


def report(module: str, tests: list[str], sites: int, results: list[Mutant], killed: int, mutants: int | None = None) -> dict:
    """A module's figures: `results` are the mutants run now; `killed` more were killed before (a recheck), out
    of `mutants` in all."""
    killed += sum(m.outcome in ("killed", "timeout") for m in results)
    mutants = len(results) if mutants is None else mutants
    equivalent = sum(m.outcome == "equivalent" for m in results)
    return {"module": module, "tests": tests, "sites": sites, "mutants": mutants, "killed": killed,
            "equivalent": equivalent, "kill_rate": killed / max(1, mutants),
            "kill_rate_non_equivalent": killed / max(1, mutants - equivalent),
            "survivors": [asdict(m) for m in results if m.outcome == "survived"],
            "equivalent_survivors": [{**asdict(m), "why": EQUIVALENT[(module, m.line, m.description)]}
                                     for m in results if m.outcome == "equivalent"]}


def recheck_module(module: str, tests: list[str], workdir: Path, previous: dict, timeout: float) -> dict:
    """Rerun only the survivors of `previous` (after new tests or EQUIVALENT entries); the mutants it killed stay
    killed. The module's source must be unchanged since (mutant indices are positions in it)."""
    path = workdir / module
    original = path.read_text()
    planted = mutants_of(original)
    results = []
    try:
        for old in previous["survivors"] + previous["equivalent_survivors"]:
            mutant, source = planted[old["index"]] if old["index"] < len(planted) else (None, "")
            if mutant is None or (mutant.line, mutant.description) != (old["line"], old["description"]):
                raise SystemExit(f"mutation: {module} changed since its run; run it whole again")
            results.append(run_mutant(module, mutant, source, path, workdir, tests, timeout))
    finally:
        path.write_text(original)
    return report(module, tests, len(planted), results, killed=previous["killed"], mutants=previous["mutants"])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help="module paths relative to the repository root")
    parser.add_argument("--all", action="store_true", help="every module in MODULES")
    parser.add_argument("--tests", nargs="+", help="test files (default: the module's entry in MODULES)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many mutants per module")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per test run (a timeout kills)")
    parser.add_argument("--sample", type=int, default=None,
                        help="at most this many mutants per module, spread evenly over the file")
    parser.add_argument("--recheck", action="store_true",
                        help="rerun only the survivors stored in --output (after adding tests or EQUIVALENT entries)")
    parser.add_argument("--jobs", type=int, default=1, help="modules mutated at the same time")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    modules = list(MODULES) if args.all else args.modules
    if not modules:
        parser.error("name a module or pass --all")
    for module in modules:
        if not (args.tests or MODULES.get(module)):
            parser.error(f"{module} has no tests in MODULES: pass --tests")

    lock = threading.Lock()

    def save(result: dict) -> None:
        # each module's result as soon as it is done (a long --all run that is stopped keeps what it measured)
        with lock:
            previous = json.loads(args.output.read_text()) if args.output.exists() else {}
            old = previous.get(result["module"], {})
            result["first_run"] = old.get("first_run") or {k: old.get(k, result[k]) for k in ("mutants", "killed", "kill_rate")}
            previous[result["module"]] = result
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(previous, indent=1))

    def one(module: str) -> dict:
        # each module in its own copy of the tracked files, so that modules can run side by side
        with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
            workdir = Path(tmp)
            copy_tracked_files(workdir)
            tests = args.tests or MODULES[module]
            print(f"{module}: mutants run {' '.join(tests)}", flush=True)
            if args.recheck:
                stored = json.loads(args.output.read_text()).get(module) if args.output.exists() else None
                if stored is None:
                    raise SystemExit(f"mutation: --recheck: {args.output} has no run of {module}")
                result = recheck_module(module, tests, workdir, stored, args.timeout)
            else:
                result = mutate_module(module, tests, workdir, args.limit, args.timeout, args.sample)
        save(result)
        return result

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # threads wait on pytest subprocesses
        reports = list(pool.map(one, modules))
    print(f"\n{'module':<46} {'mutants':>7} {'killed':>6} {'equiv':>5} {'kill rate':>9} {'non-equiv':>9}")
    for r in reports:
        print(f"{r['module']:<46} {r['mutants']:>7} {r['killed']:>6} {r['equivalent']:>5} {r['kill_rate']:>9.0%} "
              f"{r['kill_rate_non_equivalent']:>9.0%}")
    return reports


if __name__ == "__main__":
    main()
