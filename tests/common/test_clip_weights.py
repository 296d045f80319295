"""Reading other tools' CLIP weights (ovseg_mine.clip_weights) with the tiny random ViT: open_clip_train epoch files
(DDP's ``module.`` prefix), OVSeg detectron2 checkpoints, safetensors and plain state dicts load the same weights; a
mask embedding becomes mask prompts; a file of another architecture or no CLIP at all is one line with key counts."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from ovseg_mine.clip_loader import load_clip_model
from ovseg_mine.clip_weights import load_prompts_any, read_weights
from ovseg_mine.models import load_clip
from ovseg_mine.weights_info import WeightsError

ARCH = "ovseg-tiny-vit"


@pytest.fixture(scope="module")
def tiny():
    model, _, _ = load_clip(ARCH, "random", seed=3)
    return model


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_kind_loads_the_same_weights(tiny, tmp_path):
    state = tiny.state_dict()
    embedding = torch.randn(2, 16, 64)
    files = {
        "open_clip_train epoch": tmp_path / "epoch_3.pt",
        "ovseg detectron2": tmp_path / "ovseg.pth",
        "safetensors": tmp_path / "w.safetensors",
        "state dict": tmp_path / "plain.bin",
    }
    torch.save(
        {
            "epoch": 3,
            "name": "x",
            "state_dict": {f"module.{k}": v for k, v in state.items()} | {"module.visual.mask_embedding": embedding},
            "optimizer": {"state": {}, "param_groups": []},
        },
        files["open_clip_train epoch"],
    )
    model = {f"clip_adapter.clip_model.{k}": v for k, v in state.items()}
    model["sem_seg_head.predictor.weight"] = torch.zeros(3)
    model["clip_adapter.clip_model.visual.mask_embedding"] = embedding[:, :1]  # [depth, 1, width]: shared
    torch.save({"model": model, "iteration": 10}, files["ovseg detectron2"])
    save_file({k: v.contiguous() for k, v in state.items()}, files["safetensors"])
    torch.save(dict(state), files["state dict"])
    for kind, path in files.items():
        weights = read_weights(path)
        assert weights.kind == kind and set(weights.state) == set(state)
        loaded = load_clip_model(ARCH, str(path))
        assert loaded.kind == kind and loaded.info.weights == "file" and loaded.arch == ARCH
        assert _same(loaded.model, tiny)
        if kind == "open_clip_train epoch":
            torch.testing.assert_close(loaded.prompts.prompts.detach(), embedding, rtol=0, atol=0)
        elif kind == "ovseg detectron2":
            torch.testing.assert_close(loaded.prompts.prompts.detach(), embedding[:, :1].expand(2, 16, 64))
        else:
            assert loaded.prompts is None
        if loaded.prompts is not None:
            loaded.prompts.remove()
    plain, _, _ = load_clip(ARCH, str(files["open_clip_train epoch"]))  # finetune --pretrained FILE, mining
    assert _same(plain, tiny)
    prompts = load_prompts_any(files["open_clip_train epoch"], plain)  # finetune --init FILE
    torch.testing.assert_close(prompts.prompts.detach(), embedding, rtol=0, atol=0)
    with pytest.raises(WeightsError, match="no mask prompts"):
        load_prompts_any(files["safetensors"], plain)


def test_wrong_files_are_one_line(tiny, tmp_path):
    config = json.loads(json.dumps(open_clip.get_model_config(ARCH)))
    config["vision_cfg"]["width"] = 32  # another architecture: the same keys, other shapes, one block fewer
    config["vision_cfg"]["layers"] = 1
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "other-tiny.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "configs")
    other = open_clip.create_model("other-tiny")
    torch.save({"epoch": 1, "state_dict": other.state_dict()}, tmp_path / "other.pt")
    with pytest.raises(WeightsError) as err:
        load_clip_model(ARCH, str(tmp_path / "other.pt"))
    message = str(err.value)
    assert "\n" not in message and "open_clip_train epoch" in message
    assert "0 missing keys" not in message and "unexpected keys" in message and "shape mismatches" in message

    (tmp_path / "junk.pt").write_bytes(b"\x80\x02not really a pickle")
    with pytest.raises(WeightsError, match="cannot read"):
        read_weights(tmp_path / "junk.pt")
    torch.save({"model": {"backbone.conv.weight": torch.zeros(1)}}, tmp_path / "d2.pth")
    with pytest.raises(WeightsError, match="without clip_adapter.clip_model"):
        read_weights(tmp_path / "d2.pth")
    save_file({"prompts": torch.zeros(2, 16, 64)}, tmp_path / "mask_prompts.safetensors")
    with pytest.raises(WeightsError, match="mask prompts only"):
        read_weights(tmp_path / "mask_prompts.safetensors")
    with pytest.raises(WeightsError, match="not found"):
        read_weights(tmp_path / "missing.pt")
