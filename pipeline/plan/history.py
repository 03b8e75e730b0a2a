"""The last plan of each scene, kept in the cache's records store, so that ``--plan`` can say why a
frame is not cached: never rendered, or which of its inputs changed since the last render::

    previous = load_plan(cache.records, scene.path)
    why = frame_status(plan, previous, cached_keys)      # ["cached", "changed: prompt, noise", ...]
    # Frames another render is working on right now (pipeline.store.claims.live_claims):
    why = frame_status(plan, previous, cached_keys, live_claims(cache.records))
    # [..., "claimed by host render-2 pid 4242 since 14:03:11", ...]

Records are compressed JSON (recipes repeat a lot), so a 100,000-frame plan stays a few MB.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.plan.planner import Plan
from pipeline.plan.recipe import Recipe
from pipeline.store.cache import Store
from pipeline.store.records import plan_key

_BASE_FIELDS = {
    "model": "model weights",
    "pipeline": "pipeline",
    "family": "model family",
    "scheduler": "scheduler",
    "steps": "steps",
    "size": "size",
    "device": "device",
    "dtype": "dtype",
    "libraries": "library versions",
    "clip_skip": "clip_skip",
    "t5": "t5",
    "learned": "learned embeddings",
    "loras": "LoRA files",
    "v": "renderer version",
}


def save_plan(records: Store, scene_path: Path, plan: Plan) -> None:
    """Remember this plan as the scene's latest (called when a render starts)."""
    data = {"base": plan.base, "keys": [j.key for j in plan], "recipes": [j.recipe for j in plan]}
    records.put(plan_key(scene_path), zlib.compress(json.dumps(data, separators=(",", ":")).encode(), 6))


def load_plan(records: Store | None, scene_path: Path) -> dict[str, Any] | None:
    """The scene's last recorded plan, or None (never rendered, unreadable, or no cache yet)."""
    if records is None:
        return None
    blob = records.get(plan_key(scene_path))
    if blob is None:
        return None
    try:
        return json.loads(zlib.decompress(blob))
    except (zlib.error, ValueError):
        return None


def _changed_fields(new: Recipe, old: Recipe) -> list[str]:
    names: list[str] = []
    if new.cond != old.cond:
        names.append("prompt")
    if new.neg != old.neg:
        names.append("negative prompt")
    if new.noise != old.noise:
        names.append("noise")
    if new.mode.inputs() != old.mode.inputs():
        names.append("mode or its inputs")
    elif new.mode.prev != old.mode.prev:
        names.append("previous frame")
    # The scalars, and the LoRA scales as one ("lora"), sorted by name.
    new_s, old_s = new.all_scalars, old.all_scalars
    names += [name for name in sorted(set(new_s) | set(old_s)) if new_s.get(name) != old_s.get(name)]
    return names


def _changes(new: Recipe, old: Any) -> list[str]:
    """What changed from ``old`` (a recipe read back from the cache's record) to ``new``."""
    try:
        return _changed_fields(new, Recipe(old))
    except (KeyError, TypeError, AttributeError):  # a record from another version, or damaged
        return []


def frame_status(
    plan: Plan,
    previous: dict[str, Any] | None,
    cached: set[str],
    claimed: Mapping[str, Any] | None = None,
) -> list[str]:
    """Per frame: 'cached', or why not ('not rendered yet', 'new frame', 'changed: steps, prompt').

    `claimed` maps frame keys that another render has claimed to its claim (a
    `pipeline.store.claims.Claim`, or the text to show): those frames say 'claimed by host X pid Y since
    HH:MM:SS' instead, since they are being rendered right now.
    """
    claimed = claimed or {}
    base_changes: list[str] = []
    if previous is not None:
        old_base = previous.get("base", {})
        base_changes = [
            label for field, label in _BASE_FIELDS.items() if plan.base.get(field) != old_base.get(field)
        ]
    old_keys: list[str] = previous.get("keys", []) if previous else []
    old_recipes: list[dict[str, Any]] = previous.get("recipes", []) if previous else []
    out: list[str] = []
    for job in plan:
        if job.key in cached:
            out.append("cached")
        elif job.key in claimed:
            claim = claimed[job.key]
            out.append(claim if isinstance(claim, str) else claim.describe())
        elif previous is None:
            out.append("not rendered yet")
        elif job.frame >= len(old_keys):
            out.append("new frame")
        elif old_keys[job.frame] == job.key:
            out.append("not rendered yet")
        else:
            changes = base_changes + _changes(job.view, old_recipes[job.frame])
            out.append("changed: " + (", ".join(changes) if changes else "settings"))
    return out
