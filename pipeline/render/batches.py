"""The machinery of a render run's loop: the queue of frames ready to render, the writer thread
that encodes and stores them while the next batch renders, the progress bar, and the clean-up and
out-of-memory helpers (``pipeline.render.loop.Renders`` drives them)::

    queue = _ReadyQueue(jobs, group=lambda job: job.batch_group(steps, family))
    writer = _Writer(store)                       # store(job, png_bytes), in a thread of its own
    writer.put(list(zip(batch, images)))          # then writer.wait() -> the keys stored
"""

from __future__ import annotations

import gc
import io
import os
import sys
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.render.loop import Renders


def encode_png(image: Any) -> bytes:
    """PNG bytes of a frame: a PIL image or an HxWx3 uint8 array (fast compression: frames are
    written once and read a few times). PNG bytes pass through as they are."""
    if isinstance(image, bytes):
        return image
    from PIL import Image

    if not isinstance(image, Image.Image):
        if not hasattr(image, "__array_interface__"):
            raise TypeError(
                f"the renderer returned a {type(image).__name__} for a frame; "
                "expected a PIL image, an HxWx3 uint8 array or PNG bytes"
            )
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class _Writer:
    """Stores rendered frames (PNG encoding, then the cache) in a thread of its own while the device
    renders the next batch. Pillow's encoder and SQLite release the GIL, so the two overlap; the
    frames of a batch are encoded by up to ``ENCODERS`` threads at once (one 512x512 frame takes
    about 40 ms to encode, as long as a fast GPU takes to render it) and stored in order.

    One batch at a time: the driver hands over batch k+1 only once batch k is stored (``wait``), so
    at most two batches of images are held (one being stored, one just rendered) and a kill -9 loses
    at most those. A frame is stored whole or not at all (``Store.put``); a store that fails stops
    the writer, and ``wait`` raises its error in the driver.
    """

    ENCODERS = min(4, os.cpu_count() or 1)

    def __init__(self, store: Callable[[Any, bytes], None]):
        self._store = store
        self._encoders = ThreadPoolExecutor(self.ENCODERS, thread_name_prefix="png encoder")
        self._cond = threading.Condition()
        self._batch: list[tuple[Any, Any]] | None = None  # handed over, not stored yet
        self._stored: list[str] = []  # keys stored, not yet collected by wait()
        self._closed = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="frame writer", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> bool:
        """Whether ``wait`` has something to say: a batch being stored, keys stored, or an error."""
        return self._batch is not None or bool(self._stored) or self.error is not None

    def put(self, batch: list[tuple[Any, Any]]) -> None:
        """Hand over (job, image) pairs; the batch before must have been waited for."""
        with self._cond:
            assert self._batch is None, "the batch before is still being stored"
            if batch:
                self._batch = batch
                self._cond.notify_all()

    def wait(self) -> list[str]:
        """The keys stored since the last call, once the batch handed over is stored."""
        with self._cond:
            while self._batch is not None:
                self._cond.wait()
            keys, self._stored = self._stored, []
        if self.error is not None:
            raise self.error
        return keys

    def close(self) -> None:
        """Store what was handed over, then end the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        self._encoders.shutdown()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._batch is None and not self._closed:
                    self._cond.wait()
                if self._batch is None:
                    return
                batch = self._batch
            pngs = [self._encoders.submit(encode_png, image) for _, image in batch]
            for (job, _), png in zip(batch, pngs, strict=True):
                if self.error is not None:
                    break  # a full disk fails every frame after it: say it once
                try:
                    self._store(job, png.result())
                except BaseException as exc:  # handed to the driver by wait()
                    self.error = exc
                else:
                    with self._cond:
                        self._stored.append(job.key)
            with self._cond:
                self._batch = None
                self._cond.notify_all()


class _Bar:
    """The progress bar, and the progress callback beside it: both hear of every frame done."""

    def __init__(self, bar: Any, renders: Renders):
        self.bar = bar
        self.renders = renders

    def update(self, n: int) -> None:
        self.bar.update(n)
        with self.renders._told:  # counted while the writer may be telling of a frame
            self.renders.done += n
        if self.renders.progress is not None:
            self.renders._tell(())

    def set_postfix_str(self, text: str) -> None:
        self.bar.set_postfix_str(text)

    def close(self) -> None:
        self.bar.close()


class _ReadyQueue:
    """Frames to render, by batch group, in frame order; a feedback frame becomes ready when the
    frame before it is finished. Every operation is O(1) per frame, so a 100,000-frame render spends
    no time re-scanning what is left."""

    def __init__(self, jobs: list[Any], group: Callable[[Any], str]):
        self.group = group  # a job's batch group (FrameJob.batch_group for the plan's steps and family)
        self.remaining = {job.key: job for job in jobs}
        self.groups: dict[str, deque[Any]] = {}
        self.waiting: dict[str, list[Any]] = {}
        for job in jobs:
            prev = job.view.mode.prev
            if prev in self.remaining:
                self.waiting.setdefault(prev, []).append(job)
            else:
                self.put_back(job)

    def put_back(self, job: Any) -> None:
        self.groups.setdefault(self.group(job), deque()).append(job)

    def next_batch(self, size: int) -> list[Any]:
        """Up to ``size`` ready frames that share their settings; [] when none is ready."""
        for group, jobs in list(self.groups.items()):
            if not jobs:
                del self.groups[group]
                continue
            return [jobs.popleft() for _ in range(min(size, len(jobs)))]
        return []

    def finish(self, key: str) -> None:
        self.remaining.pop(key, None)
        for job in self.waiting.pop(key, []):
            self.put_back(job)


def _say_takeovers(claims: Any) -> None:
    """Say which void claims of other processes are ours now, one line per owner (even with -q)."""
    from tqdm import tqdm

    owners: dict[str, tuple[int, str]] = {}
    for old, why in claims.taken_over:
        count, first_why = owners.get(old.describe(), (0, why))
        owners[old.describe()] = (count + 1, first_why)
    for claimed, (count, why) in owners.items():
        frames = "a frame" if count == 1 else f"{count} frames"
        tqdm.write(f"taking over {frames} {claimed}: {why}", file=sys.stderr)
    claims.taken_over.clear()


def _quietly(fn: Any, *args: Any) -> None:
    """Run a clean-up step whose failure (a full disk, say) must not hide the error being raised."""
    try:
        fn(*args)
    except Exception as exc:
        print(f"warning: clean-up failed: {exc}", file=sys.stderr)


def _out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
