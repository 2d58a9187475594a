"""Training counts every sample a truncated tar loses (not one per tar), logs the final counts when fit ends and
prints one line saying how many samples were skipped and why."""

from __future__ import annotations

import tarfile
from pathlib import Path

import lightning as L
import pytest
import torch
from mlflow.tracking import MlflowClient

from callbacks.mlflow_logger import BufferedMLFlowLogger
from datamodules.shard_datamodule import skip_summary
from datamodules.video import VideoDataModule
from datamodules.write_shards import ShardSink
from tests.datamodules.helpers import video_sample

pytestmark = pytest.mark.usefixtures("one_thread")


def cut_shard(folder: Path, samples: int, cut_in: int) -> Path:
    """A shard of `samples` good clips written with its index.json, cut in the middle of clip `cut_in`'s mp4."""
    sink = ShardSink(folder, maxcount=samples)
    for i in range(samples):
        sink.write(video_sample(f"c{i}", i))
    sink.close()
    path = folder / "shard-000000.tar"
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name == f"c{cut_in}.mp4")
    path.write_bytes(path.read_bytes()[: member.offset_data + member.size // 2])
    return path


def test_a_tar_cut_mid_sample_counts_each_lost_sample(tmp_path: Path) -> None:
    cut_shard(tmp_path / "shards", samples=6, cut_in=3)  # c0, c1, c2 read; c3 cut; c3, c4, c5 lost
    dm = VideoDataModule(shards=str(tmp_path / "shards"), val_shards=str(tmp_path / "shards"), frames=[8],
                         sizes=[[32, 32]], batch_size=3, num_workers=0, val_batches=2, max_bad_fraction=1.0)
    dm.setup()
    loader = dm.val_dataloader()  # unshuffled: the shard's first pass, the cut, then its second pass
    assert [k for batch in loader for k in batch["key"]] == ["c0", "c1", "c2"] * 2
    m = loader.metrics()
    assert m["data/skipped/bad_shard"] == 3 and m["data/bad"] == 3 and m["data/seen"] == 9  # was 1 and 7


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch, batch_idx):
        return (self.w * batch["video"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_fit_logs_the_final_counts_and_prints_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cut_shard(tmp_path / "shards", samples=6, cut_in=3)
    dm = VideoDataModule(shards=str(tmp_path / "shards"), frames=[8], sizes=[[32, 32]], batch_size=3,
                         num_workers=0, epoch_batches=2, max_bad_fraction=1.0, seed=0)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = BufferedMLFlowLogger(experiment_name="bad_data", tracking_uri=uri, flush_every_s=0.0)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=logger, log_every_n_steps=1000,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Tiny(), datamodule=dm)
    # two batches of 3, each from one pass through the shard (shuffled through a buffer that holds a whole pass):
    # each pass reads 3 clips and loses 3 at the cut
    line = "data: skipped 6 of 12 training samples: 6 bad shard; bad_shard counts the samples lost in broken tars"
    assert line in capsys.readouterr().out
    client = MlflowClient(uri)
    history = client.get_metric_history(logger.run_id, "data/skipped/bad_shard")
    # every log_every_n_steps (1000: only step 0, the first batch's counts), then the final counts at the last step
    assert [(m.step, m.value) for m in history] == [(0, 3.0), (2, 6.0)]


def test_skip_summary_names_each_reason() -> None:
    metrics = {"data/seen": 56.0, "data/skipped": 14.0, "data/skipped/no_caption": 8.0, "data/skipped/undecodable": 6.0}
    assert skip_summary(metrics) == "data: skipped 14 of 56 training samples: 8 no caption, 6 undecodable"
    assert skip_summary({"data/seen": 56.0, "data/skipped": 0.0}) == "data: 56 training samples read, none skipped"
