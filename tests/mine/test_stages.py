"""The Ray stages called directly (no Ray): decode -> mask/match -> finalize on real COCO images, with the smoke
recipe's tiny random models; statuses, pair rows that follow the shard contract, the image failpoint."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pytest

from ovseg_mine import rle
from ovseg_mine.config import MineConfig, build_config
from ovseg_mine.mine.graph.dataset import plan_stages
from ovseg_mine.mine.graph.rows import decoded_schema, image_result_schema
from ovseg_mine.mine.graph.stages import MaskMatchStage, decode_stage, finalize_stage
from ovseg_mine.mine.graph.weights import resolve_weights


@pytest.fixture(scope="module")
def config() -> MineConfig:
    return build_config("smoke", ["sam.points_per_side=3"])


@pytest.fixture(scope="module")
def rows(sample, tmp_path_factory) -> list[dict]:
    images = sorted((sample / "images").glob("*.jpg"))[:2]
    folder = tmp_path_factory.mktemp("images")
    for path in images:
        shutil.copy(path, folder / path.name)
    base = {"width": 640, "height": 480, "captions": ["A dog on a bed."], "nouns_s": 0.01}
    return [
        {**base, "image_id": 1, "file_name": images[0].name, "path": str(folder / images[0].name)},
        {**base, "image_id": 2, "file_name": images[1].name, "path": str(folder / images[1].name)},
        {**base, "image_id": 3, "file_name": "missing.jpg", "path": str(folder / "missing.jpg")},
        {**base, "image_id": 4, "file_name": images[0].name, "path": str(folder / images[0].name)},
    ]


def _with_nouns(rows: list[dict]) -> pa.Table:
    nouns = [["dog", "bed"], ["man"], ["cat"], []][: len(rows)]
    return pa.Table.from_pylist(
        [{**r, "nouns": n, "noun_caption_index": [0] * len(n)} for r, n in zip(rows, nouns, strict=True)]
    )


def test_decode_mine_finalize(config, rows):
    decoded = decode_stage(_with_nouns(rows), sam_input_size=256)
    assert decoded.schema == decoded_schema()
    got = decoded.to_pylist()
    assert [r["status"] for r in got] == ["ok", "ok", "decode", "nouns"]
    assert got[2]["reason"] == "file not found" and got[3]["reason"] == "no visual noun in the captions"
    first = got[0]
    assert len(first["pixels"]) == first["width"] * first["height"] * 3
    assert max(first["sam_height"], first["sam_width"]) == 256 and first["decode_s"] > 0
    assert first["nouns_s"] == 0.01 and first["pixels"] and not got[2]["pixels"]
    matched = MaskMatchStage(config, resolve_weights(config))(decoded)
    assert "pixels" not in matched.column_names
    results = finalize_stage(matched)
    assert results.schema == image_result_schema()
    out = results.to_pylist()
    assert [r["status"] for r in out] == ["ok", "ok", "decode", "nouns"]
    assert [len(r["pairs"]) for r in out] == [2, 1, 0, 0]
    for row in out[:2]:
        assert row["num_proposals"] > 0 and row["proposals_s"] > 0 and row["clip_s"] > 0
        for pair in row["pairs"]:
            mask = rle.decode(pair["mask"])
            assert mask.shape == (pair["height"], pair["width"]) == (row["height"], row["width"])
            assert int(mask.sum()) == pair["area"] > 0
            assert [int(v) for v in rle.bbox(pair["mask"])] == pair["bbox"]
            assert pair["pair_id"] == f"{row['image_id']}:{pair['noun']}" and pair["caption"] == "A dog on a bed."
            assert 0 <= pair["proposal_index"] < pair["num_proposals"] == row["num_proposals"]


def test_an_image_that_raises_is_one_error_row(config, rows, monkeypatch):
    monkeypatch.setenv("OVSEG_MINE_FAILPOINTS", "image:2=raise")
    decoded = decode_stage(_with_nouns(rows[:2]), sam_input_size=256)
    out = finalize_stage(MaskMatchStage(config, resolve_weights(config))(decoded)).to_pylist()
    assert out[0]["status"] == "ok" and len(out[0]["pairs"]) == 2
    assert out[1]["status"] == "error" and out[1]["error_type"] == "FailpointError"
    assert "raise FailpointError" in out[1]["traceback"] and out[1]["pairs"] == []
    json.dumps(out[1]["reason"])


def test_stage_plan_follows_the_cluster():
    cfg = build_config("smoke")
    laptop = plan_stages(cfg, cpus=2, gpus=0)
    assert (laptop.gpu_actors, laptop.threads, laptop.noun_actors) == (1, 2, 1)
    assert laptop.gpu_actor_resources == {"num_cpus": 1.0}
    box = plan_stages(cfg, cpus=96, gpus=8)
    assert (box.gpu_actors, box.threads, box.noun_actors) == (8, None, 1)
    assert box.gpu_actor_resources == {"num_gpus": 1.0, "num_cpus": 1.0}
    cluster = plan_stages(cfg, cpus=4096, gpus=256)
    assert (cluster.gpu_actors, cluster.noun_actors) == (256, 8)
    shared = plan_stages(build_config("smoke", ["ray.num_gpus_per_actor=0.5", "ray.noun_actors=3"]), cpus=8, gpus=2)
    assert (shared.gpu_actors, shared.noun_actors) == (4, 3)
    assert (laptop.gpu_actors_at_start, box.gpu_actors_at_start, cluster.gpu_actors_at_start) == (1, 8, 256)


def test_the_pool_starts_with_the_actors_the_cluster_holds():
    two = build_config("smoke", ["ray.actors=2"])
    # One 2-CPU node (a second one lost): 0.5 CPU for the noun actor, 0.25 for a decode and a finalize task, 1 left.
    one_node = plan_stages(two, cpus=2, gpus=0)
    assert (one_node.gpu_actors, one_node.gpu_actors_at_start, one_node.threads) == (2, 1, 2)
    both = plan_stages(two, cpus=4, gpus=0)
    assert (both.gpu_actors, both.gpu_actors_at_start, both.threads) == (2, 2, 2)
    # 8 GPUs but 4 CPUs: each actor also reserves a CPU.
    few_cpus = plan_stages(build_config("smoke"), cpus=4, gpus=8)
    assert (few_cpus.gpu_actors, few_cpus.gpu_actors_at_start) == (8, 2)
