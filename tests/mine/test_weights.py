"""The driver resolves a run's weights without building SAM or CLIP (no model in the driver's memory)."""

from __future__ import annotations

import open_clip
import pytest

from ovseg_mine import models
from ovseg_mine.config import build_config
from ovseg_mine.mine.graph.weights import resolve_weights

from helpers.cli import run_cli


def test_weights_are_resolved_without_building_a_model(monkeypatch, tmp_path):
    def built(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(open_clip, "create_model", built)
    monkeypatch.setattr(models, "_SAM_BUILDERS", {name: built for name in models._SAM_BUILDERS})
    weights = resolve_weights(build_config("smoke"))
    assert weights.random and weights.sam_path is None and weights.clip_path is None and weights.clip_tag == {}
    assert weights.models["sam"]["name"] == "tiny" and weights.models["clip"]["name"] == "ovseg-tiny-vit"
    # A local checkpoint is checked for existence and hashed (its sha256 is recorded), still without a build.
    checkpoint = tmp_path / "sam.pth"
    checkpoint.write_bytes(b"not read here")
    weights = resolve_weights(build_config("smoke", [f"sam.checkpoint={checkpoint}"]))
    assert weights.sam_path == str(checkpoint) and weights.models["sam"]["sha256"]
    with pytest.raises(models.WeightsError, match="SAM checkpoint file not found"):
        resolve_weights(build_config("smoke", [f"sam.checkpoint={tmp_path / 'none.pth'}"]))


def test_actors_load_the_resolved_files_without_resolving_or_hashing_them_again(monkeypatch, tmp_path):
    """The driver resolves (and hashes) a local checkpoint once; an actor's load reads that file as it is: the
    same weights, no second resolve, no sha256. Relative paths become absolute (an actor's working folder is not
    the driver's)."""
    import torch

    from ovseg_mine.mine.graph.weights import load_models

    sam, _ = models.load_sam("tiny", "random", seed=3)
    torch.save(sam.state_dict(), tmp_path / "sam.pth")
    monkeypatch.chdir(tmp_path)
    cfg = build_config("smoke", ["sam.checkpoint=sam.pth"])
    weights = resolve_weights(cfg)
    assert weights.sam_path == str(tmp_path / "sam.pth") and weights.models["sam"]["weights"] == "file"
    given = build_config("smoke", ['proposals.kind="coco"'])
    given_weights = resolve_weights(given)
    assert given_weights.sam_path is None and "sam" not in given_weights.models

    def again(*args, **kwargs):
        raise AssertionError("resolved or hashed again")

    for name in ("resolve_sam_weights", "resolve_clip_weights", "sha256_file"):
        monkeypatch.setattr(models, name, again)
    monkeypatch.chdir("/")
    loaded, clip, tokenizer = load_models(cfg, weights, "cpu")
    state = loaded.state_dict()
    assert state.keys() == sam.state_dict().keys() and all(
        torch.equal(state[k], v) for k, v in sam.state_dict().items()
    )
    assert clip is not None and tokenizer is not None
    assert load_models(given, given_weights, "cpu")[0] is None  # given masks: SAM is not built


@pytest.mark.slow
def test_a_checkpoint_that_does_not_load_stops_the_run_with_the_loaders_message(tmp_path):
    """Not built in the driver, a checkpoint of the wrong kind is found by the actors: the run stops with one line
    that carries the loader's error, and exit code 2."""
    bad = tmp_path / "sam.pth"
    bad.write_bytes(b"not a checkpoint")
    result = run_cli(
        "demo", "--pipeline", "smoke", "--limit", "1", "--out", str(tmp_path / "run"), "--set", f"sam.checkpoint={bad}"
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and f"WeightsError: cannot read checkpoint {bad}" in error[0]
