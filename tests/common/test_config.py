import pytest

from ovseg_mine.config import ConfigError, apply_overrides, build_config, config_hash
from ovseg_mine.resources import list_pipelines


def test_bundled_recipes_load_and_validate():
    assert {"coco-ovseg", "demo", "smoke"} <= set(list_pipelines())
    paper = build_config("coco-ovseg")
    assert paper.recipe == "coco-ovseg"
    assert paper.source.captions_per_image == 1  # paper's main setting
    assert (paper.sam.model_type, paper.clip.arch, paper.clip.pretrained) == ("vit_b", "ViT-B-16", "openai")
    assert paper.allow_random_weights is False
    assert paper.matching.min_similarity == -1.0 and paper.matching.min_probability == 0.0  # keep every noun
    assert build_config("smoke").allow_random_weights and build_config("demo").allow_random_weights


def test_overrides_are_typed():
    cfg = build_config(
        "smoke", ["sam.points_per_side=4", "clip.pretrained=/tmp/some ckpt.pt", "source.image_ids=[1, 2]"]
    )
    assert cfg.sam.points_per_side == 4
    assert cfg.clip.pretrained == "/tmp/some ckpt.pt"
    assert cfg.source.image_ids == [1, 2]
    assert apply_overrides({"a": {"b": 1}}, ["a.c=true"]) == {"a": {"b": 1, "c": True}}


def test_typed_values_are_set_after_the_overrides_and_validated():
    """A command's own options (``--limit``, ``--split``...) reach the config as typed values, not ``--set``
    strings: set after the overrides, None leaving a key as it was, checked like any value."""
    values = {"source": {"limit": 3, "split": "val", "image_ids": [5, 6], "id_column": None}}
    cfg = build_config("smoke", ["source.limit=9", 'source.id_column="id"'], values)
    assert (cfg.source.limit, cfg.source.split, cfg.source.image_ids, cfg.source.id_column) == (3, "val", [5, 6], "id")
    assert build_config("smoke", [], {"shards": {"images_per_shard": 6}}) == build_config(
        "smoke", ["shards.images_per_shard=6"]
    )
    with pytest.raises(ConfigError, match="source.image_ids"):
        build_config("smoke", [], {"source": {"image_ids": []}})


@pytest.mark.parametrize(
    "pipeline, overrides, message",
    [
        ("no-such-recipe", [], "unknown pipeline 'no-such-recipe'; known pipelines: coco-ovseg, demo"),
        ("smoke", ["sam.points_per_side=0"], "sam.points_per_side"),
        ("smoke", ["sam.no_such_key=1"], "sam.no_such_key"),
        ("smoke", ["clip.precision='fp8'"], "clip.precision"),
        ("smoke", ["novalue"], "must look like section.key=value"),
    ],
)
def test_bad_config_is_a_clear_error(pipeline, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        build_config(pipeline, overrides)


def test_recipe_by_path(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("[sam]\nmodel_type = 'vit_h'\n")
    cfg = build_config(str(path))
    assert cfg.recipe == "mine" and cfg.sam.model_type == "vit_h"
    bad = tmp_path / "bad.toml"
    bad.write_text("[sam\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        build_config(str(bad))


def test_config_hash_ignores_selection_and_parallelism_only():
    base = build_config("smoke")
    assert config_hash(base) == config_hash(build_config("smoke", ["source.limit=3", "ray.batch_size=8"]))
    assert config_hash(base) != config_hash(build_config("smoke", ["sam.points_per_side=4"]))


def test_runs_written_before_the_compile_modes_and_kernels_keep_their_hash():
    """A run's config.json from before ``engine.compile`` had modes (a bool) and before ``engine.kernels`` and
    ``engine.profile_steps`` existed hashes as it did then, so it resumes; the new values hash differently."""
    import hashlib
    import json

    from ovseg_mine.config import MineConfig, mining_config

    cfg = build_config("smoke")
    old = mining_config(cfg)
    assert old["engine"] == {"compile": False, "batching": "auto", "device_rules": "auto"}  # as written before
    digest = hashlib.sha256(json.dumps(old, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert config_hash(cfg) == digest
    written = cfg.model_dump(mode="json")
    written["engine"] = {"compile": True, "batching": "auto", "device_rules": "auto"}  # an old config.json
    assert MineConfig.model_validate(written).engine.compile == "default"
    assert config_hash(build_config("smoke", ["engine.compile=true"])) == config_hash(
        build_config("smoke", ["engine.compile='default'"])
    )
    for change in ("engine.compile='reduce-overhead'", "engine.kernels='fused'", "engine.profile_steps=true"):
        assert config_hash(build_config("smoke", [change])) != config_hash(cfg), change
