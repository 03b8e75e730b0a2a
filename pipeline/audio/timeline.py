"""The soundtrack on the scene's frame axis: beats and onsets as frames, a feature per frame, and the
``audio`` curve. Pure Python on the analysis' JSON (no numpy, no librosa), so the planner stays light::

    tl = scene_timeline(scene)                 # None for a scene without audio
    tl.ref_frames("beat")                      # [6, 12, 18, ...]: frame of each beat after `start`
    tl.feature_frames("rms", 48)               # 0..1 per frame (1 at the song's loudest)
    AudioCurve(tl.cumulative_frames(48)).between(0, 24)(0.5)

Frame ``f`` covers ``[start + f/fps, start + (f+1)/fps)`` seconds of the song. A feature's value
there is its mean over that window, over its maximum in the whole song; an event (beat, onset) at
``t`` seconds is at frame ``(t - start) * fps`` rounded to the nearest, halves up (as ``2.5s``
keyframes are).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from itertools import accumulate, pairwise
from typing import Any

__all__ = ["AUDIO_CURVE", "AudioCurve", "AudioTimeline", "curve_parser", "scene_timeline"]

# The curve name that makes a keyframe's eased t follow the cumulative onset strength.
AUDIO_CURVE = "audio"


@dataclass
class AudioTimeline:
    """A scene's soundtrack: the file as written, its content hash, where frame 0 falls, and (when
    the scene uses beats, onsets or features) the analysis and its record key."""

    file: str
    sha256: str
    start: float
    fps: float
    duration: float
    analysis: dict[str, Any] | None = None
    key: str | None = None
    _cumulative: dict[str, list[float]] = field(default_factory=dict, repr=False)

    def frame_of(self, seconds: float) -> int:
        """The frame an event at ``seconds`` into the song falls on (may be negative: before ``start``)."""
        offset = (Decimal(repr(seconds)) - Decimal(repr(self.start))) * Decimal(repr(float(self.fps)))
        return int(offset.to_integral_value(rounding=ROUND_HALF_UP))

    def ref_frames(self, kind: str) -> list[int]:
        """The frames of the beats (``kind`` 'beat') or onsets ('onset') from ``start`` on, in order."""
        assert self.analysis is not None
        times = self.analysis["beats" if kind == "beat" else "onsets"]
        return [f for f in map(self.frame_of, times) if f >= 0]

    def _integral(self, name: str, seconds: float) -> float:
        """The feature's envelope summed from the song's start to ``seconds`` (in hops; linear in a hop)."""
        assert self.analysis is not None
        env = self.analysis["env"][name]
        cum = self._cumulative.get(name)
        if cum is None:
            cum = self._cumulative[name] = [0.0, *accumulate(env)]
        x = max(0.0, seconds / self.analysis["hop_s"])
        j = math.floor(x)
        if j >= len(env):
            return cum[-1]
        return cum[j] + (x - j) * env[j]

    def feature_frames(self, name: str, total: int) -> list[float]:
        """Per frame, the feature's mean over the frame's window over its song-wide maximum (0 to 1)."""
        assert self.analysis is not None
        peak = max(self.analysis["env"][name], default=0.0)
        width = 1.0 / self.fps / self.analysis["hop_s"]  # a frame's window, in hops
        edges = [self._integral(name, self.start + f / self.fps) for f in range(total + 1)]
        if peak <= 0:
            return [0.0] * total
        return [min(1.0, max(0.0, (b - a) / width / peak)) for a, b in pairwise(edges)]

    def cumulative_frames(self, total: int) -> list[float]:
        """The onset strength summed from ``start`` to each frame's start, for frames 0 to ``total``."""
        base = self._integral("onset", self.start)
        return [self._integral("onset", self.start + f / self.fps) - base for f in range(total + 1)]

    def describe(self, kind: str = "beat", limit: int = 12) -> str:
        """One line for ``--plan``: the file, the tempo and where the first beats fall."""
        head = f"audio {self.file} from {self.start:g}s"
        if self.analysis is None:
            return head
        frames = self.ref_frames(kind)
        shown = ", ".join(map(str, frames[:limit])) + (", ..." if len(frames) > limit else "")
        return f"{head}: {len(frames)} beats ({self.analysis['tempo']:g} bpm) at frames {shown or 'none'}"


def scene_timeline(scene: Any) -> AudioTimeline | None:
    """The timeline the loader made for ``scene`` (None when it has no audio)."""
    return getattr(scene, "_audio", None)


class AudioCurve:
    """``curve: audio``: between two keyframes the eased t is the share of the span's onset strength
    heard so far, so a morph moves fast where the music is busy and waits where it is quiet. A span
    with no onsets at all is linear. Exact 0 and 1 at the keyframes, like every curve."""

    __slots__ = ("cumulative",)

    def __init__(self, cumulative: list[float]) -> None:
        self.cumulative = cumulative

    def _at(self, x: float) -> float:
        cum = self.cumulative
        j = min(max(math.floor(x), 0), len(cum) - 1)
        if j + 1 >= len(cum):
            return cum[-1]
        return cum[j] + (x - j) * (cum[j + 1] - cum[j])

    def between(self, a: int, b: int) -> Callable[[float], float]:
        """The curve of the span from keyframe frame ``a`` to ``b`` (u in [0, 1] -> eased t)."""
        ca, cb = self._at(a), self._at(b)
        whole = cb - ca

        def curve(u: float) -> float:
            if u <= 0.0:
                return 0.0
            if u >= 1.0:
                return 1.0
            if whole <= 1e-12:
                return u
            return min(1.0, max(0.0, (self._at(a + u * (b - a)) - ca) / whole))

        return curve


def curve_parser(scene: Any, parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` (``curves.parse_curve``), with ``audio`` made from the scene's soundtrack."""
    timeline = scene_timeline(scene)
    made: list[AudioCurve] = []

    def parse_any(spec: str) -> Any:
        if spec.strip() != AUDIO_CURVE or timeline is None or timeline.analysis is None:
            return parse(spec)
        if not made:
            made.append(AudioCurve(timeline.cumulative_frames(scene.total_frames)))
        return made[0]

    return parse_any
