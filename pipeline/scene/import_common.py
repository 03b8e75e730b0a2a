"""What the importers of other tools' files share (``pipeline.scene.importer``): the located failure,
positions in JSON, numbers written short, a per-frame series as a schedule, and Deforum's prompts
(``"a dog: 1 AND a cat: 0.5 --neg blurry"``) as keyframes::

    series_value([7, 7.5, 8, 8])      # '0:(7), 2:(8), 3:(8)': the frames where it bends
    split_prompt("a dog --neg blurry")  # ('a dog', 'blurry')
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from pipeline.scene.problems import Problem


class ImportFailed(Exception):
    """The file is not one of the formats: carries the located problem."""

    def __init__(self, problem: Problem):
        super().__init__(str(problem))
        self.problem = problem


def where(raw: bytes, key: str) -> tuple[int, int]:
    """Line and column of the first ``"key"`` in the file (JSON keeps no positions): for messages."""
    at = raw.find(json.dumps(key).encode())
    if at < 0:
        return (1, 1)
    return (raw.count(b"\n", 0, at) + 1, at - (raw.rfind(b"\n", 0, at) + 1) + 1)


def as_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def compact(value: float) -> float | int:
    """A value as short as it can be written (7.0 -> 7)."""
    rounded = round(value, 10)
    return int(rounded) if rounded == int(rounded) and abs(rounded) < 2**53 else rounded


def bends(values: Sequence[float]) -> list[int]:
    """The frames of a per-frame series where its slope changes (and the first and last): linear
    interpolation between them gives the series back."""
    keep = [0]
    for n in range(1, len(values) - 1):
        before, after = values[n] - values[n - 1], values[n + 1] - values[n]
        if abs(after - before) > 1e-9 * max(1.0, abs(values[n])):
            keep.append(n)
    if len(values) > 1:
        keep.append(len(values) - 1)
    return keep


def series_value(values: Sequence[float]) -> float | int | str:
    """A per-frame series as one number, or a schedule string of the frames where it bends."""
    if all(v == values[0] for v in values):
        return compact(values[0])
    return ", ".join(f"{n}:({compact(values[n])})" for n in bends(values))


def split_prompt(text: str) -> tuple[list[dict[str, Any]] | str, str]:
    """Deforum's prompt ``"a dog: 1 AND a cat: 0.5 --neg blurry"``: (prompt or blend, negative)."""
    positive, _, negative = text.partition("--neg")
    parts = [p.strip() for p in positive.split(" AND ")]
    blend: list[dict[str, Any]] = []
    for part in parts:
        body, sep, weight = part.rpartition(":")
        w = None
        if sep:
            try:
                w = float(weight)
            except ValueError:
                w = None
        if w is None:
            blend.append({"text": part, "weight": 1.0})
        elif w > 0 and math.isfinite(w):
            blend.append({"text": body.strip(), "weight": compact(w)})
    negative = negative.strip()
    if len(blend) == 1 and blend[0]["weight"] == 1.0:
        return blend[0]["text"], negative
    return blend or parts[0], negative


def prompt_keyframes(prompts: list[tuple[int, str]], negative_top: str) -> tuple[list[dict[str, Any]], str]:
    """Keyframes for prompts that switch at their frames (each holds until the next)."""
    split = [(frame, *split_prompt(text)) for frame, text in prompts]
    negatives = {neg for _, _, neg in split}
    common = negatives.pop() if len(negatives) == 1 else None
    top = " ".join(x for x in (common or "", negative_top) if x)
    keyframes: list[dict[str, Any]] = []
    last: tuple[Any, Any] | None = None
    for frame, prompt, neg in split:
        if last == (prompt, neg):
            continue
        kf: dict[str, Any] = {"frame": frame, "prompt": prompt}
        if common is None:
            kf["negative_prompt"] = " ".join(x for x in (neg, negative_top) if x)
        kf["hold"] = True
        keyframes.append(kf)
        last = (prompt, neg)
    if keyframes:
        keyframes[-1].pop("hold")
    return keyframes, top
