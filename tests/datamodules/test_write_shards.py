"""make_shards: a folder with good and bad files -> shards + index, skipped files listed; synthetic mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from datamodules.media import encode_frames, encode_image
from datamodules.shards import expand_shards, read_shard
from datamodules.write_shards import folder_to_shards, parse_size
from tests.datamodules.helpers import clip, wav

ROOT = Path(__file__).resolve().parents[2]


def _folder(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.mp4").write_bytes(clip(1))
    (root / "a.txt").write_text("a red clip\n")
    (root / "a.wav").write_bytes(wav())  # same stem: the soundtrack of a.mp4
    (root / "b.mov").write_bytes(encode_frames(np.full((4, 16, 16, 3), 90, np.uint8), 4, format="mov"))
    (root / "sub" / "c.png").write_bytes(encode_image(np.full((12, 20, 3), 200, np.uint8)))
    (root / "sub" / "c.txt").write_text("a grey picture")
    (root / "d.flac").write_bytes(wav())
    (root / "e.webm").write_bytes(encode_frames(np.zeros((3, 16, 16, 3), np.uint8), 6, format="webm"))
    (root / "metadata.csv").write_text("file,caption,camera\nd.flac,a beep,mic\nb.mov,a grey clip,cam\n")
    (root / "broken.mp4").write_bytes(b"\x00\x01" * 500)
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.mp4").write_text("this is text, not a video")
    (root / "readme.md").write_text("ignored: not media")
    return root


def test_make_shards_cli_writes_good_files_and_lists_bad_ones(tmp_path):
    source, output = _folder(tmp_path / "in"), tmp_path / "out"
    run = subprocess.run([sys.executable, str(ROOT / "experiments" / "make_shards.py"), f"input={source}",
                          f"output={output}", "maxcount=2", "progress=false"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    for bad in ("broken.mp4", "empty.jpg", "notes.mp4"):
        assert bad in run.stdout
    index = json.loads((output / "index.json").read_text())
    assert index["num_samples"] == 5 and index["num_shards"] == 3
    assert [s["num_samples"] for s in index["shards"]] == [2, 2, 1]
    assert {s["path"] for s in index["skipped"]} == {"broken.mp4", "empty.jpg", "notes.mp4"}
    assert all(s["reason"] for s in index["skipped"])
    assert index["stats"]["kinds"] == {"video": 3, "image": 1, "audio": 1} and index["stats"]["missing_captions"] == 1
    samples = {s["__key__"]: s for url in expand_shards(output) for s in read_shard(url)}
    assert set(samples) == {"a", "b", "sub__c", "d", "e"}
    a = json.loads(samples["a"]["json"])
    assert samples["a"]["txt"] == b"a red clip" and "wav" in samples["a"] and a["num_frames"] == 8
    assert (a["width"], a["height"], a["fps"]) == (32, 32, 8.0) and a["audio_rate"] == 8000
    b = json.loads(samples["b"]["json"])
    assert b["source"] == ["b.mov"] and b["camera"] == "cam" and samples["b"]["txt"] == b"a grey clip"
    d = json.loads(samples["d"]["json"])
    assert "flac" in samples["d"] and d["caption"] == "a beep" and d["audio_rate"] == 8000
    assert "txt" not in samples["e"]  # no caption: written, counted as missing (the loader skips it)


def test_folder_to_shards_by_size_and_sizes_parse(tmp_path):
    report = folder_to_shards(_folder(tmp_path / "in"), tmp_path / "out", maxsize="1", progress=False)
    assert report.index["num_shards"] == report.index["num_samples"] == 5
    assert "skipped 3 files" in report.summary()
    assert parse_size("2MB") == 2_000_000 and parse_size("1KiB") == 1024 and parse_size(5) == 5


def test_make_shards_synthetic_mode(tmp_path):
    world = "world.scenes=[2,1] world.stickers=[1,1] world.sizes=[[32,32]]"
    run = subprocess.run([sys.executable, str(ROOT / "experiments" / "make_shards.py"), "synthetic=true",
                          f"output={tmp_path}", *world.split(), "kinds=[scenes,stickers]", "progress=false"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    summary = json.loads((tmp_path / "world.json").read_text())
    assert summary["sets"] == {"scenes/train": 2, "scenes/val": 1, "stickers/train": 1, "stickers/val": 1}
    keys = [s["__key__"] for s in read_shard(str(tmp_path / "stickers" / "train" / "shard-000000.tar"))]
    assert keys == ["stickers-train-000000"]
