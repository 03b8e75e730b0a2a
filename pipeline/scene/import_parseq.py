"""A Parseq JSON export as a scene (``render.py import``, ``pipeline.scene.importer``).

A Parseq export holds ``rendered_frames`` (every frame's values: ``scale``, ``strength``, ``zoom``,
``angle``, ``translation_x``... and ``deforum_prompt``, ``"positive --neg negative"``) and ``options``
(``output_fps``). A value given at every frame is written as a schedule of the frames where it bends
(linear between); Deforum's ``strength`` (how much of the previous frame is kept) is 1 minus the
scene's::

    scene, notes = from_parseq(data, "export.json", raw)   # a scene as plain data, what it left out
"""

from __future__ import annotations

from typing import Any

from pipeline.scene.import_common import (
    ImportFailed,
    as_number,
    compact,
    prompt_keyframes,
    series_value,
    where,
)
from pipeline.scene.problems import Problem

# Parseq field -> the scene's value.
PARSEQ_FIELDS: dict[str, str] = {
    "scale": "guidance",
    "strength": "strength",
    "zoom": "zoom",
    "angle": "angle",
    "translation_x": "translate_x",
    "translation_y": "translate_y",
}
# Parseq fields that are bookkeeping, not values.
_PARSEQ_BOOKKEEPING = {"frame", "deforum_prompt", "subseed", "subseed_strength"}


def from_parseq(data: dict[str, Any], shown: str, raw: bytes) -> tuple[dict[str, Any], list[str]]:
    frames = [f for f in data["rendered_frames"] if isinstance(f, dict)]
    rows: dict[int, dict[str, Any]] = {}
    for row in frames:
        n = row.get("frame")
        if isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 1_000_000:
            rows[n] = row
    if not rows:
        line, col = where(raw, "rendered_frames")
        raise ImportFailed(
            Problem(
                shown,
                line,
                col,
                "rendered_frames holds no frames with a 'frame' number; export again from Parseq",
            )
        )
    total = max(rows) + 1
    ordered: list[dict[str, Any]] = []
    for n in range(total):
        ordered.append(rows.get(n) or (ordered[-1] if ordered else rows[min(rows)]))
    notes: list[str] = []
    if len(rows) != total:
        notes.append(f"frames missing from rendered_frames ({total - len(rows)}) take the frame before them")
    options = data.get("options") if isinstance(data.get("options"), dict) else {}
    scene: dict[str, Any] = {}
    fps = as_number(options.get("output_fps"))
    if fps and 0.01 <= fps <= 240:
        scene["fps"] = compact(fps)
    scene["frames"] = total
    scene["mode"] = "feedback"
    notes.append(
        "size is not in a Parseq export: the scene uses 512x512 (set size: to the size you rendered)"
    )
    carried: set[str] = set(_PARSEQ_BOOKKEEPING)
    for field, name in PARSEQ_FIELDS.items():
        # Deforum uses Parseq's per-frame deltas for motion by default (parseq_use_deltas): the
        # scene's zoom, angle and translation are per frame too.
        key = f"{field}_delta" if name in ("zoom", "angle", "translate_x", "translate_y") else field
        if key not in ordered[0]:
            key = field
        values = [as_number(r.get(key)) for r in ordered]
        carried |= {field, f"{field}_delta", f"{field}_pc"}
        if any(v is None for v in values):
            if any(v is not None for v in values):
                notes.append(f"{field}: not a number at every frame, left out")
            continue
        numbers = [v for v in values if v is not None]
        if name == "strength":
            numbers = [1 - v for v in numbers]
        scene[name] = series_value(numbers)
    seeds = [as_number(r.get("seed")) for r in ordered]
    carried |= {"seed", "seed_delta", "seed_pc"}
    if all(s is not None for s in seeds):
        _seeds(scene, [s for s in seeds if s is not None], notes)
    prompts = [
        (n, r["deforum_prompt"]) for n, r in enumerate(ordered) if isinstance(r.get("deforum_prompt"), str)
    ]
    keyframes, negative = prompt_keyframes(prompts, "")
    if negative:
        scene["negative_prompt"] = negative
    if not keyframes:
        keyframes = [{"frame": 0, "prompt": ""}]
        notes.append("no deforum_prompt in rendered_frames: the prompt is empty")
    if any(isinstance(k["prompt"], list) for k in keyframes):
        notes.append("several prompts at once ('A AND B', composable diffusion) are blended as embeddings")
    scene["keyframes"] = keyframes
    others = sorted(
        k
        for k in ordered[0]
        if k not in carried
        and not k.endswith(("_delta", "_pc"))
        and len({repr(r.get(k)) for r in ordered}) > 1
    )
    if others:
        notes.append(f"values that change and that a scene has no place for: {', '.join(others)}")
    return scene, notes


def _seeds(scene: dict[str, Any], seeds: list[float], notes: list[str]) -> None:
    first = int(seeds[0])
    if first < 0:
        notes.append("seed -1 (random) is seed 0 here: a scene's frames are reproducible")
        first = 0
    if all(s == seeds[0] for s in seeds):
        scene["seed"] = first
    elif all(s == seeds[0] + n for n, s in enumerate(seeds)):
        scene["seed"] = first
        scene["noise"] = "per_frame"
    else:
        scene["seed"] = first
        notes.append("the seed changes in other ways than +1 a frame: the scene keeps one seed")
