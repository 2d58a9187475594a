"""Experiment files pick options and give deltas: no block of settings is copied from one experiment to another.

A shared block (a world, a callbacks set, trainer values) belongs in its group (conf/data/world/, conf/callbacks/,
conf/trainer/ ...), picked with `- override /<group>: <option>`.
"""

from __future__ import annotations

import re

from experiments.run import CONFIG_DIR

BLOCK = 4  # this many consecutive identical setting lines in two experiment files is a copied block
HEADER = re.compile(r"^\s*[^\s#:][^:#]*:\s*(#.*)?$")  # `key:` opening a mapping, no value


def setting_lines(text: str) -> list[str]:
    """The lines that set values, as written (indentation and trailing comments kept). Left out: blank and
    comment-only lines, bare `key:` headers (structure, not settings) and the defaults list (picking the same
    options is what experiments are for)."""
    lines, in_defaults = [], False
    for line in text.splitlines():
        line = line.rstrip()
        if in_defaults and (line.startswith((" ", "-")) or not line):
            continue
        in_defaults = line.startswith("defaults:")
        if in_defaults or not line.strip() or line.lstrip().startswith("#") or HEADER.match(line):
            continue
        lines.append(line)
    return lines


def repeated_blocks(files: dict[str, str], size: int = BLOCK) -> list[str]:
    """`a <-> b: lines` for every run of `size` consecutive setting lines that two files share."""
    seen: dict[tuple[str, ...], str] = {}
    found = []
    for name, text in files.items():
        lines = setting_lines(text)
        mine = {tuple(lines[i:i + size]) for i in range(len(lines) - size + 1)}
        for block in sorted(mine):
            if block in seen and seen[block] != name:
                found.append(f"{seen[block]} <-> {name}:\n  " + "\n  ".join(block))
            seen.setdefault(block, name)
    return found


def test_no_experiment_repeats_a_block_of_another() -> None:
    files = {p.name: p.read_text() for p in sorted((CONFIG_DIR / "experiment").glob("*.yaml"))}
    assert len(files) > 1
    found = repeated_blocks(files)
    assert not found, (f"blocks of {BLOCK}+ lines repeated across conf/experiment/ (move them to a config group and "
                       "pick it in the defaults list):\n" + "\n".join(found))


def test_the_check_finds_a_copied_block() -> None:
    block = "trainer:\n  max_epochs: -1\n  check_val_every_n_epoch: 5\n  num_sanity_val_steps: 0\n  gradient_clip_val: 1.0\n"
    a = "# @package _global_\ndefaults:\n  - override /trainer: cpu\n\nexperiment_name: a\n" + block
    b = "# @package _global_\ndefaults:\n  - override /trainer: cpu\n\nexperiment_name: b\n" + block.replace("1.0", "0.5")
    assert repeated_blocks({"a.yaml": a, "b.yaml": b}) == []  # 3 identical setting lines only
    found = repeated_blocks({"a.yaml": a, "c.yaml": "experiment_name: c\n" + block})
    assert len(found) == 1 and "a.yaml <-> c.yaml" in found[0] and "gradient_clip_val: 1.0" in found[0]
