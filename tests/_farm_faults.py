"""Fault injection for the render-farm tests, on the worker's side: a worker whose device runs out
of memory above a number of frames per denoising call.

Nothing in the program knows of it: a test swaps a pool's workers for these
(``pool.actor_class = farm.remote_worker(ray, SmallDeviceWorker)``, then ``pool.replace`` each
worker), and Ray imports this module in the worker processes by its name, ``tests._farm_faults``
(the pool puts the checkout on their path).
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.render.farm_worker import RenderWorker

OOM_MESSAGE = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity; 5.12 GiB already allocated)"


class SmallDeviceWorker(RenderWorker):
    """A render worker whose denoising runs out of memory with more than ``max_jobs`` frames, as a
    ``torch.OutOfMemoryError`` (``kind`` "torch") or a RuntimeError with CUDA's text ("runtime")."""

    def __init__(self, threads: int | None = None) -> None:
        super().__init__(threads)
        self.max_jobs = 1 << 30
        self.kind = "torch"
        self.failed: list[int] = []  # the frames of each denoising call that ran out of memory

    def out_of_memory_above(self, max_jobs: int, kind: str) -> list[int]:
        """From now on, fail above ``max_jobs`` frames; returns the failures so far (and forgets them)."""
        self.max_jobs, self.kind = max_jobs, kind
        failed, self.failed = self.failed, []
        return failed

    def load(self, job: dict[str, Any]) -> dict[str, Any]:
        info = super().load(job)
        assert self.renderer is not None
        denoise = self.renderer.denoise

        def limited(jobs: Any, latents: Any) -> Any:
            if len(jobs) > self.max_jobs:
                self.failed.append(len(jobs))
                raise (
                    torch.OutOfMemoryError(OOM_MESSAGE) if self.kind == "torch" else RuntimeError(OOM_MESSAGE)
                )
            return denoise(jobs, latents)

        self.renderer.denoise = limited  # type: ignore[method-assign]
        return info
