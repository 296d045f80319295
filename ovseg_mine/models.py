"""The one place that resolves model weights: segment-anything (SAM) and open_clip models.

Weights come from one of three sources, chosen by the config string:

* a published checkpoint (SAM ``"default"``; an open_clip pretrained tag such as ``"openai"``), downloaded on
  first use (SAM into :func:`sam_cache_dir`, open_clip into its own standard cache) and checked by sha256;
* a local file path (loaded as-is; its sha256 is recorded);
* ``"random"``: explicit random initialisation, seeded so that two builds with the same seed are identical.

When published weights cannot be obtained the loaders either raise :class:`WeightsError` (the default) or, with
``allow_random=True``, log one warning on the ``ovseg_mine`` logger and return seeded random weights marked
``weights="random"``. An explicit local path that fails is always an error. Heavy libraries are imported lazily.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from ovseg_mine.resources import register_clip_configs
from ovseg_mine.storage import sha256_file
from ovseg_mine.weights_info import ModelNameError, WeightsError, WeightsInfo, load_fitting_state

log = logging.getLogger("ovseg_mine")

_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
# Published SAM checkpoints: file name, full sha256, md5. NB: the hex in the file name is the md5's prefix.
_SAM_CHECKPOINTS: dict[str, tuple[str, str, str]] = {
    "vit_b": (
        "sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        "01ec64d29a2fca3f0661936605ae66f8",
    ),
    "vit_l": (
        "sam_vit_l_0b3195.pth",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        "0b3195507c641ddb6910d2bb5adee89c",
    ),
    "vit_h": (
        "sam_vit_h_4b8939.pth",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        "4b8939a88964f0f4ff5f5b2642c598a6",
    ),
}


def _seeded(seed: int, build: Callable[[], Any]) -> Any:
    """Build a module right after ``torch.manual_seed(seed)``, without disturbing the caller's RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _fallback(allow_random: bool, reason: str, hint: str) -> None:
    """Weights could not be obtained: log one warning line (allow_random) or raise WeightsError."""
    reason = " ".join(reason.split())  # one line, even if an exception message had several
    if not allow_random:
        raise WeightsError(f"{reason}. {hint}")
    log.warning("%s; using seeded RANDOM weights instead (allow_random_weights)", reason)


# ----------------------------------------------------------------------------------------------- SAM


#: Input side (pixels) of each SAM's image encoder: the decode stage resizes images to it without building the model.
_SAM_INPUT_SIZES = {"tiny": 256, "vit_b": 1024, "vit_l": 1024, "vit_h": 1024}


def sam_input_size(model_type: str) -> int:
    """Side in pixels of the square input of SAM ``model_type``'s image encoder (1024; 256 for ``tiny``).

    Raises:
        ModelNameError: unknown ``model_type``.
    """
    if model_type not in _SAM_INPUT_SIZES:
        raise ModelNameError(f"unknown SAM model_type {model_type!r}; valid: {', '.join(list_sam_models())}")
    return _SAM_INPUT_SIZES[model_type]


def _tiny_sam() -> Any:
    """A small SAM from segment_anything's own classes (256 px input, 2 ViT blocks of width 32); tests only."""
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    img_size, patch, dim = _SAM_INPUT_SIZES["tiny"], 16, 32
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=img_size,
            patch_size=patch,
            embed_dim=dim,
            depth=2,
            num_heads=2,
            mlp_ratio=4.0,
            out_chans=dim,
            qkv_bias=True,
            norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=8,
            global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(img_size // patch, img_size // patch),
            input_image_size=(img_size, img_size),
            mask_in_chans=8,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def _registry_sam(name: str) -> Any:
    from segment_anything import sam_model_registry  # the published architectures, built without weights

    return sam_model_registry[name](checkpoint=None)


_SAM_BUILDERS: dict[str, Callable[[], Any]] = {"tiny": _tiny_sam}
_SAM_BUILDERS.update({name: functools.partial(_registry_sam, name) for name in ("vit_b", "vit_h", "vit_l")})


def list_sam_models() -> list[str]:
    """Valid SAM ``model_type`` names, sorted: ``['tiny', 'vit_b', 'vit_h', 'vit_l']``."""
    return sorted(_SAM_BUILDERS)


def sam_cache_dir() -> Path:
    """Where published SAM checkpoints are cached: ``$OVSEG_MINE_CACHE/sam`` or ``~/.cache/ovseg-mine/sam``."""
    return Path(os.environ.get("OVSEG_MINE_CACHE") or Path.home() / ".cache" / "ovseg-mine").expanduser() / "sam"


def _download(url: str, dst: Path) -> None:
    """Fetch ``url`` into ``dst`` (the caller verifies and renames it). Tests replace this function."""
    import torch

    torch.hub.download_url_to_file(url, str(dst), progress=True)


def _fetch_sam_checkpoint(model_type: str) -> tuple[Path, str]:
    """Path and sha256 of the verified published checkpoint; downloads it (temp file, check, rename) if needed."""
    fname, want, _md5 = _SAM_CHECKPOINTS[model_type]
    cache = sam_cache_dir()
    path, tmp = cache / fname, cache / f".{fname}.{os.getpid()}.part"
    if path.is_file():
        got = sha256_file(path)
        if got == want:
            return path, got
        log.warning("cached %s has sha256 %s, expected %s; downloading it again", path, got[:12], want[:12])
    cache.mkdir(parents=True, exist_ok=True)
    try:
        _download(_SAM_URL + fname, tmp)
        got = sha256_file(tmp)
        if got != want:
            raise WeightsError(f"sha256 mismatch for downloaded {fname}: got {got}, expected {want}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path, got


def _load_state_dict(model: Any, path: str | Path, what: str) -> None:
    """Load a ``torch.save``'d state dict strictly; every failure becomes a WeightsError that says why."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 torch.load of an arbitrary file raises anything (IndexError, UnpicklingError...): the file's fault
        raise WeightsError(f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc)[:200]}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict", state.get("model")), dict):
        state = state.get("state_dict", state.get("model"))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"checkpoint {path} is not a state dict of tensors")
    load_fitting_state(model, state, f"checkpoint {path}", what)


def resolve_sam_weights(
    model_type: str, checkpoint: str, *, allow_random: bool = False
) -> tuple[Path | None, WeightsInfo]:
    """Where a SAM model's weights come from, without building the model: the checkpoint file (downloaded into
    :func:`sam_cache_dir` and sha256-checked for ``"default"``) and its :class:`WeightsInfo`. Arguments and errors
    as :func:`load_sam` (a file of another architecture is found by :func:`load_sam`, not here).

    Returns:
        ``(path, info)``; ``path`` is None for random weights.
    """
    if model_type not in _SAM_BUILDERS:
        raise ModelNameError(f"unknown SAM model_type {model_type!r}; valid: {', '.join(list_sam_models())}")
    info, path = WeightsInfo(model_type, "random", None, None), None
    hint = "--set sam.checkpoint=PATH (a local .pth) or --set sam.checkpoint=random"
    if checkpoint == "default" and model_type not in _SAM_CHECKPOINTS:
        _fallback(allow_random, f"SAM model {model_type!r} has no published checkpoint", f"Pass {hint}")
    elif checkpoint == "default":
        try:
            path, sha = _fetch_sam_checkpoint(model_type)
            info = WeightsInfo(model_type, "default", _SAM_URL + path.name, sha)
        except (OSError, WeightsError) as exc:  # no network, HTTP errors, a download whose sha256 differs
            url = _SAM_URL + _SAM_CHECKPOINTS[model_type][0]
            _fallback(
                allow_random,
                f"cannot obtain SAM {model_type} weights ({type(exc).__name__}: {str(exc)[:200]})"
                f" in cache folder {sam_cache_dir()}",
                f"Download {url} into that folder, or pass {hint}",
            )
    elif checkpoint != "random":
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise WeightsError(f"SAM checkpoint file not found: {path} (from --set sam.checkpoint=PATH)")
        info = WeightsInfo(model_type, "file", str(path.resolve()), sha256_file(path))
    return path, info


def load_sam(
    model_type: str, checkpoint: str, *, device: Any = "cpu", seed: int = 0, allow_random: bool = False
) -> tuple[Any, WeightsInfo]:
    """Build a SAM model (eval mode, on ``device``) and say where its weights came from.

    Args:
        model_type: one of :func:`list_sam_models`.
        checkpoint: ``"default"`` (published checkpoint, cached in :func:`sam_cache_dir`, sha256-checked),
            a local path (``torch.save``'d state dict), or ``"random"`` (init after ``torch.manual_seed(seed)``).
        allow_random: if the published weights cannot be obtained, warn and return random weights.

    Raises:
        ModelNameError: unknown ``model_type`` (a ValueError and a WeightsError; the message lists valid ones).
        WeightsError: weights cannot be obtained (and not ``allow_random``), or a local file is missing,
            corrupt, or of another architecture (always).
    """
    path, info = resolve_sam_weights(model_type, checkpoint, allow_random=allow_random)
    return build_sam(model_type, path, device=device, seed=seed), info


def build_sam(model_type: str, path: str | Path | None, *, device: Any = "cpu", seed: int = 0) -> Any:
    """Build a SAM model (eval mode, on ``device``) from weights already resolved (:func:`resolve_sam_weights`):
    the checkpoint file at ``path`` loaded as it is (no download, no sha256), or, with ``path`` None, random
    weights initialised after ``torch.manual_seed(seed)``.

    Raises:
        ModelNameError: unknown ``model_type``.
        WeightsError: the file is missing, corrupt, or of another architecture.
    """
    if model_type not in _SAM_BUILDERS:
        raise ModelNameError(f"unknown SAM model_type {model_type!r}; valid: {', '.join(list_sam_models())}")
    sam = _seeded(seed, _SAM_BUILDERS[model_type])
    if path is not None:
        _load_state_dict(sam, path, f"SAM model_type {model_type!r}")
    return sam.to(device).eval()


# ------------------------------------------------------------------------------------------ open_clip


@functools.cache
def _unreachable(host: str) -> bool:
    """True only when a download surely cannot work: HF offline mode, or (no proxy set) no TCP to ``host``."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError:
        return True
    return False


def _fetch_clip_tag(tag_cfg: dict[str, Any]) -> tuple[str, str]:
    """Local path and source of an open_clip pretrained tag's file: its cached copy (no network), else
    ``open_clip.pretrained.download_pretrained``. Fails fast (OSError) when not cached and the host is
    unreachable, instead of huggingface_hub's ~45 s of retries."""
    from open_clip import pretrained as ocp

    if "file" in tag_cfg:
        return tag_cfg["file"], tag_cfg["file"]
    url, host = tag_cfg.get("url", ""), None
    if tag_cfg.get("hf_hub") and ocp.has_hf_hub():
        from huggingface_hub import constants, try_to_load_from_cache

        repo, fname = os.path.split(tag_cfg["hf_hub"])
        fname = fname or "open_clip_pytorch_model.bin"
        twin = "open_clip_model.safetensors" if fname == "open_clip_pytorch_model.bin" else fname[:-4] + ".safetensors"
        for name in ([twin] if fname.endswith((".bin", ".pth")) else []) + [fname]:  # open_clip prefers safetensors
            hit = try_to_load_from_cache(repo, name)
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit, f"hf-hub:{repo}/{name}"
        source, host = f"hf-hub:{repo}/{fname}", urlparse(constants.ENDPOINT).hostname
    elif not os.path.isfile(os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))):
        source, host = url, urlparse(url).hostname  # else cached: open_clip checks it without the network
    else:
        source = url
    if host and _unreachable(host):
        raise OSError(f"{host} is unreachable (no network?)")
    return ocp.download_pretrained(tag_cfg), source


@contextlib.contextmanager
def _quiet_open_clip():
    """Drop open_clip's root-logger chatter below ERROR ('initialized randomly': we load weights ourselves)."""
    quiet = lambda r: not ("open_clip" in r.pathname and r.levelno < logging.ERROR)  # noqa: E731
    logging.getLogger().addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quiet)


def load_clip(
    arch: str, pretrained: str, *, device: Any = "cpu", seed: int = 0, allow_random: bool = False
) -> tuple[Any, Callable[..., Any], WeightsInfo]:
    """Build an open_clip model (eval mode, on ``device``), its tokenizer, and where its weights came from.

    Args:
        arch: an open_clip architecture (``open_clip.list_models()``, plus ``ovseg-tiny-vit`` for tests).
        pretrained: an open_clip tag valid for ``arch`` (downloaded into open_clip's cache; a tag trained with
            QuickGELU builds the model with QuickGELU, as the weights need), a local checkpoint file of any kind
            :mod:`ovseg_mine.clip_weights` reads (open_clip_train epoch file, OVSeg detectron2 ``.pth``,
            safetensors, state dict; its mask prompts are not attached here: see
            :func:`ovseg_mine.clip_loader.load_clip_model`), or ``"random"``.
        allow_random: if the tag's weights cannot be obtained, warn and return random weights.

    Raises:
        ModelNameError: unknown ``arch``, or ``pretrained`` is neither a tag of ``arch`` nor a path.
        WeightsError: the tag's weights cannot be obtained (and not ``allow_random``), or a local file is
            missing, corrupt or of another architecture (always).
    """
    path, tag_cfg, info = resolve_clip_weights(arch, pretrained, allow_random=allow_random)
    model, tokenizer = build_clip(arch, path, tag_cfg, device=device, seed=seed)
    return model, tokenizer, info


def build_clip(
    arch: str, path: str | None, tag_cfg: dict[str, Any], *, device: Any = "cpu", seed: int = 0
) -> tuple[Any, Callable[..., Any]]:
    """Build an open_clip model (eval mode, on ``device``) and its tokenizer from weights already resolved
    (:func:`resolve_clip_weights`), with no download and no sha256.

    Args:
        arch: an open_clip architecture (``open_clip.list_models()``, plus ``ovseg-tiny-vit``).
        path: the weights file: a pretrained tag's file when ``tag_cfg`` is set (loaded strictly by open_clip),
            else a local checkpoint of any kind :mod:`ovseg_mine.clip_weights` reads; None: random weights
            initialised after ``torch.manual_seed(seed)``.
        tag_cfg: the tag's pretrained config (preprocessing, QuickGELU); empty for files and random weights.

    Raises:
        WeightsError: the file is missing, corrupt, or of another architecture.
    """
    import open_clip

    register_clip_configs()
    preprocess = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}

    def build() -> Any:
        with _quiet_open_clip():
            return open_clip.create_model(
                arch,
                pretrained=None,
                pretrained_text=False,
                force_preprocess_cfg=preprocess,
                force_quick_gelu=bool(tag_cfg.get("quick_gelu")),
            )

    model = _seeded(seed, build)
    if path is not None and not tag_cfg:  # any kind of file: open_clip_train epoch, OVSeg .pth, ...
        from ovseg_mine.clip_weights import load_state, read_weights

        try:
            weights = read_weights(path)
        except WeightsError as exc:
            raise WeightsError(f"checkpoint {path} does not load into open_clip {arch!r}: {exc}") from exc
        if weights.mask_embedding is not None:
            log.info("%s: its mask prompts (visual.mask_embedding) are not used here", path)
        load_state(model, weights, arch)
    elif path is not None:
        try:
            open_clip.load_checkpoint(model, path, strict=True)
        except Exception as exc:  # noqa: BLE001 as torch.load: any failure here is the checkpoint file's
            raise WeightsError(
                f"checkpoint {path} does not load into open_clip {arch!r}: {type(exc).__name__}: {str(exc)[:300]}"
            ) from exc
    return model.to(device).eval(), open_clip.get_tokenizer(arch)


def resolve_clip_weights(
    arch: str, pretrained: str, *, allow_random: bool = False
) -> tuple[str | None, dict[str, Any], WeightsInfo]:
    """Where an open_clip model's weights come from, without building the model: the checkpoint file (a tag's
    file from open_clip's cache, downloaded if needed), the tag's pretrained config (preprocessing, QuickGELU; empty
    for files and random weights) and its :class:`WeightsInfo`. Arguments and errors as :func:`load_clip` (a file
    of another architecture is found by :func:`load_clip`, not here).

    Returns:
        ``(path, tag_cfg, info)``; ``path`` is None for random weights.
    """
    import open_clip

    register_clip_configs()
    if arch not in open_clip.list_models():
        raise ModelNameError(f"unknown open_clip arch {arch!r}; open_clip.list_models() gives the valid names")
    info, path, tag_cfg = WeightsInfo(arch, "random", None, None), None, {}
    if pretrained != "random":
        tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained)
        if tag_cfg:
            try:
                path, source = _fetch_clip_tag(tag_cfg)
                info = WeightsInfo(arch, pretrained, source, sha256_file(path))
            except (OSError, RuntimeError, ValueError) as exc:  # no network, hub errors, a failed checksum
                path, tag_cfg = None, {}  # the fallback is exactly load_clip(arch, "random", seed=seed)
                _fallback(
                    allow_random,
                    f"cannot obtain open_clip weights {arch}/{pretrained} ({type(exc).__name__}: "
                    f"{str(exc)[:200]}) in open_clip's cache (HF hub cache or ~/.cache/clip)",
                    "Pass --set clip.pretrained=PATH (a local checkpoint) or --set clip.pretrained=random",
                )
        elif os.path.isfile(os.path.expanduser(pretrained)):
            path = os.path.expanduser(pretrained)
            info = WeightsInfo(arch, "file", str(Path(path).resolve()), sha256_file(path))
        elif os.sep in pretrained or "/" in pretrained or "." in pretrained:
            raise WeightsError(f"CLIP checkpoint file not found: {pretrained} (from --set clip.pretrained=PATH)")
        else:
            tags = open_clip.list_pretrained_tags_by_model(arch)
            raise ModelNameError(
                f"{pretrained!r} is not a pretrained tag of {arch!r} (tags: {tags or 'none'}), "
                "a local checkpoint path, or 'random'"
            )
    return path, tag_cfg, info


def clip_input_size(model: Any) -> int:
    """Square input size (pixels) of an open_clip model's vision tower, e.g. 224 (``model.visual.image_size``)."""
    size = getattr(model.visual, "image_size", None) or model.visual.preprocess_cfg["size"]
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h != w:
        raise ValueError(f"vision tower input is not square: {h}x{w}")
    return int(h)


def clip_mean_std(model: Any) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel RGB (mean, std) of the vision tower for pixels in [0, 1]; open_clip's OpenAI default if unset."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    mean, std = cfg.get("mean", OPENAI_DATASET_MEAN), cfg.get("std", OPENAI_DATASET_STD)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)  # type: ignore[return-value]
