"""open_clip's own trainer, unchanged (``python -m open_clip_train.main``), trains one epoch on CPU on 8 exported
pairs, from the CSV export and from the webdataset export, and writes its checkpoint, which ``evaluate --pretrained``'s
reader takes back. The model is the tiny test ViT handed to the trainer as an open_clip ``local-dir:`` folder
(config only: random initial weights)."""

from __future__ import annotations

import json
import subprocess
import sys

import open_clip
import pytest

from ovseg_mine.clip_loader import load_clip_model
from ovseg_mine.export.openclip_csv import export_csv
from ovseg_mine.export.pairs import PairFilter
from ovseg_mine.export.wds import export_webdataset
from ovseg_mine.resources import register_clip_configs


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    register_clip_configs()
    folder = tmp_path_factory.mktemp("tiny-model")
    config = {"model_cfg": open_clip.get_model_config("ovseg-tiny-vit")}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    return folder


def _train(data_args: list[str], model_dir, logs, name: str) -> None:
    cmd = [sys.executable, "-m", "open_clip_train.main", *data_args, "--model", f"local-dir:{model_dir}"]
    cmd += ["--batch-size", "4", "--epochs", "1", "--workers", "1", "--precision", "fp32", "--warmup", "1"]
    cmd += ["--lr", "1e-4", "--save-frequency", "1", "--logs", str(logs), "--name", name, "--report-to", ""]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Train Epoch: 0 [8/8 (100%)]" in done.stdout + done.stderr


@pytest.mark.slow  # two real trainer runs
@pytest.mark.parametrize("fmt", ["openclip-csv", "webdataset"])
def test_open_clip_train_runs_on_the_export(smoke_run, tiny_model_dir, tmp_path, fmt):
    out = tmp_path / "export"
    if fmt == "openclip-csv":
        result = export_csv(str(smoke_run), str(out), filt=PairFilter(limit=8))
        data = ["--train-data", str(out / "train.csv"), "--dataset-type", "csv", "--csv-img-key", "filepath"]
        data += ["--csv-caption-key", "title", "--train-num-samples", "8"]
    else:
        result = export_webdataset(str(smoke_run), str(out), filt=PairFilter(limit=8))
        data = ["--train-data", str(out / "shard-00000.tar"), "--dataset-type", "webdataset"]  # sizes.json: 8
    assert result.pairs == 8
    for arg in data[:4]:
        assert arg in result.command  # the printed command names the same data
    _train(data, tiny_model_dir, tmp_path / "logs", fmt)
    epoch = tmp_path / "logs" / fmt / "checkpoints" / "epoch_1.pt"
    assert epoch.is_file()
    loaded = load_clip_model("ovseg-tiny-vit", str(epoch))
    assert loaded.kind == "open_clip_train epoch" and loaded.prompts is None
