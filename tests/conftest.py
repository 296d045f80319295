"""Shared fixtures: real COCO data from ../shared/data when present, else the bundled sample; one smoke run, one
tiny finetune and one run per source kind per session, shared by the tests that read them.

Tests are grouped as the code is (``mine/``, ``finetune/``, ``evaluate/``, ``export/``, ``inspect/``, ``publish/``,
``common/`` for the shared top-level modules); ``e2e/`` holds the end-to-end runs (resume, stop, cluster, object
storage, bad input through the CLI), every one of them marked ``slow`` here."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from ovseg_mine.resources import sample_dir

from helpers.cli import run_cli
from helpers.s3 import MotoServer
from helpers.sources import COCO_MINI


@pytest.fixture(scope="session")
def sample() -> Path:
    """The bundled 16-image COCO sample (images/, captions.json, instances.json)."""
    return sample_dir()


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    """../shared/data/coco-mini (79 val2017 images); tests that need it skip when it is absent."""
    if not (COCO_MINI / "annotations" / "captions_val2017.json").is_file():
        pytest.skip(f"coco-mini not found at {COCO_MINI}")
    return COCO_MINI


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """A run folder mined once per test session: the bundled 16-image sample, `smoke` recipe, 6 images per
    shard (3 shards). Read-only for tests: copy it before changing anything."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    result = run_cli("demo", "--pipeline", "smoke", "--out", str(out), "--set", "shards.images_per_shard=6")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "complete:" in result.stdout and "images/s" in result.stdout
    return out


E2E = Path(__file__).parent / "e2e"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under ``tests/e2e/`` slow: the default ``pytest -q`` leaves them out, ``-m slow`` runs them."""
    for item in items:
        if E2E in Path(item.fspath).parents:
            item.add_marker(pytest.mark.slow)


#: The config every source's run of the same 8 images uses (see ``mined_sources``), as ``--set`` overrides.
SOURCE_RUN_SETTINGS = ["source.captions_per_image=1", "shards.images_per_shard=3"]


@pytest.fixture(scope="session")
def coco8(tmp_path_factory) -> dict:
    """The first 8 images (by id) of coco-mini (the bundled sample when coco-mini is absent) and their captions:
    ``items`` (helpers.coco_items), ``captions`` (a COCO Captions JSON of just them), ``images``, ``instances``."""
    from helpers.sources import coco_items, write_coco_captions

    root = COCO_MINI if (COCO_MINI / "annotations" / "captions_val2017.json").is_file() else None
    if root is not None:
        captions, images = root / "annotations" / "captions_val2017.json", root / "val2017"
        instances = root / "annotations" / "instances_val2017.json"
    else:
        captions, images, instances = (
            sample_dir() / "captions.json",
            sample_dir() / "images",
            sample_dir() / "instances.json",
        )
    items = coco_items(captions, images, 8)
    dest = tmp_path_factory.mktemp("coco8") / "captions.json"
    return {"items": items, "captions": write_coco_captions(dest, items), "images": images, "instances": instances}


@pytest.fixture(scope="session")
def source_dirs(coco8, tmp_path_factory) -> dict[str, Path]:
    """The same 8 images as every kind of source, built with each format's own writer (helpers.build_*):
    ``hf_saved`` (save_to_disk, 2 Arrow files), ``hf_parquet`` (to_parquet, 3 files), ``webdataset`` (3 tars of
    3, 3, 2 samples), ``img2dataset_parquet`` and ``img2dataset_files`` (2 shards), ``folder`` (captions.jsonl),
    ``sa1b`` (SA-1B JSON of the COCO instance masks)."""
    from helpers.sources import build_folder, build_hf, build_img2dataset, build_sa1b, build_webdataset

    root = tmp_path_factory.mktemp("sources")
    items = coco8["items"]
    return {
        "hf_saved": build_hf(root / "hf_saved", items, arrow_shards=2),
        "hf_parquet": build_hf(root / "hf_parquet", items, parquet_files=3),
        "webdataset": build_webdataset(root / "webdataset", items, per_tar=3),
        "img2dataset_parquet": build_img2dataset(root / "i2d_parquet", items, layout="parquet", per_shard=5),
        "img2dataset_files": build_img2dataset(root / "i2d_files", items, layout="files", per_shard=5),
        "folder": build_folder(root / "folder", items),
        "sa1b": build_sa1b(root / "sa1b", coco8["instances"], items),
    }


#: name -> (--source, extra --set overrides, --proposals) of the runs ``mined_sources`` makes.
SOURCE_RUNS = {
    "coco": (None, [], None),
    "hf_saved": ("hf", ['source.id_column="image_id"'], None),
    "hf_parquet": ("hf", [], None),
    "webdataset": ("webdataset", [], None),
    "img2dataset_parquet": ("img2dataset", ['source.id_column="image_id"'], None),
    "img2dataset_files": ("img2dataset", ['source.id_column="image_id"'], None),
    "folder": ("folder", ['source.id_column="image_id"'], None),
    # Given masks; SAM's model type is made unloadable: these runs succeed only if SAM is never built.
    "coco_given_coco": (None, ['sam.model_type="no-such-sam"'], "coco"),
    "webdataset_given_sa1b": ("webdataset", ['sam.model_type="no-such-sam"', "sam.max_masks_per_image=3"], "sa1b"),
}


@pytest.fixture(scope="session")
def mined_sources(coco8, source_dirs, tmp_path_factory) -> dict[str, Path]:
    """Each run of :data:`SOURCE_RUNS` mined once per session, in this process, on one local Ray (started here
    and shut down before the tests run): ``smoke`` recipe, :data:`SOURCE_RUN_SETTINGS`. Read-only for tests."""
    from ovseg_mine.config import build_config
    from ovseg_mine.mine.run.driver import mine
    from ovseg_mine.mine.sources import MineInput
    from ovseg_mine.ray_session import init_ray, shutdown_ray

    root = tmp_path_factory.mktemp("mined")
    runs = {}
    started = init_ray(None)
    try:
        for name, (kind, extra, given) in SOURCE_RUNS.items():
            cfg = build_config("smoke", SOURCE_RUN_SETTINGS + extra)
            location = coco8["captions"] if kind is None else source_dirs[name.split("_given")[0]]
            proposals = {"coco": str(coco8["instances"]), "sa1b": str(source_dirs["sa1b"])}.get(given)
            images = coco8["images"] if kind is None else None
            what = MineInput(kind or "coco", str(location), images, given or "sam", proposals)
            mine(cfg, what, root / name)
            runs[name] = root / name
    finally:
        if started:
            shutdown_ray()
    return runs


@pytest.fixture(scope="session")
def smoke_stages():
    """``run(table, **overrides)``: record rows through the real stages after the read step (NounStage,
    decode_stage, MaskMatchStage, finalize_stage; smoke recipe, tiny random models, no Ray), as result dicts; the
    stages are built once per config."""
    from ovseg_mine.config import build_config
    from ovseg_mine.mine.graph.stages import MaskMatchStage, NounStage, decode_stage, finalize_stage
    from ovseg_mine.mine.graph.weights import resolve_weights
    from ovseg_mine.models import sam_input_size

    built: dict[tuple, tuple] = {}

    def run(table, *overrides: str) -> list[dict]:
        if overrides not in built:
            cfg = build_config("smoke", ["source.captions_per_image=1", *overrides])
            size = sam_input_size(cfg.sam.model_type) if cfg.proposals.kind == "sam" else None
            built[overrides] = (NounStage(cfg), size, MaskMatchStage(cfg, resolve_weights(cfg)))
        nouns, size, masks = built[overrides]
        return finalize_stage(masks(decode_stage(nouns(table), sam_input_size=size))).to_pylist()

    return run


@pytest.fixture(scope="session")
def moto_server():
    """One moto S3 server (its own process, 127.0.0.1) for the session."""
    server = MotoServer()
    yield server
    server.stop()


_buckets = itertools.count()


@pytest.fixture
def s3(moto_server, monkeypatch) -> str:
    """A fresh bucket on the session's moto server, its ``s3://`` URI; the standard AWS variables (endpoint,
    region, dummy credentials) are set for the test and the processes it starts."""
    for key, value in moto_server.env.items():
        monkeypatch.setenv(key, value)
    return moto_server.bucket(f"test-{next(_buckets)}")


@pytest.fixture(scope="session")
def tiny_finetune(smoke_run, tmp_path_factory) -> Path:
    """A finished ``full+prompt`` finetune of the tiny random ViT on ``smoke_run`` (2 steps per stage, prompt depth
    2): an output folder with weights, mask prompts and metadata. Read-only for tests."""
    from ovseg_mine.finetune.config import build_config
    from ovseg_mine.finetune.train import train_worker

    out = tmp_path_factory.mktemp("finetune") / "ft"
    cfg = build_config(
        shards=smoke_run,
        out=out,
        mode="full+prompt",
        max_steps=2,
        batch_size=16,
        epochs=1,
        warmup_steps=0,
        loader_workers=0,
        prompt_depth=2,
        lr=2e-3,
    )
    assert train_worker(cfg)["complete"]
    return out
