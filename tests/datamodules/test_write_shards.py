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
    for bad in ("broken.mp4", "empty.jpg", "notes.mp4", "e.webm"):
        assert bad in run.stdout
    index = json.loads((output / "index.json").read_text())
    assert index["num_samples"] == 4 and index["num_shards"] == 2
    assert [s["num_samples"] for s in index["shards"]] == [2, 2]
    assert {s["path"] for s in index["skipped"]} == {"broken.mp4", "empty.jpg", "notes.mp4", "e.webm"}
    assert all(s["reason"] for s in index["skipped"])
    assert index["stats"]["kinds"] == {"video": 2, "image": 1, "audio": 1} and index["stats"]["missing_captions"] == 0
    samples = {s["__key__"]: s for url in expand_shards(output) for s in read_shard(url)}
    assert set(samples) == {"a", "b", "sub__c", "d"}
    a = json.loads(samples["a"]["json"])
    assert samples["a"]["txt"] == b"a red clip" and "wav" in samples["a"] and a["num_frames"] == 8
    assert (a["width"], a["height"], a["fps"]) == (32, 32, 8.0) and a["audio_rate"] == 8000
    b = json.loads(samples["b"]["json"])
    assert b["source"] == ["b.mov"] and b["camera"] == "cam" and samples["b"]["txt"] == b"a grey clip"
    d = json.loads(samples["d"]["json"])
    assert "flac" in samples["d"] and d["caption"] == "a beep" and d["audio_rate"] == 8000
    # e.webm has no caption: left out under the default missing_caption=skip (see test_bad_media_folder)


def test_folder_to_shards_by_size_and_sizes_parse(tmp_path):
    report = folder_to_shards(_folder(tmp_path / "in"), tmp_path / "out", maxsize="1", progress=False,
                              missing_caption="empty")
    assert report.index["num_shards"] == report.index["num_samples"] == 5
    assert "skipped 3 of 8 media files" in report.summary() and report.empty_captions == ["e.webm"]
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


def partly_decodable_mp4(frames: int = 16) -> bytes:
    """An mp4 whose first frames decode and whose later ones do not: random bytes over the middle of its data."""
    rng = np.random.default_rng(0)
    data = bytearray(encode_frames(rng.integers(0, 255, size=(frames, 32, 32, 3), dtype=np.uint8), 8.0))
    start, end = data.find(b"mdat"), data.find(b"moov")
    cut = start + (end - start) // 2
    data[cut:cut + 400] = rng.integers(0, 255, 400, dtype=np.uint8).tobytes()
    return bytes(data)


def bad_media_folder(root: Path) -> Path:
    """Two good captioned clips, a partly decodable mp4, a clip without caption, a zero-byte mp4, a text file
    named .mp4 (not a video) and a file that is not media at all."""
    root.mkdir(parents=True)
    for name, seed in (("good1", 1), ("good2", 2), ("nocap", 3)):
        (root / f"{name}.mp4").write_bytes(clip(seed))
    (root / "good1.txt").write_text("a clip")
    (root / "good2.txt").write_text("another clip")
    (root / "partial.mp4").write_bytes(partly_decodable_mp4())
    (root / "partial.txt").write_text("breaks halfway")
    (root / "zero.mp4").write_bytes(b"")
    (root / "zero.txt").write_text("nothing here")
    (root / "notvideo.mp4").write_text("plain text in an .mp4")
    (root / "notvideo.txt").write_text("not a video")
    (root / "notes.pdf").write_bytes(b"%PDF-1.4")
    return root


def test_bad_media_folder_is_caught_where_it_enters(tmp_path):
    """Every frame is decoded (the first-frame probe admitted partial.mp4), the caption policy is named, and the
    summary counts each reason exactly."""
    source = bad_media_folder(tmp_path / "in")
    run = subprocess.run([sys.executable, str(ROOT / "experiments" / "make_shards.py"), f"input={source}",
                          f"output={tmp_path / 'out'}", "progress=false"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    first = run.stdout.splitlines()[0]
    assert first == ("wrote 2 samples in 1 shards; skipped 4 of 6 media files: 2 undecodable, 1 no caption, "
                     "1 zero length"), run.stdout
    assert "skipped partial.mp4: undecodable (frame 7 of 16 cannot be decoded (frames 1-6 can)" in run.stdout
    assert "ignored 1 files that are not media: notes.pdf" in run.stdout
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert {s["path"]: s["reason"] for s in index["skipped"]} == {
        "partial.mp4": "undecodable", "notvideo.mp4": "undecodable", "nocap.mp4": "no_caption", "zero.mp4": "zero_length"}
    assert index["missing_caption"] == "skip" and index["num_samples"] == 2

    empty = folder_to_shards(source, tmp_path / "empty", progress=False, missing_caption="empty")
    assert empty.index["num_samples"] == 3 and empty.empty_captions == ["nocap.mp4"]
    samples = {s["__key__"]: s for url in expand_shards(tmp_path / "empty") for s in read_shard(url)}
    assert samples["nocap"]["txt"] == b""

    fail = subprocess.run([sys.executable, str(ROOT / "experiments" / "make_shards.py"), f"input={source}",
                           f"output={tmp_path / 'fail'}", "progress=false", "missing_caption=fail"],
                          capture_output=True, text=True, timeout=300)
    assert fail.returncode == 1 and "Traceback" not in fail.stderr
    assert fail.stderr.strip() == ("error: nocap.mp4: no caption (nocap.txt beside it or a caption in the metadata "
                                   "table); add one, or set missing_caption=skip or missing_caption=empty")
