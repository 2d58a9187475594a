"""conf/data/*.yaml for the media datamodules compose with the primary config and instantiate."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf.errors import MissingMandatoryValue

from datamodules.audio import AudioDataModule
from datamodules.image import ImageDataModule
from datamodules.video import AudioVideoDataModule, VideoDataModule

CONF = Path(__file__).resolve().parents[2] / "conf"
EXPECTED = {
    "synthetic_video": VideoDataModule,
    "synthetic_image": ImageDataModule,
    "synthetic_av": AudioVideoDataModule,
    "synthetic_audio": AudioDataModule,
    "synthetic_edits": VideoDataModule,
    "synthetic_stickers": VideoDataModule,
    "synthetic_identities": VideoDataModule,
}


def _data_config(name: str, tmp_path: Path, *overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name="train", overrides=[f"data={name}", f"paths.data_dir={tmp_path}", *overrides])
    return cfg.data


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_data_configs_instantiate(name, tmp_path):
    dm = instantiate(_data_config(name, tmp_path), _convert_="object")  # as experiments/runner.py does
    assert type(dm) is EXPECTED[name]
    assert dm.data_dir == tmp_path and dm.shards is None
    if name == "synthetic_edits":
        assert dm.world_kind == "edits" and dm.with_target and dm.with_masks


def test_user_shards_config_requires_shards(tmp_path):
    with pytest.raises((MissingMandatoryValue, ValueError), match="data.shards"):
        instantiate(_data_config("shards_video", tmp_path), _convert_="object")
    dm = instantiate(_data_config("shards_video", tmp_path, "data.shards='/data/clips-{000..009}.tar'"),
                     _convert_="object")
    assert dm.shards == "/data/clips-{000..009}.tar"
