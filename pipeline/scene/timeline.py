"""The timeline of a scene: which frames its keyframes are at, and how many frames it has.

A keyframe's frame is a whole number or seconds (``2.5s``, rounded to the nearest frame at the
scene's fps); a scene lasts ``frames``, or ``duration`` seconds, or until its last keyframe (or
schedule point); a walk or a grid has its own count::

    parse_frame_ref("2.5s", 12.0)                    # 30
    problems, timeline = check_timeline(scene, doc)  # timeline.frames, timeline.total

Below the models (``pipeline.scene.schema`` reads frame references and durations with these
functions); :func:`check_timeline` reads a scene's fields and needs no model class.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING, Any, NamedTuple

from pipeline.scene.problems import Problem, shorten
from pipeline.scene.yamlio import YamlDoc

if TYPE_CHECKING:
    from pipeline.scene.schema import SceneFields

SECONDS = re.compile(r"^(\d+(?:\.\d+)?)s$")
MAX_FRAMES = 1_000_000


class Timeline(NamedTuple):
    """A scene's frames: each keyframe's, the count the scene declares (if it does), and the total."""

    frames: list[int]
    declared_total: int | None
    total: int


def seconds_to_frames(seconds: Decimal, fps: float) -> int:
    """Seconds at ``fps`` as a frame count: rounded to the nearest frame, halves up (0.25s at 10 fps is 3).

    Computed in decimal from the digits as written, so that ``1.15s`` at 10 fps is exactly 11.5
    frames (rounded up to 12) rather than the binary 11.4999... that ``float`` would make of it, and
    so that no number of seconds, however long, overflows.
    """
    frames = (seconds * Decimal(repr(float(fps)))).to_integral_value(rounding=ROUND_HALF_UP)
    return int(frames)


def parse_frame_ref(ref: int | str, fps: float) -> int:
    """A keyframe's frame (already checked by the model): an int, or seconds like '2.5s' at ``fps``."""
    if isinstance(ref, int):
        return ref
    m = SECONDS.match(ref.strip())
    assert m is not None
    return seconds_to_frames(Decimal(m.group(1)), fps)


def parse_duration(value: str | float) -> Decimal | None:
    """A duration in seconds (a number, or text like '10s'), exactly as written; None if it is not one."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Decimal(repr(value)) if value > 0 and math.isfinite(value) else None
    m = SECONDS.match(str(value).strip())
    if m and Decimal(m.group(1)) > 0:
        return Decimal(m.group(1))
    return None


def check_timeline(
    scene: SceneFields,
    doc: YamlDoc,
    *,
    gone: Callable[..., bool],
    removed: set[tuple[Any, ...]],
) -> tuple[list[Problem], Timeline]:
    """The scene's timeline and its problems: where the frames come from (walk, grid or keyframes),
    keyframes in increasing order inside the scene, prompts at keyframes, and at most MAX_FRAMES.

    ``gone(*names)`` says whether a value of one of these names was set aside as badly typed (rules
    about its absence then keep quiet); ``removed`` holds the paths set aside.
    """
    problems: list[Problem] = []
    add = problems.append
    fps = scene.fps

    # Where the frames come from (walk, grid or keyframes), and how long the scene is.
    sources = [name for name in ("walk", "grid") if getattr(scene, name) is not None]
    if len(sources) > 1:
        add(doc.problem(("grid",), "a scene is either a walk or a grid, not both"))
    if sources and scene.keyframes:
        add(
            doc.problem(
                ("keyframes",),
                f"a {sources[0]} scene takes no keyframes; its frames come from '{sources[0]}'",
                key=True,
            )
        )
    if not sources and not scene.keyframes and not gone("keyframes", "walk", "grid"):
        add(
            doc.problem(
                (),
                "the scene has no frames: give 'keyframes' (a list with 'frame' and 'prompt'), a 'walk' or a 'grid'",
            )
        )

    declared_total: int | None = scene.frames
    if scene.duration is not None:
        seconds = parse_duration(scene.duration) or Decimal(0)  # its form was checked with the types
        if scene.frames is not None:
            add(doc.problem(("duration",), "give either 'frames' or 'duration', not both"))
        else:
            declared_total = max(1, seconds_to_frames(seconds, fps))
            if declared_total > MAX_FRAMES:
                add(
                    doc.problem(
                        ("duration",),
                        f"duration: {shorten(str(scene.duration), 30)} at {fps:g} fps is "
                        f"{shorten(str(declared_total), 30)} frames; at most {MAX_FRAMES} are allowed",
                    )
                )
                declared_total = None

    frames: list[int] = []
    previous: tuple[int, int] | None = None  # (frame, keyframe index)
    for i, kf in enumerate(scene.keyframes):
        at = ("keyframes", i, "frame")
        n = parse_frame_ref(kf.frame, fps)  # its form was checked with the types
        shown_n = shorten(str(n), 30)
        if n < 0:
            add(doc.problem(at, f"keyframe {i + 1}: frame {shown_n} is negative; frames count from 0"))
        elif declared_total is not None and n >= declared_total:
            add(
                doc.problem(
                    at,
                    f"keyframe {i + 1}: frame {shown_n} is beyond the end; the scene has {declared_total} frames (0 to {declared_total - 1})",
                )
            )
        elif previous is not None and n == previous[0]:
            line = doc.where(("keyframes", previous[1], "frame"))[0]
            add(
                doc.problem(
                    at,
                    f"keyframe {i + 1}: frame {shown_n} repeats the keyframe at line {line}; each frame may have one keyframe",
                )
            )
        elif previous is not None and n < previous[0]:
            add(
                doc.problem(
                    at,
                    f"keyframe {i + 1}: frame {shown_n} comes after frame {previous[0]}; keyframes must be in increasing frame order",
                )
            )
        frames.append(n)
        if n >= 0 and (previous is None or n > previous[0]):
            previous = (n, i)

    stood_in = any(len(path) == 2 and path[0] == "keyframes" for path in removed)
    if (
        scene.keyframes
        and not any(kf.prompt for kf in scene.keyframes)
        and not gone("prompt")
        and not stood_in
    ):
        add(doc.problem(("keyframes",), "no keyframe sets a 'prompt'; at least one must", key=True))
    for i, kf in enumerate(scene.keyframes):
        # Each weight is over 0, so only their sum can go wrong: 1e308 + 1e308 is inf, and every
        # weight divided by it is 0 (a frame conditioned on nothing).
        if kf.prompt and not math.isfinite(sum(part.weight for part in kf.prompt)):
            add(
                doc.problem(
                    ("keyframes", i, "prompt"),
                    f"keyframe {i + 1}: the prompt weights add up to more than the largest number; "
                    "only their ratios count, so write them like 1 and 3",
                )
            )

    if scene.walk is not None:
        total = scene.walk.frames
    elif scene.grid is not None:
        total = scene.grid.rows * scene.grid.cols
    else:
        # Schedule points count like keyframes: the scene lasts until the last of either.
        ends = frames + [p.frame for sched in scene._schedules.values() for p in sched.points]
        total = (
            declared_total
            if declared_total is not None
            else (max(ends) + 1 if ends and max(ends) >= 0 else 1)
        )
    if total > MAX_FRAMES:
        # Point at what made the scene that long: 'frames', or the keyframe furthest out.
        at_total: tuple[Any, ...] = ("frames",)
        if scene.walk is None and scene.grid is None and declared_total is None and frames:
            at_total = ("keyframes", frames.index(max(frames)), "frame")
        long_schedules = [sc for sc in scene._schedules.values() if sc.points[-1].frame + 1 == total]
        if declared_total is None and long_schedules and (not frames or max(frames) + 1 < total):
            sched = long_schedules[0]
            add(
                Problem(
                    doc.file,
                    *sched.at(sched.points[-1].frame_offset),
                    f"{sched.name}: frame {shorten(str(total - 1), 30)} makes the scene {shorten(str(total), 30)} "
                    f"frames long; at most {MAX_FRAMES} are allowed",
                )
            )
        else:
            add(
                doc.problem(
                    at_total,
                    f"the scene has {shorten(str(total), 30)} frames; at most {MAX_FRAMES} are allowed",
                )
            )

    return problems, Timeline(frames, declared_total, total)
