"""Batching frames whose settings differ into as few denoising calls as keep each frame's own pixels.

A diffusers pipeline call takes one guidance scale; :class:`PerFrameGuidance` gives each frame of
a call its own, as a one-frame call would apply it. Frames that cannot share a call (another batch
group, or another scale where the denoiser takes the scale as an input) are split into calls and
their images put back in order::

    calls = denoise_calls(jobs, steps, family, embedded=guidance_embedded(pipe))
    images = in_order(calls.items(), lambda _, picks: render([jobs[i] for i in picks]), len(jobs))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch

from pipeline.plan.planner import FrameJob

K = TypeVar("K")
T = TypeVar("T")


def denoiser(pipe: Any) -> Any:
    """The pipeline's denoising network: its transformer (SD3) or its UNet."""
    return pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet


class PerFrameGuidance(float):
    """A classifier-free guidance scale that is each frame's own inside one batched pipeline call.

    diffusers' pipelines (every family and mode we use, 0.42) take one float and combine the two
    halves of the batch as ``uncond + self.guidance_scale * (text - uncond)``, the scale on the
    left. This float is the first frame's scale, so every ``> 1`` test the pipeline makes answers
    as for each frame of the batch (``FrameJob.batch_group`` keeps guided and unguided frames
    apart); multiplied with a batch tensor it scales sample ``i`` by ``scales[i]``, each product
    computed in float32 and rounded once to the tensor's dtype, as ``tensor * float`` rounds it: a
    frame's pixels are those of a one-frame call with its own scale. ``used`` counts the tensor
    products, so a diffusers that stops multiplying this way is caught (:meth:`check_used`).
    """

    scales: tuple[float, ...]
    used: int

    def __new__(cls, scales: Sequence[float]) -> PerFrameGuidance:
        obj = super().__new__(cls, scales[0])
        obj.scales = tuple(float(s) for s in scales)
        obj.used = 0
        return obj

    def __mul__(self, other: Any) -> Any:
        if not isinstance(other, torch.Tensor):
            return float(self) * other
        if other.ndim == 0 or other.shape[0] != len(self.scales):
            raise RuntimeError(
                f"per-frame guidance for {len(self.scales)} frames met a tensor of shape {tuple(other.shape)}"
            )
        wide = torch.float64 if other.dtype == torch.float64 else torch.float32
        scale = torch.tensor(self.scales, dtype=wide, device=other.device)
        self.used += 1
        return (other.to(wide) * scale.view(-1, *([1] * (other.ndim - 1)))).to(other.dtype)

    __rmul__ = __mul__

    def check_used(self, pipe: Any) -> None:
        if self.used == 0 and len(set(self.scales)) > 1:
            raise RuntimeError(
                f"{type(pipe).__name__} did not apply its guidance scale as a factor on the left; "
                "per-frame guidance does not support this diffusers version"
            )


def guidance_embedded(pipe: Any) -> bool:
    """Whether the denoiser takes the guidance scale as an input (LCM-style ``time_cond_proj_dim``):
    then frames with different scales cannot share a call."""
    return getattr(getattr(denoiser(pipe), "config", None), "time_cond_proj_dim", None) is not None


def denoise_calls(
    jobs: Sequence[FrameJob], steps: int, family: str, *, embedded: bool
) -> dict[tuple[str, float | None], list[int]]:
    """The indices of ``jobs`` in each pipeline call: one call per ``batch_group`` (each frame with its
    own guidance scale), except with a denoiser that takes the scale as an input (``embedded``),
    where each scale has its call."""
    calls: dict[tuple[str, float | None], list[int]] = {}
    for i, job in enumerate(jobs):
        guidance = job.view.guidance if embedded else None
        calls.setdefault((job.batch_group(steps, family), guidance), []).append(i)
    return calls


def in_order(
    groups: Iterable[tuple[K, list[int]]], render: Callable[[K, list[int]], Sequence[T]], total: int
) -> list[T]:
    """``render(group, picks)`` for each group and its indices, the results put back at their indices."""
    out: list[T] = [None] * total  # type: ignore[list-item]
    for group, picks in groups:
        for i, item in zip(picks, render(group, picks), strict=True):
            out[i] = item
    return out
