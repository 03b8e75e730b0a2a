"""Loading a scene: YAML text (or a file) to a valid :class:`~pipeline.scene.core.Scene` with its
timeline, or a :class:`~pipeline.scene.problems.SceneError` that lists every problem at once as
``FILE:LINE:COL: what is wrong, and what is allowed``::

    scene = load_scene("scenes/dog_cat.yaml")     # raises SceneError listing every problem
    scene.total_frames, scene.keyframe_frames
    scene = parse_scene(text, "dog_cat.yaml")      # the same from text: a pure function of it

Two passes: pydantic checks types and unknown keys (``pipeline.scene.schema``, worded by
``pipeline.scene.messages``); then the scene checks its rules (``pipeline.scene.rules``). A badly
typed value is set aside so that the rules still run on the rest. Schedule strings are taken out
before and become keyframes after (``pipeline.scene.scheduled``). Nothing here imports torch.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pipeline.audio.rules import drive_place, drive_values, take_drives
from pipeline.gcpause import gc_paused
from pipeline.scene.core import Loading, Scene, join_prompt_parts
from pipeline.scene.inputfiles import read_scene_bytes
from pipeline.scene.messages import clean_loc, lookup, problem_from_pydantic
from pipeline.scene.problems import Problem, SceneError
from pipeline.scene.scheduled import Schedule, schedules_to_keyframes, take_schedules
from pipeline.scene.schema import SCALARS
from pipeline.scene.yamlio import YamlDoc, load_yaml_lenient


def load_scene(path: str | Path, *, allow_outside_inputs: bool = False) -> Scene:
    """Read, parse and validate a scene file. Raises :class:`SceneError` with every problem."""
    path = Path(path)
    shown = str(path)
    raw = read_scene_bytes(path, shown)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise SceneError(
            [
                Problem(
                    shown,
                    line,
                    col,
                    f"the scene file is not UTF-8 text (byte 0x{raw[exc.start]:02x}"
                    + ("; it starts like UTF-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "")
                    + "); save it as UTF-8",
                )
            ]
        ) from None
    return parse_scene(text, shown, base_path=path, allow_outside_inputs=allow_outside_inputs)


def parse_scene(
    text: str, shown: str, *, base_path: Path | None = None, allow_outside_inputs: bool = False
) -> Scene:
    """Validate scene text; ``shown`` is the file name used in messages.

    Every problem is reported in one go: YAML problems that leave the data usable, type problems,
    and the scene rules (run on the data with the badly typed keys set aside).
    """
    # YAML nodes, plain data and models, none in a cycle: a scene keyed at every frame makes millions.
    with gc_paused():
        return _parse_scene(text, shown, base_path=base_path, allow_outside_inputs=allow_outside_inputs)


def _parse_scene(
    text: str, shown: str, *, base_path: Path | None = None, allow_outside_inputs: bool = False
) -> Scene:
    """:func:`parse_scene`, with the collector paused."""
    doc, problems = load_yaml_lenient(text, shown)
    if not isinstance(doc.data, dict):
        kind = type(doc.data).__name__ if doc.data is not None else "empty"
        raise SceneError(
            [
                *problems,
                doc.problem((), f"the top level of a scene must be a mapping of keys, not a {_kind(kind)}"),
            ]
        )
    schedules, schedule_problems = take_schedules(doc, text)
    problems += schedule_problems
    drives, drive_problems = take_drives(doc, SCALARS)
    problems += drive_problems
    context = Loading(
        (base_path or Path(shown)).resolve(), doc, schedules, set(), allow_outside_inputs, drives
    )
    scene, type_problems = _validate(doc, context)
    problems += type_problems
    if scene is not None:
        problems += context.problems  # the rules', run by the scene itself on the values not set aside
    if problems:
        # One problem per place: a rule (or a type check) about a value already reported repeats it.
        seen: set[tuple[int, int]] = set()
        unique = []
        for p in problems:
            if (p.line, p.col) not in seen:
                seen.add((p.line, p.col))
                unique.append(p)
        raise SceneError(unique)
    assert scene is not None
    join_prompt_parts(scene)
    for name, values in drive_values(scene).items():  # audio-driven values: a point at every frame
        at, lora = drive_place(name)
        schedules[name] = Schedule(name, "", [], *doc.where(at), False, values=values, lora=lora)
    if schedules:
        schedules_to_keyframes(scene)
    return scene


def _validate(doc: YamlDoc, context: Loading) -> tuple[Scene | None, list[Problem]]:
    """Type-check; on errors, set the offending values aside and retry, so the rules can run too.

    Returns the scene (None if it could not be repaired) and the type problems of every round; the
    paths set aside are in ``context.removed``. A value set aside never hides another problem: the
    scene runs its rules on the rest (into ``context.problems``).
    """
    data = copy.deepcopy(doc.data)
    problems: list[Problem] = []
    removed = context.removed
    for _ in range(8):
        try:
            # The scene checks its rules with the file's positions and collects their problems.
            return Scene.model_validate(data, context=context), problems
        except ValidationError as exc:
            errors = exc.errors()
        for err in errors:
            loc = clean_loc(tuple(err["loc"]), doc.data)
            missing = err["type"] == "missing"
            # A required key is missing because its bad value was set aside: already reported,
            # and it now gets a stand-in.
            if not (missing and loc in removed):
                problems.append(problem_from_pydantic(doc, err))
            if any(loc[:depth] in removed for depth in range(1, len(loc) + (0 if missing else 1))):
                continue  # inside a value already set aside (two bad items of one list)
            path = _set_aside(data, loc, err["type"])
            if path is None:
                return None, problems
            removed.add(path)
    return None, problems


# A required key of a list item cannot be removed (the items after it would move) and cannot be
# left out; it gets a stand-in that the rules report at the same place as the original problem
# (and that the one-problem-per-place rule then drops): frame -1 is "negative", an empty path is
# "not a file". An output's stand-in is a valid name of its own, so no rule reports it.
_STAND_INS: dict[str, Any] = {"frame": -1, "text": "", "path": ""}
# The lists whose items are mappings, and the required key of each.
_LIST_ITEMS = {
    "keyframes": "frame",
    "prompt": "text",
    "outputs": "path",
    "embeddings": "path",
    "loras": "path",
}


def _stand_in(item: tuple[Any, ...]) -> dict[str, Any]:
    """A stand-in for the list item at ``item``: its required key with its stand-in value."""
    key = _LIST_ITEMS[item[-2]]
    if item[-2] == "outputs":
        return {key: f"set-aside-{item[-1]}.gif"}
    return {key: _STAND_INS[key]}


def _set_aside(data: Any, loc: tuple[Any, ...], kind: str) -> tuple[Any, ...] | None:
    """Remove the mapping key holding a bad value, or stand in for a required one; the path set aside.

    Never removes a list item: the positions of the items after it must not shift.
    """
    if kind == "missing":
        if len(loc) >= 3 and isinstance(loc[-2], int) and loc[-3] in _LIST_ITEMS and loc[-1] in _STAND_INS:
            item = lookup(data, loc[:-1])
            if isinstance(item, dict):
                item[loc[-1]] = _stand_in(loc[:-1])[loc[-1]]
                return loc
            return None
        loc = loc[:-1]  # a mapping value lacking a required key (walk, grid): set the mapping aside
    if len(loc) >= 2 and isinstance(loc[-1], int) and loc[-2] in _LIST_ITEMS:
        # A list item that is not a mapping at all ('- a dog' for a keyframe): a stand-in item.
        items = lookup(data, loc[:-1])
        if isinstance(items, list) and loc[-1] < len(items):
            items[loc[-1]] = _stand_in(loc)
            return loc
    # The deepest mapping key on the path whose parent is a mapping: its removal falls back to the
    # default. ('noise: travle' is checked as {kind: travle}: the key to remove is 'noise' itself.)
    for depth in range(len(loc), 0, -1):
        key = loc[depth - 1]
        if not isinstance(key, str):
            continue
        parent = lookup(data, loc[: depth - 1])
        if isinstance(parent, dict) and key in parent:
            del parent[key]
            return loc[:depth]
    return None


def _kind(name: str) -> str:
    return {"list": "list", "str": "single value", "int": "number", "float": "number", "bool": "boolean"}.get(
        name, name
    )
