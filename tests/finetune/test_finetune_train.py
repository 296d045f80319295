"""Finetuning on real smoke shards with the tiny random ViT: each mode lowers the loss, checkpoints reload
through open_clip, an interrupted run resumes to the same result, Ray Train runs with 2 CPU workers, and bad
input gives a one-line error."""

from __future__ import annotations

import json
import shutil

import open_clip
import pytest
import torch

from ovseg_mine.finetune import checkpoint as ckpt
from ovseg_mine.finetune.config import FinetuneConfigError, build_config
from ovseg_mine.finetune.data import PairDataset, make_loader, scan_shards
from ovseg_mine.finetune.mask_prompt import PROMPTS_FILE
from ovseg_mine.finetune.stage import ImageTower, batch_loss
from ovseg_mine.finetune.train import train_worker
from ovseg_mine.models import load_clip
from ovseg_mine.resources import register_clip_configs
from ovseg_mine.storage import resolve
from ovseg_mine.text import NounEmbeddings

from helpers.cli import run_cli
from helpers.runs import remark_shard
from helpers.s3 import upload

FAST = dict(batch_size=16, epochs=1, warmup_steps=0, loader_workers=0, log_every=1, prompt_depth=2)


def _fixed_batch(run, model):
    """The first 32 pairs, rendered without augmentation."""
    from ovseg_mine.models import clip_input_size, clip_mean_std

    mean, std = clip_mean_std(model)
    ds = PairDataset(scan_shards(run), size=clip_input_size(model), mean=mean, std=std, crop_scale=None)
    return next(iter(make_loader(ds, batch_size=32, workers=0)))


def _loss(model, prompts, batch):
    tokenizer = open_clip.get_tokenizer("ovseg-tiny-vit")
    cache = NounEmbeddings(model, tokenizer, "cpu")
    with torch.no_grad():
        return float(
            batch_loss(
                ImageTower(model.visual, prompts).eval(),
                cache,
                batch,
                float(model.logit_scale.exp()),
                torch.device("cpu"),
            )
        )


@pytest.mark.parametrize("mode", ["full", "prompt", "full+prompt"])
def test_each_mode_lowers_the_loss_and_reloads_through_open_clip(smoke_run, tmp_path, mode):
    out = tmp_path / "ft"
    cfg = build_config(shards=smoke_run, out=out, mode=mode, max_steps=6, lr=2e-3, prompt_lr=5e-2, **FAST)
    meta = train_worker(cfg)
    assert meta["complete"] and list(meta["stages"]) == cfg.stages
    assert all(s["steps"] == 6 for s in meta["stages"].values())
    assert all(s["betas"] == [0.9, 0.98] and s["eps"] == 1e-6 for s in meta["stages"].values())  # a ViT's
    assert [c["step"] for c in meta["curve"]] == [s for _ in cfg.stages for s in range(1, 7)]
    assert all({"loss", "lr", "samples_per_s"} <= set(c) for c in meta["curve"])
    assert meta["shards"]["config_hash"] == json.loads((smoke_run / "manifest.json").read_text())["config_hash"]
    assert not (out / ckpt.STATE_FILE).exists()

    base, _, _ = load_clip("ovseg-tiny-vit", "random", seed=0)
    batch = _fixed_batch(smoke_run, base)
    tuned, _tok, prompts, saved = ckpt.load_finetuned(out)
    assert saved["complete"] and (prompts is not None) == ("prompt" in mode)
    before, after = _loss(base, None, batch), _loss(tuned, prompts, batch)
    assert after < before - 0.01, (before, after)
    if mode == "prompt":  # towers frozen: the weights are the start weights
        pairs = zip(base.state_dict().values(), tuned.state_dict().values(), strict=True)
        assert all(torch.equal(a, b) for a, b in pairs)

    # open_clip's own loader reads the weights file and gives the same embeddings
    register_clip_configs()
    plain, _, _ = open_clip.create_model_and_transforms(
        saved["open_clip_arch"], pretrained=str(out / ckpt.WEIGHTS_FILE)
    )
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            plain.encode_image(batch["image"]), tuned.encode_image(batch["image"]), rtol=0, atol=0
        )
    if prompts is not None:
        prompts.remove()


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_weights(smoke_run, tmp_path):
    options = dict(shards=smoke_run, mode="full", max_steps=5, lr=1e-3, checkpoint_every=2, **FAST)
    train_worker(build_config(out=tmp_path / "straight", **options))

    def stop(record):
        if record["step"] == 3:
            raise KeyboardInterrupt

    cfg = build_config(out=tmp_path / "resumed", **options)
    with pytest.raises(KeyboardInterrupt):
        train_worker(cfg, on_step=stop)
    state = torch.load(tmp_path / "resumed" / ckpt.STATE_FILE, weights_only=True)
    assert state["step"] == 2
    assert {(g["betas"], g["eps"]) for g in state["optimizer"]["param_groups"]} == {((0.9, 0.98), 1e-6)}
    meta = train_worker(cfg)  # the same command again: resumes at step 2
    assert meta["complete"] and [c["step"] for c in meta["curve"]] == [1, 2, 3, 4, 5]
    from safetensors.torch import load_file

    a = load_file(tmp_path / "straight" / ckpt.WEIGHTS_FILE)
    b = load_file(tmp_path / "resumed" / ckpt.WEIGHTS_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert train_worker(cfg)["complete"]  # a third run finds it complete and returns


@pytest.mark.slow
def test_shards_and_output_on_object_storage(smoke_run, s3, tmp_path):
    """A multi-node finetune needs its shards and --out where every node reaches them: here a local S3 server
    (moto). Interrupted, it resumes from the state object; its outputs load back from the bucket."""
    from safetensors.torch import load_file

    shards = upload(smoke_run, f"{s3}/runs/smoke")
    options = dict(shards=shards, mode="full+prompt", max_steps=3, lr=1e-3, checkpoint_every=2, **FAST)
    cfg = build_config(out=f"{s3}/ft", **options)
    assert cfg.shards == shards and cfg.out == f"{s3}/ft"

    def stop(record):
        if record["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_worker(cfg, on_step=stop)
    assert resolve(f"{s3}/ft").join(ckpt.STATE_FILE).is_file()  # the resume state is an object of the bucket
    meta = train_worker(cfg)
    assert meta["complete"] and meta["shards"]["run"] == shards
    assert not resolve(f"{s3}/ft").join(ckpt.STATE_FILE).exists()
    model, _, prompts, loaded = ckpt.load_finetuned(f"{s3}/ft")
    assert loaded == json.loads(json.dumps(meta)) and prompts is not None
    local = train_worker(build_config(out=tmp_path / "local", **{**options, "shards": smoke_run}))
    with resolve(f"{s3}/ft").join(ckpt.WEIGHTS_FILE).local_file() as remote_weights:
        a, b = load_file(remote_weights), load_file(tmp_path / "local" / ckpt.WEIGHTS_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same training, wherever its data and output live
    full = [c["loss"] for c in meta["curve"]][:3]  # (the prompt stage's init draws from torch's global RNG, which a
    assert [c["loss"] for c in local["curve"]][:3] == full  # resume leaves in another state than a straight run)


@pytest.mark.slow
def test_init_continues_from_an_earlier_result(smoke_run, tmp_path):
    train_worker(build_config(shards=smoke_run, out=tmp_path / "a", mode="prompt", max_steps=2, **FAST))
    meta = train_worker(
        build_config(shards=smoke_run, out=tmp_path / "b", mode="prompt", max_steps=2, init=tmp_path / "a", **FAST)
    )
    assert meta["start"]["init"] == str(tmp_path / "a")
    assert meta["start"]["prompts"] == str(tmp_path / "a" / PROMPTS_FILE)
    assert (tmp_path / "b" / PROMPTS_FILE).is_file()


@pytest.mark.slow
def test_ray_train_with_two_cpu_workers(smoke_run, tmp_path):
    out = tmp_path / "ddp"
    result = run_cli(
        "finetune",
        "--shards",
        str(smoke_run),
        "--out",
        str(out),
        "--max-steps",
        "2",
        "--batch-size",
        "8",
        "--warmup-steps",
        "0",
        "--loader-workers",
        "0",
        "--log-every",
        "1",
        "--num-workers",
        "2",
        "--cpu",
        "--beta2",
        "0.99",
        "--eps",
        "1e-7",
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    meta = json.loads((out / ckpt.METADATA_FILE).read_text())
    assert meta["world_size"] == 2 and meta["complete"] and [c["step"] for c in meta["curve"]] == [1, 2]
    assert meta["stages"]["full"]["betas"] == [0.9, 0.99] and meta["stages"]["full"]["eps"] == 1e-7
    assert (meta["config"]["full"]["beta2"], meta["config"]["full"]["eps"]) == (0.99, 1e-7)
    assert "full: 2/2 steps" in result.stdout


def test_adamw_betas_and_eps_default_to_open_clip_train(tmp_path):
    cfg = build_config(shards=tmp_path, out=tmp_path / "o")
    assert cfg.full.adamw("ViT-L-14") == cfg.prompt.adamw("ovseg-tiny-vit") == {"betas": (0.9, 0.98), "eps": 1e-6}
    assert cfg.full.adamw("RN50") == {"betas": (0.9, 0.999), "eps": 1e-8}
    assert cfg.training_dict()["full"] == {"lr": 5e-6, "weight_decay": 0.2}  # defaults: the hash of older outputs
    given = build_config(shards=tmp_path, out=tmp_path / "o", beta1=0.8, eps=1e-5)
    assert given.full.adamw("RN50") == given.prompt.adamw("RN50") == {"betas": (0.8, 0.999), "eps": 1e-5}
    assert given.training_hash() != cfg.training_hash()
    with pytest.raises(FinetuneConfigError, match="beta2"):
        build_config(shards=tmp_path, out=tmp_path / "o", beta2=1.0)


def _fails(*args):
    result = run_cli(*args, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: ")
    return result.stderr


@pytest.mark.slow
def test_bad_input_is_a_one_line_error(smoke_run, tmp_path):
    import pyarrow.parquet as pq

    bad = tmp_path / "bad"
    shutil.copytree(smoke_run, bad)
    shard = sorted((bad / "shards").glob("*.parquet"))[0]
    table = pq.read_table(shard)
    meta = json.loads(table.schema.metadata[b"ovseg_mine"])
    pq.write_table(
        table.replace_schema_metadata({b"ovseg_mine": json.dumps({**meta, "schema_version": 99}).encode()}), shard
    )
    remark_shard(bad, int(shard.stem.split("-")[1]))  # committed as a future ovseg-mine would
    assert "schema version 99" in _fails("finetune", "--shards", str(bad), "--out", str(tmp_path / "o1"))

    empty = tmp_path / "empty"
    (empty / "shards").mkdir(parents=True)
    assert "holds no shard" in _fails("finetune", "--shards", str(empty), "--out", str(tmp_path / "o2"))

    err = _fails(
        "finetune",
        "--shards",
        str(smoke_run),
        "--out",
        str(tmp_path / "o3"),
        "--mode",
        "prompt",
        "--arch",
        "RN50",
        "--pretrained",
        "random",
    )
    assert "needs a ViT image tower" in err and "RN50" in err
    assert "--prompt-depth 2" in _fails(
        "finetune", "--shards", str(smoke_run), "--out", str(tmp_path / "o4"), "--mode", "prompt", "--max-steps", "1"
    )
    assert "none of the" in _fails(
        "finetune", "--shards", str(smoke_run), "--out", str(tmp_path / "o5"), "--images", str(tmp_path)
    )


def test_unreadable_resume_state_or_manifest_is_a_one_line_error(smoke_run, tmp_path):
    from ovseg_mine.finetune.data import DataError

    torch.save({"step": torch.tensor(1)}, tmp_path / "good.pt")
    (tmp_path / ckpt.STATE_FILE).parent.mkdir(parents=True)
    for content in (b"", b"not a checkpoint", (tmp_path / "good.pt").read_bytes()[:200]):
        (tmp_path / ckpt.STATE_FILE).write_bytes(content)
        with pytest.raises(ckpt.CheckpointError, match="cannot read the resume state") as err:
            ckpt.load_state(tmp_path)
        assert "\n" not in str(err.value) and err.value.__cause__ is not None
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    (run / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not a readable manifest"):
        scan_shards(run)


def test_missing_images_are_counted_and_skipped(smoke_run, tmp_path):
    images = tmp_path / "images"
    source = json.loads((smoke_run / "manifest.json").read_text())["source"]["image_root"]
    shutil.copytree(source, images)
    gone = sorted(images.iterdir())[0]
    gone.unlink()
    index = scan_shards(smoke_run, images)
    assert index.missing_images == [gone.name] and 0 < index.skipped_rows < index.rows
    meta = train_worker(build_config(shards=smoke_run, out=tmp_path / "o", images=images, max_steps=1, **FAST))
    assert meta["shards"]["missing_images"] == [gone.name] and meta["shards"]["skipped_rows"] == index.skipped_rows
