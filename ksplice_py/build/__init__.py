"""`hotpatch build`: turn a source diff into a live patch (see builder.py)."""
from .builder import BuildResult, build_patch

__all__ = ["BuildResult", "build_patch"]
