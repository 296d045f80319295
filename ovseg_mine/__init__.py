"""ovseg-mine: mine mask-noun pairs from image-caption data for mask-adapted CLIP (OVSeg, arXiv 2210.04150).

Heavy dependencies (torch, ray, segment_anything, open_clip, spacy, pycocotools) are imported lazily by the
modules that need them, so importing the package and ``ovseg-mine --help`` stay fast.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ovseg-mine")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
