"""Schedule strings in a scene file (``guidance: "0:(7.5), 30:(9)"``): taken out, checked, made keyframes.

Deforum writes a value as a schedule string (``pipeline.scene.schedules`` parses and evaluates
them). A scene may too, for the eased numbers and a LoRA's scale. The loader takes the strings out
of the data before the types are checked (:func:`take_schedules`), the rules evaluate them over the
scene's frames (:func:`check_schedules`), and once the scene is valid they become ordinary linear
keyframes (:func:`schedules_to_keyframes`), so the planner and every key see only keyframes::

    schedules, problems = take_schedules(doc, text)    # before validation
    schedules_to_keyframes(scene)                     # after the rules pass
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dataclass_field
from itertools import pairwise
from typing import Any

from pipeline.scene.problems import Problem
from pipeline.scene.schedules import (
    EvalError,
    Point,
    ScheduleError,
    looks_like_schedule,
    parse_schedule,
    schedule_values,
)
from pipeline.scene.schema import SCALARS, Keyframe, Lora, SceneFields
from pipeline.scene.yamlio import YamlDoc

# Values a schedule string may give (the eased keyframable numbers).
SCHEDULABLE: tuple[str, ...] = SCALARS


@dataclass
class Schedule:
    """A schedule string of one value, its points, and where its characters are in the file."""

    name: str  # the value's name in messages: 'guidance', or 'loras 1, scale'
    text: str
    points: list[Point]
    line: int
    col: int  # of the string's first character (inside the quotes), or of the value if unknown
    exact: bool  # whether the string is on one line as written, so offsets are columns
    values: list[tuple[int, float]] = dataclass_field(default_factory=list)
    lora: int | None = None  # for a LoRA's scale: its index in 'loras'

    def at(self, offset: int) -> tuple[int, int]:
        return (self.line, self.col + offset) if self.exact else (self.line, self.col)


def take_schedules(doc: YamlDoc, text: str) -> tuple[dict[str, Schedule], list[Problem]]:
    """Take the schedule strings (``guidance: "0:(7.5), 30:(9)"``) out of the data before validation.

    The values stay unwritten at the top level, so before a schedule's first point its first value
    holds (as in Deforum). A malformed schedule is a problem at its column, and is set aside.
    """
    schedules: dict[str, Schedule] = {}
    problems: list[Problem] = []
    lines = text.split("\n")

    def take(holder: dict[str, Any], key: str, path: tuple[Any, ...], name: str, lora: int | None) -> None:
        value = holder.get(key)
        if not isinstance(value, str) or not looks_like_schedule(value):
            return
        del holder[key]
        line, col = doc.where(path)
        source = lines[line - 1] if 0 < line <= len(lines) else ""
        start = col - 1
        if source[start : start + 1] in ("'", '"'):
            start += 1
        exact = source[start : start + len(value)] == value
        sched = Schedule(name, value, [], line, start + 1 if exact else col, exact, lora=lora)
        try:
            sched.points = parse_schedule(value)
        except ScheduleError as exc:
            problems.append(Problem(doc.file, *sched.at(exc.offset), f"{name}: {exc.message}"))
            return
        schedules[name] = sched

    for name in SCHEDULABLE:
        take(doc.data, name, (name,), name, None)
    loras = doc.data.get("loras")
    for i, item in enumerate(loras if isinstance(loras, list) else []):
        if isinstance(item, dict):
            take(item, "scale", ("loras", i, "scale"), f"loras {i + 1}, scale", i)
    return schedules, problems


def bounds(name: str) -> tuple[float | None, float | None, bool]:
    """A scalar's lowest and highest value (and whether the lowest is excluded), from the model."""
    low = high = None
    above = False
    field_info = (
        Lora.model_fields["scale"] if name not in SceneFields.model_fields else SceneFields.model_fields[name]
    )
    for m in field_info.metadata:
        if getattr(m, "ge", None) is not None:
            low = m.ge
        if getattr(m, "gt", None) is not None:
            low, above = m.gt, True
        if getattr(m, "le", None) is not None:
            high = m.le
    return low, high, above


def check_schedules(
    scene: SceneFields, doc: YamlDoc, declared_total: int | None, total: int
) -> list[Problem]:
    """Evaluate each schedule over the scene's frames; problems at the column they are about."""
    problems: list[Problem] = []

    def add(sched: Schedule, offset: int, message: str) -> None:
        problems.append(Problem(doc.file, *sched.at(offset), f"{sched.name}: {message}"))

    for sched in scene._schedules.values():
        if scene.walk is not None or scene.grid is not None:
            add(sched, 0, "a schedule sets keyframes, and a walk or grid takes none; give one number")
            continue
        if sched.lora is not None and sched.lora >= len(scene.loras):
            continue  # that LoRA was set aside as badly typed: already reported
        lora_name = scene.lora_name(scene.loras[sched.lora]) if sched.lora is not None else None
        for i, kf in enumerate(scene.keyframes):
            given = (kf.lora or {}).get(lora_name) if lora_name is not None else getattr(kf, sched.name)
            if given is not None:
                what = f"the scale of LoRA '{lora_name}'" if lora_name is not None else sched.name
                problems.append(
                    doc.problem(
                        ("keyframes", i, "lora", lora_name)
                        if lora_name is not None
                        else ("keyframes", i, sched.name),
                        f"keyframe {i + 1}: {what} is also given by the schedule on line {sched.line}; "
                        "set it in one place",
                    )
                )
        beyond = [p for p in sched.points if declared_total is not None and p.frame >= declared_total]
        for p in beyond:
            add(
                sched,
                p.frame_offset,
                f"frame {p.frame} is beyond the end; the scene has {declared_total} frames (0 to {declared_total - 1})",
            )
        if beyond:
            continue
        try:
            values = schedule_values(sched.points, total, names={"max_f": total - 1, "s": scene.seed})
        except (EvalError, ScheduleError) as exc:
            add(sched, exc.offset, exc.message)
            continue
        low, high, above = bounds(sched.name)
        for frame, value, p in values:
            if (low is not None and (value < low or (above and value == low))) or (
                high is not None and value > high
            ):
                allowed = f"{'over' if above else 'from'} {low:g} to {high:g}" if high is not None else ""
                add(sched, p.offset, f"the value at frame {frame} is {value:g}; allowed: {allowed}")
                break
        else:
            sched.values = [(frame, value) for frame, value, _ in values]
    return problems


def schedules_to_keyframes(scene: SceneFields) -> None:
    """Merge the evaluated schedules into the keyframes, keeping every schedule linear.

    A schedule point at a written keyframe's frame sets its value there; elsewhere a keyframe with
    ``curve: linear`` is added. Where a written keyframe would ease the value otherwise (its
    ``curve``, or the scene's, is not linear; or the point before it ``hold`` s), the frames between
    the two points get keyframes of the linear values, so Deforum's straight lines stay straight.
    """
    frames, keyframes = scene.keyframe_frames, scene.keyframes
    at_frame = {f: i for i, f in enumerate(frames)}

    def linear_into(i: int) -> bool:
        return (keyframes[i].curve or scene.curve).strip() == "linear"

    updates: dict[int, dict[str, Any]] = {}
    for sched in scene._schedules.values():
        points = sched.values
        lora_name = scene.lora_name(scene.loras[sched.lora]) if sched.lora is not None else None

        def put(frame: int, value: float, sched: Schedule = sched, lora_name: str | None = lora_name) -> None:
            if lora_name is None:
                updates.setdefault(frame, {})[sched.name] = value
            else:
                updates.setdefault(frame, {}).setdefault("lora", {})[lora_name] = value

        for (fa, va), (fb, vb) in pairwise(points):
            ia, ib = at_frame.get(fa), at_frame.get(fb)
            bent = (ib is not None and not linear_into(ib)) or (ia is not None and keyframes[ia].hold)
            if bent and fb - fa > 1:
                for n in range(fa + 1, fb):
                    put(n, va + (vb - va) * (n - fa) / (fb - fa))
        for frame, value in points:
            put(frame, value)
    merged: list[Keyframe] = []
    merged_frames: list[int] = []
    index: list[int | None] = []
    order = sorted(set(frames) | set(updates))
    for frame in order:
        i = at_frame.get(frame)
        values = updates.get(frame)
        if i is not None:
            if values and "lora" in values:
                values = {**values, "lora": {**(keyframes[i].lora or {}), **values["lora"]}}
            kf = keyframes[i] if not values else keyframes[i].model_copy(update=values)
        else:
            assert values is not None
            kf = Keyframe.model_construct(
                _fields_set={"frame", "curve", *values}, frame=frame, curve="linear", **values
            )
        merged.append(kf)
        merged_frames.append(frame)
        index.append(i)
    scene.keyframes = merged
    scene._keyframe_frames = merged_frames
    scene._written_index = index
