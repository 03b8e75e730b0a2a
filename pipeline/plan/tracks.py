"""Tracks: each keyframed value of a scene as the keyframes that set it, and its (a, b, t) column.

How values change over time. Each keyframed value (prompt, negative prompt, seed, each scalar,
each LoRA scale, mode and its inputs) has its own track made of the keyframes that set it; the
scene's top-level value is that track's value at frame 0 unless a keyframe at frame 0 sets it. A
value the scene never writes at the top level has no value at frame 0 (its built-in default counts
only when no keyframe sets it). Between two keyframes of a track, the value is eased with the curve
of the later keyframe (or the scene's ``curve``); ``hold: true`` on the earlier one keeps its values
until the later one. Before a track's first keyframe its first value holds; after the last, the
last. Modes and input images never blend: they hold from the keyframe that sets them, and the
top-level value (txt2img, no image) holds before it. A blend of a value with itself is that value::

    tracks = build_tracks(scene)
    pairs, ts = tracks["guidance"].column(scene.total_frames)   # [(0, 0), (0, 1), ...], [0.0, 0.125, ...]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Any

from pipeline.audio.timeline import AudioCurve, curve_parser
from pipeline.plan.curves import parse_curve
from pipeline.plan.keys import round_float
from pipeline.scene.core import Scene
from pipeline.scene.schema import HELD, SCALARS


class Track:
    """One keyframed value: frames ascending, values, the curve into each, and holds."""

    __slots__ = ("curves", "frames", "holds", "values")

    def __init__(self) -> None:
        self.frames: list[int] = []
        self.values: list[Any] = []
        self.curves: list[Callable[[float], float]] = []
        self.holds: list[bool] = []

    def add(self, frame: int, value: Any, curve: Callable[[float], float], hold: bool) -> None:
        self.frames.append(frame)
        self.values.append(value)
        self.curves.append(curve)
        self.holds.append(hold)

    @property
    def schedule(self) -> tuple[Any, ...]:
        """What decides :meth:`column`: tracks keyed at the same frames, with the same curves, share it."""
        return (tuple(self.frames), tuple(self.curves), tuple(self.holds))

    def column(self, total: int) -> tuple[list[tuple[int, int]], list[float]]:
        """For every frame: the indices (a, b) of the values it lies between, and the eased t.

        ``a == b`` (with t 0.0) where the frame takes one value whole: before the first keyframe,
        on a keyframe, after the last, through a hold, and where t rounds to 0 or 1 (so a frame
        whose eased t equals a keyframe's at key precision depends on that keyframe alone).
        Built a segment at a time, not a frame at a time: this runs for 100,000-frame scenes.
        """
        frames, last = self.frames, len(self.frames) - 1
        if last == 0:
            return [(0, 0)] * total, [0.0] * total  # one value: most tracks (a scalar never keyframed)
        pairs = [(0, 0)] * min(frames[0], total)
        ts = [0.0] * len(pairs)
        for i, start in enumerate(frames):
            if start >= total:
                break
            end = min(frames[i + 1] if i < last else total, total)
            here = (i, i)
            if end - start == 1:  # the next keyframe is the next frame (a scene keyed at every frame)
                pairs.append(here)
                ts.append(0.0)
                continue
            if i == last or self.holds[i]:
                pairs += [here] * (end - start)
                ts += [0.0] * (end - start)
                continue
            curve, span = self.curves[i + 1], frames[i + 1] - start
            if isinstance(curve, AudioCurve):  # curve: audio depends on the span, not on u alone
                curve = curve.between(start, frames[i + 1])
            there, between = (i + 1, i + 1), (i, i + 1)
            eased = [round_float(curve((n - start) / span)) for n in range(start + 1, end)]
            pairs.append(here)
            pairs += [here if t == 0.0 else there if t == 1.0 else between for t in eased]
            ts.append(0.0)
            ts += [0.0 if t == 1.0 else t for t in eased]
        return pairs, ts


def build_tracks(scene: Scene) -> dict[str, Track]:
    """Build every track from the keyframes and the scene's top-level values."""
    parse = curve_parser(scene, parse_curve)  # parse_curve, and `audio` from the scene's soundtrack
    default_curve = parse(scene.curve)
    frames, keyframes = scene.keyframe_frames, scene.keyframes
    at_0 = bool(frames) and frames[0] == 0  # keyframes are in order: only the first can be at 0
    hold_at_0 = at_0 and keyframes[0].hold
    # Per keyframe once, not per track, and every field read in one call per keyframe (a scene
    # exported with a keyframe at every frame has 100,000 of them).
    curves = [parse(kf.curve) if kf.curve else default_curve for kf in keyframes]
    holds = [kf.hold for kf in keyframes]
    fields = ("prompt", "negative_prompt", "seed", "lora", *SCALARS, *HELD)
    by_field: dict[str, Sequence[Any]] = (
        dict(zip(fields, zip(*map(attrgetter(*fields), keyframes), strict=True), strict=True))
        if keyframes
        else {}
    )
    tracks: dict[str, Track] = {}

    def track(
        name: str,
        top: Any,
        column: Sequence[Any],
        *,
        has_top: bool = True,
        written: bool = True,
        held: bool = False,
    ) -> None:
        """``column``: the value each keyframe sets (None where it sets none). ``written``: whether the
        scene sets ``top`` itself; a built-in default only counts where no keyframe sets the value."""
        t = Track()
        found = [(i, v) for i, v in enumerate(column) if v is not None]
        # A top-level value is the value at frame 0. A value never written at the top level has no
        # value at frame 0: its first keyframe's value holds before it (as in Deforum and Parseq),
        # rather than a ramp from the built-in default into it.
        if has_top and (written or not found) and not (at_0 and column[0] is not None):
            t.add(0, top, default_curve, held or hold_at_0)
        t.frames += [frames[i] for i, _ in found]
        t.values += [v for _, v in found]
        t.curves += [curves[i] for i, _ in found]
        t.holds += [True] * len(found) if held else [holds[i] for i, _ in found]
        tracks[name] = t

    def field(name: str) -> Sequence[Any]:
        return by_field.get(name, ())  # no keyframes (a walk or a grid): every column is empty

    written = scene.model_fields_set
    track("prompt", None, field("prompt"), has_top=False)
    track(
        "negative_prompt",
        scene.negative_prompt,
        field("negative_prompt"),
        written="negative_prompt" in written,
    )
    seed_written = "seed" in written or scene.noise.seed is not None
    track(
        "seed",
        scene.noise.seed if scene.noise.seed is not None else scene.seed,
        field("seed"),
        written=seed_written,
    )
    for name in SCALARS:
        track(name, getattr(scene, name), field(name), written=name in written)
    for lora in scene.loras:
        name = scene.lora_name(lora)
        scales = [(scales or {}).get(name) for scales in field("lora")]
        track(f"lora:{name}", lora.scale, scales, written="scale" in lora.model_fields_set)
    # Modes and input images never blend: the top-level value (txt2img, no image) holds until the
    # keyframe that sets another, written or not.
    for name in HELD:
        track(name, getattr(scene, name), field(name), held=True)
    return tracks
