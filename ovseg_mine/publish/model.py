"""Publish a finetune (``ovseg-mine finetune``'s output) to the Hugging Face Hub in open_clip's own model layout.

The uploaded folder::

    open_clip_config.json         {"model_cfg": the architecture's open_clip config, "preprocess_cfg": mean, std...}
    open_clip_model.safetensors   the finetune's weights, byte for byte
    mask_prompts.safetensors      its mask prompts, when it has them (not read by open_clip; see the card)
    README.md                     model card: shards, start weights, training settings, evaluate's results

``open_clip.create_model_and_transforms("hf-hub:ORG/NAME")`` loads it (and ``"local-dir:FOLDER"`` loads the folder
``--dry-run`` writes): open_clip reads ``open_clip_config.json`` and prefers ``open_clip_model.safetensors`` among
the folder's weight files (``open_clip.factory._find_checkpoint_in_dir``). This answers ov-seg issues #3 and #6
(mask-adapted CLIP for smaller backbones, loadable with ``open_clip.create_model_and_transforms``). Finetunes that
started from random weights, or were trained on pairs mined with them, are refused, as mined runs are; their
dry-run card says so in its first line.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional

from ovseg_mine.publish.hub import PublishError, hub_error
from ovseg_mine.storage import StorageError, resolve

CONFIG_FILE = "open_clip_config.json"
TEMPLATE = Path(__file__).with_name("model_card.md")
RESULTS_FILE = "evaluate.json"


def is_finetune(folder: str | os.PathLike[str]) -> bool:
    """True when ``folder`` (a path or a URI) is an ``ovseg-mine finetune`` output (its metadata.json says so)."""
    from ovseg_mine.finetune.checkpoint import METADATA_FILE

    try:
        path = resolve(folder).join(METADATA_FILE)
        return path.is_file() and json.loads(path.read_bytes()).get("format", "").startswith("ovseg-mine finetune")
    except (StorageError, ValueError, AttributeError):
        return False


@dataclass
class BuiltModel:
    """What :func:`build_model_folder` wrote: ``files`` (names) in ``folder``, and one-line ``warnings``."""

    folder: Path
    files: list[str]
    random: bool
    warnings: list[str] = field(default_factory=list)


@lru_cache(maxsize=1)
def _template() -> Any:
    import jinja2

    env = jinja2.Environment(
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined
    )
    return env.from_string(TEMPLATE.read_text(encoding="utf-8"))


def _is_random(meta: dict[str, Any]) -> bool:
    return (
        meta.get("start", {}).get("weights", {}).get("weights") == "random"
        or meta.get("shards", {}).get("weights") == "random"
    )


def model_card(meta: dict[str, Any], *, repo_id: str | None, prompts_shape: list[int] | None, results: Any) -> str:
    """The README.md of a published finetune: a YAML header (``library_name: open_clip``, tags) and the text of
    ``model_card.md`` filled from the finetune's ``metadata.json`` and ``evaluate --json`` results (or None)."""
    import yaml

    config = meta.get("config", {})
    stages = []
    for name, info in meta.get("stages", {}).items():
        optim = config.get(name, {})
        stages.append((name, {**optim, **info}))
    header = {
        "library_name": "open_clip",
        "pipeline_tag": "zero-shot-image-classification",
        "tags": ["clip", "open_clip", "ovseg", "mask-adapted-clip", "ovseg-mine"],
    }
    body = _template().render(
        title=f"{meta['open_clip_arch']} mask-adapted CLIP ({config.get('mode', 'full')})",
        arch=meta["open_clip_arch"],
        quick_gelu=meta.get("quick_gelu", False),
        config=config,
        start=meta.get("start", {}),
        shards=meta.get("shards", {}),
        stages=stages,
        world_size=meta.get("world_size", 1),
        precision=meta.get("precision", ""),
        prompts={"shape": prompts_shape} if prompts_shape else None,
        results=sorted(results.items()) if isinstance(results, dict) else None,
        repo=repo_id or "ORG/NAME",
        random=_is_random(meta),
    )
    return "---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n" + body


def _read_results(folder: Any, results: str | os.PathLike[str] | None) -> Any:
    path = resolve(os.fspath(results)) if results is not None else folder.join(RESULTS_FILE)
    try:
        if results is None and not path.is_file():
            return None
        data = json.loads(path.read_bytes())
    except (StorageError, ValueError) as exc:
        raise PublishError(f"--results {path}: not readable JSON of `evaluate --json` ({exc})") from exc
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "top1" in v for v in data.values()):
        raise PublishError(f"--results {path}: not the output of `ovseg-mine evaluate --json`")
    return data


def build_model_folder(
    finetune: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    repo_id: str | None = None,
    results: str | os.PathLike[str] | None = None,
) -> BuiltModel:
    """Write the Hub folder of a finetune into ``out_dir`` (new or empty).

    Args:
        finetune: the finetune output folder (a local path or a URI); it must be complete.
        out_dir: a local folder.
        repo_id: ``ORG/NAME`` for the card's snippet.
        results: ``evaluate --json`` output for the card (default: ``FINETUNE/evaluate.json`` when present).

    Raises:
        PublishError: not a finetune output, unfinished, an architecture open_clip does not know, a non-empty
            ``out_dir``, unreadable results.
    """
    import open_clip
    from safetensors import safe_open

    from ovseg_mine.finetune import checkpoint as ckpt
    from ovseg_mine.finetune.mask_prompt import PROMPTS_FILE
    from ovseg_mine.resources import register_clip_configs

    folder = resolve(finetune)
    try:
        meta = ckpt.read_metadata(folder)
    except ckpt.CheckpointError as exc:
        raise PublishError(str(exc)) from exc
    if not meta.get("complete"):
        raise PublishError(f"{finetune} is an unfinished finetune: rerun the same finetune command to finish it")
    register_clip_configs()
    model_cfg = open_clip.get_model_config(meta["open_clip_arch"])
    if not model_cfg:
        raise PublishError(f"open_clip has no config for {meta['open_clip_arch']!r}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise PublishError(f"{out} is not empty: give an empty or new folder")
    results_data = _read_results(folder, results)
    out.mkdir(parents=True, exist_ok=True)
    pre = meta.get("preprocess", {})
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {
            "mean": pre.get("mean"),
            "std": pre.get("std"),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    files, prompts_shape = [CONFIG_FILE], None
    try:
        for name in (ckpt.WEIGHTS_FILE, PROMPTS_FILE):
            source = folder.join(name)
            if source.is_file():
                with source.local_file() as local:
                    shutil.copyfile(local, out / name)
                files.append(name)
        if PROMPTS_FILE in files:
            with safe_open(str(out / PROMPTS_FILE), framework="pt") as handle:
                prompts_shape = list(handle.get_slice("prompts").get_shape())
    except StorageError as exc:
        raise PublishError(str(exc)) from exc
    card = model_card(meta, repo_id=repo_id, prompts_shape=prompts_shape, results=results_data)
    (out / "README.md").write_text(card, encoding="utf-8")
    files.append("README.md")
    warnings = ["this finetune used randomly initialised weights: they are meaningless"] if _is_random(meta) else []
    return BuiltModel(out, sorted(files), _is_random(meta), warnings)


def publish_model(
    finetune: str | os.PathLike[str],
    repo_id: str,
    *,
    token: Optional[str] = None,
    private: bool = False,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    results: str | os.PathLike[str] | None = None,
    on_warning: Callable[[str], None] = lambda message: None,
) -> str:
    """Build the folder of a finetune in a temporary folder and upload it to the model repository ``repo_id``
    (created when missing, ``repo_type="model"``; the branch ``revision`` too). The token is never logged.

    Returns:
        The repository URL.

    Raises:
        PublishError: random weights, an unfinished finetune, no token, or a Hub error (one line).
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalTokenNotFoundError

    with tempfile.TemporaryDirectory(prefix="ovseg-mine-model-") as tmp:
        built = build_model_folder(finetune, Path(tmp) / "model", repo_id=repo_id, results=results)
        if built.random:
            raise PublishError(
                "refusing to upload a finetune of randomly initialised weights (or of pairs mined with them): "
                "it is meaningless; use --dry-run DIR to inspect the folder"
            )
        if not (token or get_token()):
            raise PublishError("no Hugging Face token: set HF_TOKEN, run `hf auth login`, or pass --token")
        for warning in built.warnings:
            on_warning(warning)
        api = HfApi(token=token or None)
        try:
            url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
            api.upload_folder(
                repo_id=repo_id,
                folder_path=built.folder,
                repo_type="model",
                revision=revision,
                commit_message=commit_message or "Upload a mask-adapted CLIP finetuned with ovseg-mine",
            )
        except (HfHubHTTPError, LocalTokenNotFoundError, HFValidationError, OSError, ValueError) as exc:
            raise hub_error(exc, repo_id, token) from exc
    return str(getattr(url, "url", url) or f"https://huggingface.co/{repo_id}")
