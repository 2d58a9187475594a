"""The stickers benchmark's ensemble figures from a labels.csv: per-teacher kept share and per-pair pass rate, with a
person's label winning over the judges."""

from __future__ import annotations

from pathlib import Path

from experiments.benchmarks.stickers import ensemble_rates


def test_ensemble_rates_count_pairs_and_labels(tmp_path: Path) -> None:
    rows = [  # key, teacher, judge_pass, keep
        ("middle-pool000-s0", "middle", 1, ""),
        ("middle-pool000-s1", "middle", 0, ""),
        ("middle-pool001-s0", "middle", 0, "keep"),   # a person keeps what the judges rejected
        ("middle-pool001-s1", "middle", 0, ""),
        ("first-pool000-s0", "first", 1, "no"),       # ... and rejects what they kept
        ("first-pool000-s1", "first", 0, ""),
        ("first-pool001-s0", "first", 0, ""),
        ("first-pool001-s1", "first", 0, ""),
        ("first-pool002-s0", "first", 0, ""),
        ("middle-pool002-s0", "middle", 0, ""),
    ]
    path = tmp_path / "labels.csv"
    path.write_text("key,teacher,prompt,judge_pass,motion,keep\n"
                    + "".join(f"{k},{t},a prompt,{p},0.1,{keep}\n" for k, t, p, keep in rows), encoding="utf-8")
    rates = ensemble_rates(path)
    assert rates["teachers"] == {"middle": 2 / 5, "first": 0 / 5}
    assert rates["pairs"] == 3 and rates["ensemble_per_pair"] == 2 / 3  # pool000 and pool001 have a kept clip
    assert rates["kept_clips"] == 2 and rates["clips"] == 10
