"""One render run: render the frames that are not cached, then (re)write the outputs that changed.

torch is imported only when at least one frame must be rendered, so a no-op re-run is quick::

    targets = check_outputs(scene, out_dir)
    result = run(scene, env, ref, plan, cache, cached_keys, targets, batch_size=None)
    result["rendered"], result["cached"], result["outputs"]

An output's key is the keys of its frames plus its own settings; when the file at its path is the
one we wrote for that key, it is left alone.
"""

from __future__ import annotations

import errno
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from pipeline.outputs.assemble import FrameMissing, Keeper, assemble, readable_frames
from pipeline.outputs.record import record_names, write_record
from pipeline.outputs.targets import Target, Targets, left_behind
from pipeline.plan.planner import Plan
from pipeline.render.batches import (
    _Bar,
    _free_memory,
    _out_of_memory,
    _quietly,
    _ReadyQueue,
    _say_takeovers,
    _Writer,
)
from pipeline.render.environment import RenderEnv
from pipeline.render.modelfiles import ModelError, ModelRef
from pipeline.scene.core import Scene
from pipeline.store.cache import CacheDir, CacheReadOnly
from pipeline.store.claims import Claims

# Frames per pipeline call by device: small on CPU (no gain from more), larger on a GPU.
DEFAULT_BATCH = {"cpu": 4, "mps": 4, "cuda": 8}


@dataclass(frozen=True)
class Progress:
    """What a progress callback is handed: as frames are stored or found done (stage "frames"), and
    once the outputs are written (stage "outputs").

    ``keys`` are the frame keys this process has just rendered and stored (empty for frames that were
    cached or rendered by another process sharing the cache, and for outputs).
    """

    stage: str  # "frames" or "outputs"
    done: int
    total: int
    rendered: int
    keys: tuple[str, ...] = ()


def run(
    scene: Scene,
    env: RenderEnv,
    ref: ModelRef,
    plan: Plan,
    cache: CacheDir,
    cached: set[str],
    targets: list[Target],
    *,
    batch_size: int | None,
    quiet: bool = False,
    make_renderer: Callable[[], Any],
    progress: Callable[[Progress], None] | None = None,
    command: str | None = None,
    overwrite: bool = False,
    model: str | None = None,
) -> dict[str, Any]:
    """Render what is missing, store each frame as it finishes, then write the outputs and the record.

    ``make_renderer()`` builds the batch renderer (loading the model) the first time a frame must
    render; ``progress`` is called with a :class:`Progress` after each step. Outputs a re-render
    replaces are kept in ``previous/`` unless ``overwrite``; ``command`` and ``model`` (a --model
    override) go into the record (``pipeline.outputs.record``).
    """
    renderer: Renders | None = None
    out_dir = targets.out_dir if isinstance(targets, Targets) else None
    names = record_names(scene)
    keep = Keeper(out_dir, out_dir / names["record"]) if out_dir is not None and not overwrite else None
    for _attempt in range(3):
        todo = {job.key: job for job in plan if job.key not in cached}
        if todo:
            renderer = renderer or Renders(
                plan, cache, make_renderer(), env.device, batch_size, quiet, progress
            )
            renderer.run(list(todo.values()), len(plan) - len(todo))
        try:
            status = assemble(scene, plan, cache, targets, keep=keep, model=model or env.model)
            break
        except FrameMissing:
            # A cached frame was corrupt (the cache warned): render every unreadable frame again.
            cached = readable_frames(cache, plan)
    else:
        raise RuntimeError("frames keep disappearing from the cache while outputs are written")
    notes = left_behind(scene, targets, cache) if isinstance(targets, Targets) else []
    record: list[str] = []
    if out_dir is not None and ("written" in status.values() or not (out_dir / names["record"]).exists()):
        # The record follows the outputs: written with them, kept with them.
        kept = keep if keep is not None and keep.folder is not None else None
        record = [
            str(p)
            for p in write_record(
                out_dir, scene, env, ref, plan, targets, status, command=command, model=model, keep=kept
            )
        ]
    if keep is not None and keep.folder is not None:
        notes.append(
            f"the outputs this run replaced are kept in {keep.folder} (--overwrite replaces them instead)"
        )
    # Frames this process rendered; the rest came from the cache (or from another render sharing it).
    rendered = sum(1 for job in plan if renderer and job.key in renderer.rendered)
    if progress is not None:
        progress(Progress("outputs", len(plan), len(plan), rendered))
    return {
        "scene": str(scene.path),
        "frames": len(plan),
        "rendered": rendered,
        "cached": len(plan) - rendered,
        "renders": len(renderer.rendered) if renderer else 0,
        "embeddings_encoded": renderer.encoded if renderer else 0,
        "outputs": [str(t.path) for t in targets],
        "output_status": status,
        "record": record,
        "previous": str(keep.folder) if keep is not None and keep.folder is not None else None,
        "notes": notes,
        "device": env.device,
        "dtype": env.dtype,
        "model": env.model,
    }


class Renders:
    """The rendering half of a run: loads the model once, then renders frame jobs as they become ready.

    - Frames are claimed before they render, so several processes sharing a cache split the work
      (see ``pipeline.store.claims``); frames claimed by a live process are waited for, not rendered.
    - Frames batch by ``FrameJob.batch_group``: keyframed guidance, prompts, negative prompts, seeds
      and motion share a call; a LoRA scale, a mode or input image, or a strength that leaves another
      number of denoising steps does not.
    - The device renders batch k+1 while a writer thread (:class:`_Writer`) encodes batch k as PNG
      and stores it; at most those two batches of images are held.
    - A renderer with ``submit(batch) -> Future`` and a ``capacity`` (the render farm,
      ``pipeline.render.farm``) has up to ``capacity`` batches in flight; they are stored as they
      come back, one at a time, as above.
    - A feedback frame is ready once the frame before it is in the cache: chains render in waves.
    - Out of memory halves the batch size and goes on; one frame that still fails is an error. A
      farm worker out of memory fails its batch, which the loop sends again in halves the same way.
    - The first Ctrl-C stores the frames already rendered and stops when the batch on the device
      returns (that batch is not stored: it would come on top of the frames being written); a second
      Ctrl-C stops at once, once the frames already rendered are stored. On a farm it stops when the
      first batch in flight returns, and drops it and the others the same way.
    """

    POLL_S = 0.2

    def __init__(
        self,
        plan: Plan,
        cache: CacheDir,
        renderer: Any,
        device: str,
        batch_size: int | None,
        quiet: bool,
        progress: Callable[[Any], None] | None = None,
    ):
        self.plan = plan
        self.cache = cache
        self.renderer = renderer  # anything with render_batch(jobs) -> [image] (pipeline.app)
        self.batch_size = batch_size or DEFAULT_BATCH.get(device, 4)
        self.quiet = quiet
        self.progress = progress
        # Keys this process rendered (others sharing the cache render the rest).
        self.rendered: set[str] = set()
        self.done = 0  # frames counted done (cached, rendered here or elsewhere)
        self.stop_requested = False
        # The progress callback hears from the main thread and the writer: one at a time.
        self._told = threading.Lock()

    @property
    def encoded(self) -> int:
        return int(getattr(self.renderer, "encoded", 0))

    def run(self, jobs: list[Any], already: int) -> None:
        from tqdm import tqdm  # here: a no-op re-run imports this module and never draws a bar

        if self.cache.readonly:
            raise CacheReadOnly(
                errno.EROFS,
                f"the cache is read-only ({self.cache.readonly_reason}); {len(jobs)} frames are not "
                "cached and cannot be stored: render into a cache you can write (--cache-dir)",
                str(self.cache.path),
            )
        claims = Claims(self.cache.records)  # leases, renewed by a heartbeat while we render
        per_key = Counter(job.key for job in self.plan)  # a held frame repeats one key
        frames_of: dict[str, list[int]] = {}  # frame numbers by key, for the waiting notice
        bar = _Bar(
            tqdm(
                total=len(self.plan),
                initial=already,
                unit="frame",
                disable=self.quiet or None,
                file=sys.stderr,
                dynamic_ncols=True,
            ),
            self,
        )
        self.done = already
        bar.set_postfix_str(f"cached {already}, rendered {len(self.rendered)}")
        steps, family = self.plan.base["steps"], self.plan.base["family"]
        queue = _ReadyQueue(jobs, lambda job: job.batch_group(steps, family))
        elsewhere: dict[
            str, Any
        ] = {}  # claimed by another live process: wait for it, take it over if it dies
        writer = _Writer(self._store)

        def settle(keys: list[str]) -> None:
            """Frames the writer stored: done, no longer claimed, and their feedback frames ready."""
            if not keys:
                return
            _quietly(claims.release, keys)
            for key in keys:
                queue.finish(key)
            bar.update(sum(per_key[key] for key in keys))
            bar.set_postfix_str(f"cached {already}, rendered {len(self.rendered)}")

        previous_handler = self._catch_sigint()
        # Batches sent and not back yet: one with a local renderer, one per worker on a render farm.
        inflight: list[tuple[list[Any], Future[list[Any]]]] = []
        capacity = max(1, int(getattr(self.renderer, "capacity", 1)))
        try:
            while queue.remaining:
                batch = queue.next_batch(self.batch_size) if len(inflight) < capacity else []
                if batch:
                    mine = set(claims.claim(job.key for job in batch))
                    _say_takeovers(claims)
                    # A frame another process finished (and released) since we looked is done already.
                    finished = self.cache.frames.present(mine)
                    for job in batch:
                        if job.key not in mine:
                            elsewhere[job.key] = job
                        elif job.key in finished:
                            queue.finish(job.key)
                            bar.update(per_key[job.key])
                    todo = [job for job in batch if job.key in mine and job.key not in finished]
                    claims.release(finished)
                    if todo:
                        inflight.append((todo, self._submit(todo)))
                    if self.stop_requested:
                        raise KeyboardInterrupt
                    continue
                if inflight:
                    # The device renders while the writer stores the batch before.
                    todo, future = self._collect(inflight)
                    settle(writer.wait())
                    if self.stop_requested:
                        raise KeyboardInterrupt
                    images = self._result(todo, future, inflight)
                    if images is not None:  # else out of memory: its halves were sent again
                        writer.put(list(zip(todo, images, strict=True)))
                    continue
                if writer.pending:
                    # What is ready next may be a feedback frame whose previous frame is being stored.
                    settle(writer.wait())
                    continue
                # Nothing of ours is ready: the rest is being rendered elsewhere (or waits on it).
                for key in self.cache.frames.present(elsewhere):
                    del elsewhere[key]
                    queue.finish(key)
                    bar.update(per_key[key])
                retake = claims.claim(list(elsewhere))  # void claims (owner gone, lease out): ours now
                for key in retake:
                    queue.put_back(elsewhere.pop(key))
                claims.release(retake)  # claimed again, batch by batch, when they come up
                _say_takeovers(claims)
                if elsewhere:
                    # Said even with -q: a run that waits without a word looks hung.
                    if not frames_of:
                        for job in self.plan:
                            frames_of.setdefault(job.key, []).append(job.frame)
                    for line in claims.wait_notice({key: frames_of[key] for key in elsewhere}):
                        tqdm.write(line, file=sys.stderr)
                if not retake and queue.remaining:
                    time.sleep(self.POLL_S)
        finally:
            # Frames rendered are stored whatever ended the loop (a frame is never rendered for nothing
            # when it can be kept); a store that fails is reported by writer.wait() in the loop.
            writer.close()
            _quietly(claims.close)  # stops the heartbeat; releases what an error left claimed
            bar.close()
            if previous_handler is not None:
                # Once stopping, further Ctrl-Cs are ignored until the process has exited cleanly.
                signal.signal(signal.SIGINT, signal.SIG_IGN if self.stop_requested else previous_handler)

    def _submit(self, batch: list[Any]) -> Future[list[Any]]:
        """Start a batch: on a renderer with ``submit`` (a render farm) it renders elsewhere while
        more are sent; any other renders it here and now (its error raised at once)."""
        submit = getattr(self.renderer, "submit", None)
        if submit is not None:
            return submit(batch)  # type: ignore[no-any-return]
        done: Future[list[Any]] = Future()
        done.set_result(self._render(batch))
        return done

    @staticmethod
    def _collect(inflight: list[tuple[list[Any], Future[list[Any]]]]) -> tuple[list[Any], Future[list[Any]]]:
        """The first batch in flight to come back (the oldest of those back), taken off the list."""
        from concurrent.futures import FIRST_COMPLETED, wait

        while not any(future.done() for _, future in inflight):
            wait([future for _, future in inflight], timeout=1.0, return_when=FIRST_COMPLETED)
        i = next(i for i, (_, future) in enumerate(inflight) if future.done())
        return inflight.pop(i)

    def _result(
        self, batch: list[Any], future: Future[list[Any]], inflight: list[tuple[list[Any], Future[list[Any]]]]
    ) -> list[Any] | None:
        """The images of a batch that came back; None when it ran out of memory (on a farm worker),
        its halves then sent again (to that worker or another) as :meth:`_render` does here."""
        try:
            return list(future.result())
        except Exception as exc:
            half = self._halve(batch, exc)
        inflight.extend((part, self._submit(part)) for part in (batch[:half], batch[half:]))
        return None

    def _render(self, batch: list[Any]) -> list[Any]:
        """Render one batch, halving it on out-of-memory: an image (or PNG bytes) per job."""
        try:
            return list(self.renderer.render_batch(batch))
        except Exception as exc:
            half = self._halve(batch, exc)
        _free_memory()  # out of the except block: the traceback no longer holds the batch's tensors
        return self._render(batch[:half]) + self._render(batch[half:])

    def _halve(self, batch: list[Any], exc: Exception) -> int:
        """Where to split a batch that failed with ``exc``: raised again unless it is out of memory;
        a single frame out of memory is an error. The batch size follows, said once per size (a farm
        has several batches in flight, all of the old size)."""
        if not _out_of_memory(exc):
            raise exc
        if len(batch) == 1:
            scene = self.renderer.scene
            raise ModelError(
                f"out of memory rendering a single frame at {scene.width}x{scene.height}: "
                "lower the size, use 'dtype: float16' on a GPU, or free memory used by other programs"
            ) from None
        half = len(batch) // 2
        if half < self.batch_size:
            self.batch_size = half
            print(f"out of memory with {len(batch)} frames per batch; going on with {half}", file=sys.stderr)
        return half

    def _store(self, job: Any, png: bytes) -> None:
        """Store one frame (in the writer thread); tell the progress callback at once."""
        self.cache.frames.put(job.key, png)
        # Stored: a run killed after this line resumes without rendering this frame again.
        self.rendered.add(job.key)
        if self.progress is not None:
            # Told at once, frame by frame: an observer knows of every frame stored before a kill.
            self._tell((job.key,))

    def _tell(self, keys: tuple[str, ...]) -> None:
        """Hand the progress callback where the run stands (``keys``: frames just stored here)."""
        assert self.progress is not None
        with self._told:
            self.progress(Progress("frames", self.done, len(self.plan), len(self.rendered), keys))

    def _catch_sigint(self) -> Any:
        """First Ctrl-C: stop after the batch on the device. Second: stop now (further ones ignored)."""
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum: int, frame: Any) -> None:
            if self.stop_requested:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                raise KeyboardInterrupt
            self.stop_requested = True
            print("\nstopping after the frames in flight (Ctrl-C again to stop now)", file=sys.stderr)

        return signal.signal(signal.SIGINT, handler)
