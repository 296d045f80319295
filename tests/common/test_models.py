"""Weight resolution for SAM and open_clip: seeded random init, local checkpoint files, the published-checkpoint
cache (download made to fail or to return a given file, since tests have no network), and the error messages."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg_mine import models
from ovseg_mine.models import load_clip, load_sam
from ovseg_mine.weights_info import WeightsError, WeightsInfo


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    """An empty OVSEG_MINE_CACHE; returns the SAM subfolder the loaders must use."""
    monkeypatch.setenv("OVSEG_MINE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "sam"


@pytest.fixture()
def no_download(monkeypatch):
    def fail(url: str, dst: Path) -> None:
        raise OSError(f"no network in tests ({url})")

    monkeypatch.setattr(models, "_download", fail)


@pytest.fixture(scope="module")
def tiny_sam_file(tmp_path_factory) -> Path:
    sam, _ = load_sam("tiny", "random", seed=3)
    path = tmp_path_factory.mktemp("ckpt") / "tiny_sam.pth"
    torch.save(sam.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def coco_image(sample) -> np.ndarray:
    path = sorted((sample / "images").glob("*.jpg"))[0]
    return np.asarray(Image.open(path).convert("RGB"))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_listed_sam_model_builds():
    """Each model type of list_sam_models() builds its SAM, on the meta device (shapes only: no memory, no
    weights); the published ones at 1024 px with segment-anything's image encoders, each with a checkpoint."""
    encoders = {}
    for name in models.list_sam_models():
        with torch.device("meta"):
            sam, info = load_sam(name, "random", device="meta")
        assert info == WeightsInfo(name, "random", None, None)
        encoders[name] = (sam.image_encoder.img_size, sum(p.numel() for p in sam.image_encoder.parameters()))
    assert encoders["tiny"][0] == 256
    assert {encoders[n] for n in ("vit_b", "vit_l", "vit_h")} == {
        (1024, 89_670_912),
        (1024, 308_278_272),
        (1024, 637_026_048),
    }
    assert set(models._SAM_CHECKPOINTS) == set(models.list_sam_models()) - {"tiny"}


def test_sam_cache_dir_follows_env(cache):
    assert models.sam_cache_dir() == cache


def test_tiny_sam_random_is_seeded():
    a, info = load_sam("tiny", "random", seed=0)
    b, _ = load_sam("tiny", "random", seed=0)
    c, _ = load_sam("tiny", "random", seed=1)
    assert info == WeightsInfo("tiny", "random", None, None) and info.is_random
    assert info.to_dict() == {"name": "tiny", "weights": "random", "source": None, "sha256": None}
    assert _same(a, b) and not _same(a, c)
    assert a.image_encoder.img_size == 256 and not a.training


def test_tiny_sam_from_file(tiny_sam_file):
    ref, _ = load_sam("tiny", "random", seed=3)
    sam, info = load_sam("tiny", str(tiny_sam_file), seed=99)
    assert _same(sam, ref)
    assert info.weights == "file" and not info.is_random
    assert info.source == str(tiny_sam_file.resolve())
    assert info.sha256 == _sha256(tiny_sam_file)


def test_sam_corrupt_or_wrong_or_missing_file(tmp_path, tiny_sam_file):
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read checkpoint"):
        load_sam("tiny", str(bad), allow_random=True)  # an explicit path never falls back
    clip, _, _ = load_clip("ovseg-tiny-vit", "random")
    wrong = tmp_path / "clip.pt"
    torch.save(clip.state_dict(), wrong)
    with pytest.raises(WeightsError, match="does not fit SAM model_type 'tiny'.*missing keys"):
        load_sam("tiny", str(wrong))
    with pytest.raises(WeightsError, match="not found"):
        load_sam("tiny", str(tmp_path / "nope.pth"), allow_random=True)


def test_unknown_sam_model_type():
    with pytest.raises(ValueError, match="vit_q.*tiny, vit_b, vit_h, vit_l"):
        load_sam("vit_q", "random")


def test_sam_default_download_fails(cache, no_download):
    with pytest.raises(WeightsError) as err:
        load_sam("vit_b", "default", allow_random=False)
    message = str(err.value)
    assert str(cache) in message and "sam.checkpoint" in message and "sam_vit_b_01ec64.pth" in message


def test_sam_default_download_fails_falls_back_to_random(cache, no_download, caplog):
    with caplog.at_level(logging.WARNING, logger="ovseg_mine"):
        sam, info = load_sam("vit_b", "default", allow_random=True, seed=0)
    assert info.is_random and info.source is None
    warnings = [r for r in caplog.records if r.name == "ovseg_mine"]
    assert len(warnings) == 1 and "random" in warnings[0].getMessage().lower()
    assert "\n" not in warnings[0].getMessage()
    assert sam.image_encoder.img_size == 1024


def test_tiny_default_has_no_published_checkpoint(caplog):
    with pytest.raises(WeightsError, match="no published checkpoint.*sam.checkpoint"):
        load_sam("tiny", "default")
    with caplog.at_level(logging.WARNING, logger="ovseg_mine"):
        sam, info = load_sam("tiny", "default", allow_random=True, seed=0)
    ref, _ = load_sam("tiny", "random", seed=0)
    assert info.is_random and _same(sam, ref)
    assert len([r for r in caplog.records if r.name == "ovseg_mine"]) == 1


def test_sam_default_download_is_verified_cached_and_reused(cache, tiny_sam_file, monkeypatch):
    """The real download path with a tiny 'published' checkpoint: temp file, sha256 check, rename, reuse."""
    sha = _sha256(tiny_sam_file)
    monkeypatch.setitem(models._SAM_CHECKPOINTS, "tiny", ("sam_tiny_test.pth", sha, "0" * 32))
    calls = []

    def fake_download(url: str, dst: Path) -> None:
        calls.append(url)
        shutil.copyfile(tiny_sam_file, dst)

    monkeypatch.setattr(models, "_download", fake_download)
    sam, info = load_sam("tiny", "default")
    assert calls == ["https://dl.fbaipublicfiles.com/segment_anything/sam_tiny_test.pth"]
    assert info == WeightsInfo("tiny", "default", calls[0], sha)
    assert sorted(p.name for p in cache.iterdir()) == ["sam_tiny_test.pth"]
    sam2, info2 = load_sam("tiny", "default")  # from the cache: no second download
    assert len(calls) == 1 and info2 == info and _same(sam, sam2)


def test_sam_download_hash_mismatch(cache, monkeypatch):
    def garbage(url: str, dst: Path) -> None:
        dst.write_bytes(b"not the published checkpoint")

    monkeypatch.setattr(models, "_download", garbage)
    with pytest.raises(WeightsError, match="sha256 mismatch") as err:
        load_sam("vit_b", "default")
    assert str(cache) in str(err.value)
    assert list(cache.iterdir()) == []  # neither the temp file nor a bad checkpoint is left behind


def test_published_sam_table():
    for name, (fname, sha, md5) in models._SAM_CHECKPOINTS.items():
        assert fname == f"sam_{name}_{md5[:6]}.pth" and len(sha) == 64 and len(md5) == 32


def test_clip_random(coco_image):
    model, tokenizer, info = load_clip("ovseg-tiny-vit", "random", seed=0)
    again, _, _ = load_clip("ovseg-tiny-vit", "random", seed=0)
    other, _, _ = load_clip("ovseg-tiny-vit", "random", seed=1)
    assert info == WeightsInfo("ovseg-tiny-vit", "random", None, None)
    assert _same(model, again) and not _same(model, other) and not model.training
    assert models.clip_input_size(model) == 64
    mean, std = models.clip_mean_std(model)
    assert len(mean) == len(std) == 3 and all(0 < s < 1 for s in std)
    tokens = tokenizer(["a photo of a dog", "cat"])
    assert tuple(tokens.shape) == (2, 77)
    with torch.no_grad():
        assert tuple(model.encode_text(tokens).shape) == (2, 64)


def _pixels(image: np.ndarray, model) -> torch.Tensor:
    size = models.clip_input_size(model)
    mean, std = models.clip_mean_std(model)
    small = np.asarray(Image.fromarray(image).resize((size, size)), dtype=np.float32) / 255.0
    x = (torch.from_numpy(small) - torch.tensor(mean)) / torch.tensor(std)
    return x.permute(2, 0, 1)[None]


def test_clip_from_file(tmp_path, coco_image):
    ref, _, _ = load_clip("ovseg-tiny-vit", "random", seed=5)
    path = tmp_path / "tiny_clip.pt"
    torch.save(ref.state_dict(), path)
    model, _, info = load_clip("ovseg-tiny-vit", str(path), seed=123)
    assert _same(model, ref)
    assert info.weights == "file" and info.sha256 == _sha256(path) and info.source == str(path.resolve())
    x = _pixels(coco_image, model)
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), ref.encode_image(x))


def test_clip_corrupt_or_missing_file(tmp_path):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(WeightsError, match="does not load into open_clip 'ovseg-tiny-vit'"):
        load_clip("ovseg-tiny-vit", str(bad), allow_random=True)
    with pytest.raises(WeightsError, match="not found"):
        load_clip("ovseg-tiny-vit", str(tmp_path / "missing.pt"))


def test_clip_unknown_arch_or_tag():
    with pytest.raises(ValueError, match="list_models"):
        load_clip("ViT-Q-99", "random")
    with pytest.raises(ValueError, match="not a pretrained tag.*openai"):
        load_clip("ViT-B-16", "no-such-tag")


def test_clip_tag_from_open_clip_registry(tmp_path, monkeypatch):
    """A pretrained tag resolves through open_clip's registry ('file' entry: no network needed)."""
    import open_clip

    ref, _, _ = load_clip("ovseg-tiny-vit", "random", seed=7)
    path = tmp_path / "tiny_clip.pt"
    torch.save(ref.state_dict(), path)
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "ovseg-tiny-vit", {"testtag": {"file": str(path)}})
    model, _, info = load_clip("ovseg-tiny-vit", "testtag")
    assert _same(model, ref) and info == WeightsInfo("ovseg-tiny-vit", "testtag", str(path), _sha256(path))


@pytest.mark.parametrize(
    "tag_cfg",
    [{"hf_hub": "ovseg-mine/no-such-repo/"}, {"url": "https://openaipublic.azureedge.net/clip/models/0/none.pt"}],
)
def test_clip_tag_download_fails(monkeypatch, caplog, tag_cfg):
    """Real open_clip download path for a tag that cannot be fetched: a clear error, or the fallback."""
    import open_clip

    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "ovseg-tiny-vit", {"gone": tag_cfg})
    with pytest.raises(WeightsError, match="ovseg-tiny-vit/gone.*clip.pretrained=PATH"):
        load_clip("ovseg-tiny-vit", "gone")
    with caplog.at_level(logging.WARNING, logger="ovseg_mine"):
        model, _, info = load_clip("ovseg-tiny-vit", "gone", allow_random=True, seed=0)
    ref, _, _ = load_clip("ovseg-tiny-vit", "random", seed=0)
    assert info.is_random and _same(model, ref)
    assert len([r for r in caplog.records if r.name == "ovseg_mine"]) == 1
