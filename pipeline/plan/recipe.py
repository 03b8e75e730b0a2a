"""Typed views of a frame's recipe: what code reads instead of the planner's plain dicts.

The planner keeps each recipe as a plain JSON-ready dict: its key is the digest of that dict, and a
100,000-frame plan makes them at speed. Everything downstream reads a recipe through these views::

    r = job.view                       # a Recipe (made on demand: one small object)
    r.cond.kind, r.cond.t              # 'morph', 0.25
    r.cond.embedding_keys()            # every embedding the frame's conditioning reads
    r.noise.kind, r.noise.seed         # 'travel', 7 (r.noise.to == 9)
    r.mode.name, r.mode.prev           # 'feedback', the key of the frame before
    r.guidance, r.scalars, r.lora      # 7.5, {'guidance': 7.5, 'strength': 0.6}, {'style': 0.8}
    r.all_scalars                      # {'guidance': 7.5, 'strength': 0.6, 'lora': {'style': 0.8}}
    r.cond.raw                         # the dict itself (what is printed, and what keys digest)

A view holds nothing but its dict (``raw``) and reads it on each access, so making one costs one
small object and no copy; two views are equal when their dicts are. The recipe's layout, as the
planner writes it (every float rounded with ``keys.round_float``)::

    cond:    {"a": BLEND}                                             prompt: one blend
             {"a": BLEND, "b": BLEND, "t": T, "method": "slerp"}      morph: a -> b at t
             {"a": BLEND, "walk": {"offset": X, "direction": D}}      walk: D 'ones' or {"random": seed}
             {"grid": [4 keys], "u": U, "v": V, "method": M[, "whole_rows": COLS]}
    neg:     like cond (prompt or morph); absent where guidance <= 1 (the negative is never used)
    noise:   {"seed": S} | {"seed": S, "to": S2, "t": T} | {"circle": [S1, S2], "s": X}
    scalars: {"guidance": G, ...the other scalars its mode uses..., ["lora": {name: scale}]}
    mode:    {"mode": NAME, ["init": HASH], ["mask": HASH], ["depth": HASH | "estimated"], ["prev": KEY | None]}

where BLEND is ``[[embedding key, weight], ...]`` with weights summing to 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

__all__ = ["Blend", "Cond", "ModeSpec", "Noise", "Recipe"]

#: ``[[embedding key, weight], ...]`` (lists, as JSON gives them back), weights summing to 1.
Blend = Sequence[Sequence[Any]]


class _View:
    """A read-only view of one recipe dict (or part of one)."""

    __slots__ = ("raw",)

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.raw = raw

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.raw == self.raw  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        raise TypeError(f"unhashable type: {type(self).__name__!r} (a view of a dict)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.raw!r})"


class Cond(_View):
    """Conditioning: one blend (``prompt``), two eased into each other (``morph``), a ``walk`` away
    from one, or a cell of a four-corner ``grid``."""

    __slots__ = ()

    @property
    def kind(self) -> Literal["prompt", "morph", "walk", "grid"]:
        raw = self.raw
        if "grid" in raw:
            return "grid"
        if "walk" in raw:
            return "walk"
        return "morph" if "b" in raw else "prompt"

    @property
    def a(self) -> Blend:
        """The blend (``prompt``, ``walk``) or the blend it starts from (``morph``); not for a grid."""
        return self.raw["a"]  # type: ignore[no-any-return]

    @property
    def b(self) -> Blend | None:
        """The blend a ``morph`` goes to (None otherwise)."""
        return self.raw.get("b")

    @property
    def t(self) -> float:
        """How far a ``morph`` is from ``a`` to ``b`` (0.0 otherwise)."""
        return float(self.raw.get("t", 0.0))

    @property
    def method(self) -> str:
        """'slerp' or 'lerp' (a grid: also 'rows'); a single prompt mixes nothing: 'slerp'."""
        return str(self.raw.get("method", "slerp"))

    @property
    def walk_offset(self) -> float:
        return float(self.raw["walk"]["offset"])

    @property
    def walk_direction(self) -> Any:
        """'ones', or ``{"random": seed}``."""
        return self.raw["walk"]["direction"]

    @property
    def corners(self) -> Sequence[str]:
        """A grid's four embedding keys: top left, top right, bottom left, bottom right."""
        return self.raw["grid"]  # type: ignore[no-any-return]

    @property
    def u(self) -> float:
        return float(self.raw["u"])

    @property
    def v(self) -> float:
        return float(self.raw["v"])

    @property
    def whole_rows(self) -> int | None:
        """Grid method 'rows': the row width whose slerp a middle row's cell is part of."""
        cols = self.raw.get("whole_rows")
        return None if cols is None else int(cols)

    def embedding_keys(self) -> list[str]:
        """Every embedding this conditioning reads."""
        raw = self.raw
        if "grid" in raw:
            return list(raw["grid"])
        keys = [k for k, _ in raw["a"]]
        if "b" in raw:
            keys += [k for k, _ in raw["b"]]
        return keys


class Noise(_View):
    """Initial noise: one seed, a seed travelling to another (``to`` at ``t``), or a point ``s`` on the
    circle between two seeds' noises."""

    __slots__ = ()

    @property
    def kind(self) -> Literal["seed", "travel", "circle"]:
        raw = self.raw
        if "circle" in raw:
            return "circle"
        return "travel" if "to" in raw else "seed"

    @property
    def seed(self) -> int:
        """The seed (for a travel: the one it leaves); not for a circle."""
        return int(self.raw["seed"])

    @property
    def to(self) -> int | None:
        to = self.raw.get("to")
        return None if to is None else int(to)

    @property
    def t(self) -> float:
        return float(self.raw.get("t", 0.0))

    @property
    def circle(self) -> tuple[int, int]:
        a, b = self.raw["circle"]
        return int(a), int(b)

    @property
    def s(self) -> float:
        return float(self.raw["s"])


class ModeSpec(_View):
    """The mode and its inputs, by content hash; ``prev`` is the key of the frame a feedback frame
    starts from (None for the first of a chain, and for every other mode)."""

    __slots__ = ()

    @property
    def name(self) -> str:
        return str(self.raw["mode"])

    @property
    def init(self) -> str | None:
        return self.raw.get("init")

    @property
    def mask(self) -> str | None:
        return self.raw.get("mask")

    @property
    def depth(self) -> str | None:
        """The depth map's content hash, 'estimated' (depth2img without a map), or None."""
        return self.raw.get("depth")

    @property
    def prev(self) -> str | None:
        return self.raw.get("prev")

    @property
    def starts_chain(self) -> bool:
        """A feedback frame with no frame before it to feed back (it renders from ``init`` or as txt2img)."""
        return self.raw["mode"] == "feedback" and self.raw.get("prev") is None

    def inputs(self) -> dict[str, Any]:
        """The mode and its inputs without ``prev``: what frames of one pipeline call share."""
        return {k: v for k, v in self.raw.items() if k != "prev"}


class Recipe(_View):
    """A whole frame recipe (``FrameJob.view``)."""

    __slots__ = ()

    @property
    def cond(self) -> Cond:
        return Cond(self.raw["cond"])

    @property
    def neg(self) -> Cond | None:
        """The negative prompt; None where guidance is off (<= 1) and it cannot change pixels."""
        neg = self.raw.get("neg")
        return None if neg is None else Cond(neg)

    @property
    def noise(self) -> Noise:
        return Noise(self.raw["noise"])

    @property
    def mode(self) -> ModeSpec:
        return ModeSpec(self.raw["mode"])

    @property
    def guidance(self) -> float:
        return float(self.raw["scalars"]["guidance"])

    @property
    def scalars(self) -> Mapping[str, float]:
        """The scalars the frame's mode uses (guidance always; strength, zoom... per mode); not LoRA scales."""
        scalars = self.raw["scalars"]
        if "lora" not in scalars:
            return scalars  # type: ignore[no-any-return]
        return {k: v for k, v in scalars.items() if k != "lora"}

    @property
    def all_scalars(self) -> Mapping[str, Any]:
        """The scalars and, under ``"lora"``, the LoRA scales: the recipe's own dict, as the key has it."""
        return self.raw["scalars"]  # type: ignore[no-any-return]

    @property
    def lora(self) -> Mapping[str, float]:
        """Each LoRA's scale at this frame, by name ({} for a scene without LoRAs)."""
        return self.raw["scalars"].get("lora") or {}  # type: ignore[no-any-return]

    def embedding_keys(self) -> list[str]:
        """Every embedding the frame reads (its prompt's, then its negative prompt's)."""
        neg = self.neg
        return self.cond.embedding_keys() + (neg.embedding_keys() if neg is not None else [])
