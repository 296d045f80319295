"""A finetune out to other tools and back: ``export --format open_clip`` writes open_clip_train's epoch file (with
OVSeg's ``visual.mask_embedding``); ``evaluate --arch --pretrained`` on it, and on an OVSeg-style detectron2 ``.pth``
built from it, gives the accuracies of ``evaluate --checkpoint``; ``finetune --init FILE`` continues from it;
``publish FINETUNE --dry-run`` writes a folder ``open_clip.create_model_and_transforms("local-dir:...")`` loads with
the finetune's exact weights."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import yaml
from safetensors.torch import load_file

from ovseg_mine.finetune import checkpoint as ckpt
from ovseg_mine.finetune.mask_prompt import PROMPTS_FILE

from helpers.cli import run_cli


@pytest.fixture(scope="module")
def exported(tiny_finetune, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "clip.pt"
    result = run_cli("export", str(tiny_finetune), "--format", "open_clip", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "mask prompts [2, 16, 64]" in result.stdout
    return out


def test_epoch_file_is_what_ovseg_replace_clip_takes(tiny_finetune, exported):
    blob = torch.load(exported, map_location="cpu", weights_only=True)
    assert set(blob) == {"epoch", "name", "state_dict"} and blob["epoch"] == 1
    state = blob["state_dict"]
    weights = load_file(tiny_finetune / ckpt.WEIGHTS_FILE)
    prompts = load_file(tiny_finetune / PROMPTS_FILE)["prompts"]
    assert set(state) == set(weights) | {"visual.mask_embedding"}
    assert all(torch.equal(state[k], weights[k]) for k in weights)
    assert torch.equal(state["visual.mask_embedding"], prompts) and prompts.shape == (2, 16, 64)


def _evaluate(sample, *args) -> dict:
    result = run_cli("evaluate", *args, "--gt", str(sample / "instances.json"), "--images", str(sample / "images"))
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout[result.stdout.index("{") :])["checkpoint"]


@pytest.mark.slow  # three real evaluate runs
def test_round_trip_gives_the_same_accuracy(tiny_finetune, exported, sample, tmp_path):
    ours = _evaluate(sample, "--checkpoint", str(tiny_finetune), "--limit", "6", "--json")
    theirs = _evaluate(sample, "--arch", "ovseg-tiny-vit", "--pretrained", str(exported), "--limit", "6", "--json")
    assert ours == theirs and ours["masks"] > 0
    # an OVSeg detectron2 checkpoint, as tools/ovseg_replace_clip.py writes it from the epoch file
    state = torch.load(exported, map_location="cpu", weights_only=True)["state_dict"]
    model = {"sem_seg_head.pixel_decoder.weight": torch.zeros(4)}
    model.update({f"clip_adapter.clip_model.{k}": v for k, v in state.items()})
    torch.save({"model": model, "iteration": 0}, tmp_path / "ovseg.pth")
    pth = str(tmp_path / "ovseg.pth")
    assert _evaluate(sample, "--arch", "ovseg-tiny-vit", "--pretrained", pth, "--limit", "6", "--json") == ours


@pytest.mark.slow
def test_bad_weights_are_one_line(sample, tmp_path, exported):
    state = torch.load(exported, map_location="cpu", weights_only=True)["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith("visual.transformer.resblocks.1.")}
    torch.save({"epoch": 1, "state_dict": state}, tmp_path / "other.pt")
    args = ["--gt", str(sample / "instances.json"), "--images", str(sample / "images")]
    result = run_cli("evaluate", "--arch", "ovseg-tiny-vit", "--pretrained", str(tmp_path / "other.pt"), *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "missing keys" in result.stderr, result.stderr
    result = run_cli("evaluate", "--pretrained", str(tmp_path / "other.pt"), *args)
    assert result.returncode == 2 and "--pretrained needs --arch" in result.stderr
    bad = run_cli("export", str(tmp_path), "--format", "open_clip", "--out", str(tmp_path / "x.pt"))
    assert bad.returncode == 2 and "not an ovseg-mine finetune output" in bad.stderr and "Traceback" not in bad.stderr


def test_finetune_init_from_an_epoch_file(smoke_run, exported, tmp_path):
    from ovseg_mine.finetune.config import build_config
    from ovseg_mine.finetune.train import train_worker

    cfg = build_config(
        shards=smoke_run, out=tmp_path / "more", mode="prompt", init=exported, max_steps=1, batch_size=8,
        epochs=1, warmup_steps=0, loader_workers=0, prompt_lr=1e-12,
    )  # fmt: skip
    meta = train_worker(cfg)
    assert meta["start"]["prompts"] == str(exported) and meta["start"]["weights"]["weights"] == "file"
    start = torch.load(exported, map_location="cpu", weights_only=True)["state_dict"]["visual.mask_embedding"]
    after = load_file(tmp_path / "more" / PROMPTS_FILE)["prompts"]
    torch.testing.assert_close(after, start, rtol=0, atol=1e-6)  # continued from the file's prompts (lr ~ 0)


@pytest.mark.slow
@pytest.mark.slow  # four real CLI runs
def test_publish_dry_run_loads_with_open_clip(tiny_finetune, sample, tmp_path):
    results = tmp_path / "evaluate.json"
    res = _evaluate(sample, "--checkpoint", str(tiny_finetune), "--limit", "2", "--json")
    results.write_text(json.dumps({"checkpoint": res}))
    out = tmp_path / "hub"
    done = run_cli("publish", str(tiny_finetune), "--dry-run", str(out), "--results", str(results))
    assert done.returncode == 0, done.stderr
    assert "randomly initialised" in done.stderr and "local-dir:" in done.stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "mask_prompts.safetensors", "open_clip_config.json", "open_clip_model.safetensors"]
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    weights = load_file(tiny_finetune / ckpt.WEIGHTS_FILE)
    own = model.state_dict()
    assert set(own) == set(weights) and all(torch.equal(own[k], weights[k]) for k in weights)
    meta = json.loads((tiny_finetune / ckpt.METADATA_FILE).read_text())
    assert preprocess.transforms[0].size == meta["preprocess"]["size"]
    card = (out / "README.md").read_text()
    head = yaml.safe_load(card.split("---\n")[1])
    assert head["library_name"] == "open_clip"
    body = card.split("---\n", 2)[2]
    assert body.startswith("> **Warning") and meta["shards"]["shards_id"] in body
    assert meta["shards"]["config_hash"] in body and f"{res['top1']}" in body and "[2, 16, 64]" in body

    refused = run_cli("publish", str(tiny_finetune), "--repo-id", "u/m", "--token", "hf_x")
    assert refused.returncode == 2 and "randomly initialised" in refused.stderr and "Traceback" not in refused.stderr
    again = run_cli("publish", str(tiny_finetune), "--dry-run", str(out))
    assert again.returncode == 2 and "not empty" in again.stderr
