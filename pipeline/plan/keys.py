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
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any

# Ten significant digits: far below anything visible in a frame, far above float32 noise.
SIGNIFICANT_DIGITS = 10


# One set of options for every key. One encoder too: json.dumps with options builds a new one on
# each call. Key recipes are trees built fresh by the planner, so the cycle check is pure cost.
_OPTIONS: dict[str, Any] = {
    "sort_keys": True,
    "separators": (",", ":"),
    "ensure_ascii": False,
    "allow_nan": False,
    "check_circular": False,
}
_ENCODER = json.JSONEncoder(**_OPTIONS)


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


class Slot:
    """A leaf left open in a :class:`KeyTemplate`: the ``index``-th of the values given to ``key``.

    A slot holds a number (a float already through :func:`round_float`, or an int), or with
    ``text=True`` a string.
    """

    __slots__ = ("index", "text")

    def __init__(self, index: int, *, text: bool = False) -> None:
        self.index = index
        self.text = text


# A private-use character marks the slots in the template's text; recipes hold hashes, names and
# numbers, and a template refuses a text that already holds one.
_MARK = "\ue000"


class KeyTemplate:
    """The keys of recipes that share one shape and differ only in a few leaves, made fast.

    The planner makes 100,000 frame recipes that differ only in a few numbers. Encoding each one
    whole is most of the cost of planning, so frames of one shape share a template instead::

        t = KeyTemplate({"cond": {"a": keys, "t": Slot(0)}, "seed": Slot(1)})
        t.key((0.25, 7)) == key_of({"cond": {"a": keys, "t": 0.25}, "seed": 7}, normalised=True)

    The skeleton is encoded once, by the one canonical encoder. Each key then only formats the slot
    values into that text, as that encoder would: numbers by ``repr`` (what json writes for an exact
    float or int), strings by the encoder's own string function. So the text, and the key, are
    those of ``key_of(..., normalised=True)`` on the filled recipe; values must be normalised
    already, and a number slot must not get a bool or None (the planner checks the first key of
    each template against ``key_of``). A slot may appear once or not at all in the skeleton.
    """

    __slots__ = ("_format", "_order", "_pick", "_texts")

    def __init__(self, skeleton: Any) -> None:
        seen: list[Slot] = []

        def mark(value: Any) -> str:
            if type(value) is not Slot:
                raise TypeError(
                    f"a key recipe holds plain JSON data only, got {type(value).__name__}: {value!r}"
                )
            seen.append(value)
            return f"{_MARK}{len(seen) - 1}{_MARK}"

        text = json.JSONEncoder(**_OPTIONS, default=mark).encode(skeleton)
        if text.count(_MARK) != 2 * len(seen):
            raise ValueError("a key template's fixed text cannot hold U+E000")
        if len({id(s) for s in seen}) != len(seen) or len({s.index for s in seen}) != len(seen):
            raise ValueError("each slot of a key template appears once at most")
        text = text.replace("%", "%%")
        for i, slot in enumerate(seen):
            text = text.replace(f'"{_MARK}{i}{_MARK}"', "%s" if slot.text else "%r", 1)
        self._format = text
        # The slot indices in the order their values appear in the text (sorted keys, not ours).
        order = tuple(s.index for s in seen)
        self._order = order
        self._texts = frozenset(s.index for s in seen if s.text)
        # itemgetter picks the values in text order at C speed (with two or more it returns a tuple).
        self._pick: Callable[[Sequence[Any]], tuple[Any, ...]] = (
            itemgetter(*order) if len(order) > 1 else lambda v: tuple(v[i] for i in order)
        )

    def key(self, values: Sequence[Any]) -> str:
        """The key of the skeleton with ``values[i]`` in ``Slot(i)``."""
        if self._texts:
            texts = self._texts
            args = tuple(_ENCODER.encode(values[i]) if i in texts else values[i] for i in self._order)
        else:
            args = self._pick(values)
        return hashlib.sha256((self._format % args).encode("utf-8")).hexdigest()


def file_digest(path: str, chunk: int = 1 << 20) -> str:
    """sha256 of a file's content (never of its name or mtime: an edit that keeps the mtime still counts)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def json_digest(data: Any) -> str:
    """sha256 of parsed JSON re-encoded compactly, keys in their order: what a JSON file says, not its layout.

    Re-indenting a model's ``model_index.json`` changes no pixel, so it must change no key; a key
    renamed, reordered or given another value does change the digest.
    """
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=True)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
