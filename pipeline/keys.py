"""Cache keys: the sha256 of canonical JSON. One function, used for every key in the project.

A key must change when, and only when, something that can change the cached bytes changes. So the
JSON is canonical: keys sorted, no whitespace, UTF-8, and every float rounded to a fixed number of
significant digits, so that ``0.1 + 0.2`` and ``0.3`` give the same key and a value computed on
another machine with a last-bit difference does not miss the cache::

    key_of({"prompt": "a dog", "t": 0.25})   # -> 64 hex characters

Anything that is not JSON data (a path, a tensor, a set) is a programming error and raises
``TypeError``: keys are built from plain recipes only.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

# Ten significant digits: far below anything visible in a frame, far above float32 noise.
SIGNIFICANT_DIGITS = 10


# One encoder for every key: json.dumps with options builds a new encoder on each call.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def round_float(x: float) -> float:
    """Round ``x`` to the key precision; ``-0.0`` becomes ``0.0`` so the sign of zero never matters."""
    if not math.isfinite(x):
        raise ValueError(f"a cache key cannot hold the non-finite number {x!r}")
    r = float(f"{x:.{SIGNIFICANT_DIGITS}g}")
    return r + 0.0


def _normalise(value: Any) -> Any:
    # Exact type dispatch first: this runs for every value of every frame key (100k frames a plan).
    t = type(value)
    if t is str or t is int or t is bool or value is None:
        return value
    if t is float:
        return round_float(value)
    if t is list or t is tuple:
        return [_normalise(v) for v in value]
    if t is dict:
        for k in value:
            if type(k) is not str:
                raise TypeError(f"key recipes use text keys only, got {k!r}")
        return {k: _normalise(v) for k, v in value.items()}
    raise TypeError(f"a key recipe holds plain JSON data only, got {t.__name__}: {value!r}")


def canonical_json(value: Any, *, normalised: bool = False) -> str:
    """The canonical text of a recipe: sorted keys, compact separators, rounded floats.

    ``normalised=True`` skips the rounding pass for a recipe whose floats all came from
    :func:`round_float` already (the planner's per-frame recipes: the pass is half the cost of
    planning 100,000 frames). The text is the same; a test checks that on whole plans.
    """
    return _ENCODER.encode(value if normalised else _normalise(value))


def key_of(value: Any, *, normalised: bool = False) -> str:
    """The sha256 hex digest of the canonical JSON of ``value``."""
    return hashlib.sha256(canonical_json(value, normalised=normalised).encode("utf-8")).hexdigest()


def file_digest(path: str, chunk: int = 1 << 20) -> str:
    """sha256 of a file's content (never of its name or mtime: an edit that keeps the mtime still counts)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
