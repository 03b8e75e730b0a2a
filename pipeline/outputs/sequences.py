"""Frame sequences as the writers take them: a ``Sequence`` of RGB ``PIL.Image.Image``, indexed in
order, once. The renderer may hand over a lazy sequence that decodes each frame from the cache on
access, so nothing here holds more than the frame being written; :func:`rubber_band` reorders
without decoding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TypeVar, overload

from PIL import Image

__all__ = ["as_rgb", "check_fps", "check_size", "iter_frames", "require_frames", "rubber_band"]

T = TypeVar("T")


class _IndexedView(Sequence[T]):
    """``base[indices[i]]`` on access: a reordered sequence that decodes nothing up front."""

    def __init__(self, base: Sequence[T], indices: Sequence[int]) -> None:
        self._base = base
        self._indices = list(indices)

    def __len__(self) -> int:
        return len(self._indices)

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> _IndexedView[T]: ...

    def __getitem__(self, index: int | slice) -> T | _IndexedView[T]:
        if isinstance(index, slice):
            return _IndexedView(self._base, self._indices[index])
        return self._base[self._indices[index]]

    def __repr__(self) -> str:
        return f"_IndexedView(len={len(self)}, indices={self._indices[:8]}{'...' if len(self) > 8 else ''})"


def rubber_band(frames: Sequence[T]) -> Sequence[T]:
    """Play the frames forward, then back: ``frames + frames[2:-1][::-1]``.

    This is exactly the formula of the seed document (the Keras latent-walk example), kept
    as-is so outputs match it: n frames become ``n + max(n - 3, 0)``. Note what it does at the
    ends: the last frame is not repeated at the turn (good), but the way back stops at frame 2,
    skipping frame 1, so when the GIF loops the seam goes from frame 2 straight to frame 0.
    For n = 6: 0 1 2 3 4 5 4 3 2 | 0 1 ...

    A list or tuple gives a list (it holds references, not copies). Any other sequence, e.g. a
    lazy one that decodes on access, gives an index-mapped view, so nothing is decoded here and
    each frame is decoded again when the way back reaches it.
    """
    if isinstance(frames, (list, tuple)):
        items = list(frames)
        return items + items[2:-1][::-1]
    n = len(frames)
    indices = list(range(n))
    return _IndexedView(frames, indices + indices[2:-1][::-1])


def iter_frames(frames: Sequence[Image.Image]) -> Iterator[Image.Image]:
    # Index rather than iterate: a lazy sequence need only define __len__ and __getitem__, and
    # yielding `frames[i]` directly (no local variable) keeps no reference to the frame here.
    for i in range(len(frames)):
        yield frames[i]


def require_frames(frames: Sequence[Image.Image], what: str) -> int:
    n = len(frames)
    if n == 0:
        raise ValueError(f"{what}: no frames to write")
    return n


def check_fps(fps: float) -> float:
    fps = float(fps)
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    return fps


def as_rgb(frame: Image.Image) -> Image.Image:
    return frame if frame.mode == "RGB" else frame.convert("RGB")


def check_size(frame: Image.Image, index: int, expected: tuple[int, int] | None) -> tuple[int, int]:
    # Encoders would either fail obscurely or (imageio) rescale; every frame must match frame 0.
    if expected is not None and frame.size != expected:
        raise ValueError(
            f"frame {index} is {frame.size[0]}x{frame.size[1]}, "
            f"but frame 0 is {expected[0]}x{expected[1]}; all frames must have the same size"
        )
    return frame.size
