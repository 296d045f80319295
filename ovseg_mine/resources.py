"""Where the package's data lives: recipes (``pipelines/``), the shard contract (``schemas/``) and the
bundled sample (``ovseg_mine/data``).

A wheel carries copies of ``pipelines/`` and ``schemas/`` inside the package (see pyproject.toml); a source
checkout or an editable install reads them from the repository root. Both resolve through here.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
_REPO_ROOT = _PACKAGE_DIR.parent


def _data_dir(name: str) -> Path:
    for candidate in (_PACKAGE_DIR / name, _REPO_ROOT / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"the package's {name}/ folder is missing (looked in {_PACKAGE_DIR} and {_REPO_ROOT})")


def pipelines_dir() -> Path:
    """Folder holding the named recipes (``*.toml``)."""
    return _data_dir("pipelines")


def schemas_dir() -> Path:
    """Folder holding the versioned shard and manifest contracts."""
    return _data_dir("schemas")


def list_pipelines() -> list[str]:
    """Names of the bundled recipes, sorted (e.g. ``['coco-ovseg', 'demo', 'smoke']``)."""
    return sorted(p.stem for p in pipelines_dir().glob("*.toml"))


def pipeline_path(name: str) -> Path | None:
    """Path of the bundled recipe ``name``, or None if there is none."""
    path = pipelines_dir() / f"{name}.toml"
    return path if path.is_file() else None


def data_dir() -> Path:
    """The package's data folder ``ovseg_mine/data`` (the bundled sample, the noun -> COCO category table)."""
    return _PACKAGE_DIR / "data"


def model_configs_dir() -> Path:
    """open_clip model configs shipped with the package (``ovseg-tiny-vit.json`` for tests)."""
    return _PACKAGE_DIR / "model_configs"


def sample_dir() -> Path:
    """The bundled COCO sample: ``images/``, ``captions.json``, ``instances.json``, ``LICENSES.md``."""
    return _PACKAGE_DIR / "data" / "coco-sample"


def register_clip_configs() -> None:
    """Make the open_clip model configs in ``ovseg_mine/model_configs/`` (the tiny test architectures, e.g.
    ``ovseg-tiny-vit``) known to open_clip; adding them again is harmless."""
    import open_clip

    open_clip.add_model_config(model_configs_dir())
