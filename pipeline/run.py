"""One render run: render the frames that are not cached, then (re)write the outputs that changed.

torch is imported only when at least one frame must be rendered, so a no-op re-run is quick::

    targets = check_outputs(scene, out_dir)
    result = run(scene, env, ref, plan, cache, cached_keys, targets, batch_size=None)
    result["rendered"], result["cached"], result["outputs"]

An output's key is the keys of its frames plus its own settings; when the file at its path is the
one we wrote for that key, it is left alone.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.assemble import clean_partials, write_output
from pipeline.cache import CacheDir, record_key
from pipeline.environment import RenderEnv, input_files
from pipeline.keys import key_of
from pipeline.models import ModelError, ModelRef
from pipeline.planner import Plan
from pipeline.scene import Output, Scene, output_kind
from pipeline.yamlio import SceneError

ASSEMBLE_VERSION = 1


@dataclass
class Target:
    """An output to write: its scene entry, kind and final path."""

    output: Output
    kind: str
    path: Path


def check_outputs(scene: Scene, out_dir: Path) -> list[Target]:
    """Where each output goes. Raises :class:`SceneError` for any output that would land on the scene,
    on one of its inputs, or outside ``out_dir`` (symlinks resolved), pointing at the output's line."""
    out_dir = out_dir.resolve()
    protected = {scene.path.resolve()} | {scene.resolve(rel) for rel in input_files(scene)}
    targets, problems = [], []
    for i, out in enumerate(scene.effective_outputs()):
        kind = output_kind(out)
        assert kind is not None  # validated with the scene
        path = (out_dir / out.path).resolve()
        if not path.is_relative_to(out_dir):
            problems.append(
                scene.problem(
                    ("outputs", i),
                    f"output '{out.path}' resolves to {path}, outside the output folder {out_dir}",
                )
            )
        elif path in protected or (kind == "frames" and any(p.is_relative_to(path) for p in protected)):
            problems.append(
                scene.problem(
                    ("outputs", i),
                    f"output '{out.path}' would overwrite {path}, the scene or one of its inputs; choose another path or --out",
                )
            )
        targets.append(Target(out, kind, path))
    if problems:
        raise SceneError(problems)
    return targets


class CachedFrames(Sequence[Any]):
    """Frames of a plan as PIL images, decoded from the cache one at a time when indexed."""

    def __init__(self, cache: CacheDir, keys: list[str]):
        self.cache = cache
        self.keys = keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        from PIL import Image

        blob = self.cache.frames.get(self.keys[i])
        if blob is None:
            raise FrameMissing(self.keys[i])
        return Image.open(io.BytesIO(blob)).convert("RGB")


def _settings(scene: Scene, target: Target) -> dict[str, Any]:
    out = target.output
    fps = out.fps or scene.fps
    if target.kind == "mp4":
        return {"fps": fps, "rubber_band": out.rubber_band}
    if target.kind == "gif":
        return {"fps": fps, "rubber_band": out.rubber_band, "loop": out.loop}
    if target.kind == "grid":
        cols = out.cols or (
            scene.grid.cols if scene.grid else max(1, round(len(scene.keyframes) ** 0.5) or 1)
        )
        return {"cols": cols}
    return {}


def assemble(scene: Scene, plan: Plan, cache: CacheDir, targets: list[Target]) -> dict[str, str]:
    """Write every output whose frames or settings changed; returns {path: 'written' | 'up to date'}."""
    keys = [job.key for job in plan]
    frames = CachedFrames(cache, keys)
    status: dict[str, str] = {}
    for target in targets:
        target.path.parent.mkdir(parents=True, exist_ok=True)
        clean_partials(target.path.parent)  # temporary files of a run killed while writing outputs
        settings = _settings(scene, target)
        out_key = key_of(
            {
                "kind": "output",
                "v": ASSEMBLE_VERSION,
                "type": target.kind,
                "frames": keys,
                "settings": settings,
            }
        )
        rec_key = record_key("output", str(target.path))
        record = cache.records.get_json(rec_key)
        if record and record.get("key") == out_key and _stamp(target.path) == record.get("stamp"):
            status[str(target.path)] = "up to date"
            continue
        write_output(target.kind, target.path, frames, **settings)
        cache.records.put_json(rec_key, {"key": out_key, "stamp": _stamp(target.path)})
        status[str(target.path)] = "written"
    return status


def _stamp(path: Path) -> list[int] | None:
    """Size and mtime of an output file (or of a frames folder's newest file): was it touched since?"""
    try:
        if path.is_dir():
            stats = [p.stat() for p in path.glob("frame_*.png")]
            return [len(stats), max((s.st_mtime_ns for s in stats), default=0)]
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return None


def readable_frames(cache: CacheDir, plan: Plan) -> set[str]:
    """Keys of the plan's frames that are stored AND read back intact: a damaged one is rendered again."""
    return {key for key in cache.frames.present([j.key for j in plan]) if cache.frames.get(key) is not None}


class FrameMissing(RuntimeError):
    """A cached frame turned out unreadable while writing outputs: it must be rendered again."""

    def __init__(self, key: str):
        super().__init__(f"frame {key[:12]} is unreadable in the cache")
        self.key = key


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
) -> dict[str, Any]:
    """Render what is missing, store each frame as it finishes, then write the outputs."""
    renderer: Renders | None = None
    for _attempt in range(3):
        todo = {job.key: job for job in plan if job.key not in cached}
        if todo:
            renderer = renderer or Renders(scene, env, ref, plan, cache, batch_size, quiet)
            renderer.run(list(todo.values()), len(plan) - len(todo))
        try:
            status = assemble(scene, plan, cache, targets)
            break
        except FrameMissing:
            # A cached frame was corrupt (the cache warned): render every unreadable frame again.
            cached = readable_frames(cache, plan)
    else:
        raise RuntimeError("frames keep disappearing from the cache while outputs are written")
    # Frames this process rendered; the rest came from the cache (or from another render sharing it).
    rendered = sum(1 for job in plan if renderer and job.key in renderer.rendered)
    return {
        "scene": str(scene.path),
        "frames": len(plan),
        "rendered": rendered,
        "cached": len(plan) - rendered,
        "renders": len(renderer.rendered) if renderer else 0,
        "embeddings_encoded": renderer.encoded if renderer else 0,
        "outputs": [str(t.path) for t in targets],
        "output_status": status,
        "device": env.device,
        "dtype": env.dtype,
        "model": env.model,
    }


class Renders:
    """The rendering half of a run: loads the model once, then renders frame jobs as they become ready.

    - Frames are claimed before they render, so several processes sharing a cache split the work
      (see ``pipeline.claims``); frames claimed by a live process are waited for, not rendered.
    - A feedback frame is ready once the frame before it is in the cache: chains render in waves.
    - Out of memory halves the batch size and goes on; one frame that still fails is an error.
    - The first Ctrl-C finishes the batch in flight and stops; a second one stops at once.
    """

    POLL_S = 0.2

    def __init__(
        self,
        scene: Scene,
        env: RenderEnv,
        ref: ModelRef,
        plan: Plan,
        cache: CacheDir,
        batch_size: int | None,
        quiet: bool,
    ):
        from pipeline.models import load_pipeline
        from pipeline.renderer import FrameRenderer, configure, default_batch_size

        self.plan = plan
        self.cache = cache
        pipe = configure(load_pipeline(ref, device=env.device, dtype=env.dtype), scene)
        self.renderer = FrameRenderer(pipe, scene, plan, cache, device=env.device, dtype=env.dtype)
        self.batch_size = batch_size or default_batch_size(env.device)
        self.quiet = quiet
        self.rendered: set[str] = (
            set()
        )  # keys this process rendered (others sharing the cache render the rest)
        self.stop_requested = False
        self.log = os.environ.get("SD_SCENES_RENDER_LOG")  # debugging aid: one line per stored frame

    @property
    def encoded(self) -> int:
        return self.renderer.encoded

    def run(self, jobs: list[Any], already: int) -> None:
        from tqdm import tqdm

        from pipeline.claims import Claims

        claims = Claims(self.cache.records)
        per_key = Counter(job.key for job in self.plan)  # a held frame repeats one key
        bar = tqdm(
            total=len(self.plan),
            initial=already,
            unit="frame",
            disable=self.quiet or None,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        bar.set_postfix_str(f"cached {already}, rendered {len(self.rendered)}")
        queue = _ReadyQueue(jobs)
        elsewhere: dict[
            str, Any
        ] = {}  # claimed by another live process: wait for it, take it over if it dies
        previous_handler = self._catch_sigint()
        try:
            while queue.remaining:
                batch = queue.next_batch(self.batch_size)
                if batch:
                    mine = set(claims.claim(job.key for job in batch))
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
                        try:
                            self._render(todo)
                        finally:
                            _quietly(claims.release, [job.key for job in todo])
                        for job in todo:
                            queue.finish(job.key)
                        bar.update(sum(per_key[job.key] for job in todo))
                        bar.set_postfix_str(f"cached {already}, rendered {len(self.rendered)}")
                    if self.stop_requested:
                        raise KeyboardInterrupt
                    continue
                # Nothing of ours is ready: the rest is being rendered elsewhere (or waits on it).
                for key in self.cache.frames.present(elsewhere):
                    del elsewhere[key]
                    queue.finish(key)
                    bar.update(per_key[key])
                retake = claims.claim(list(elsewhere))  # owners that died: their frames are ours now
                for key in retake:
                    queue.put_back(elsewhere.pop(key))
                claims.release(retake)  # claimed again, batch by batch, when they come up
                if not retake and queue.remaining:
                    time.sleep(self.POLL_S)
        finally:
            bar.close()
            if previous_handler is not None:
                # Once stopping, further Ctrl-Cs are ignored until the process has exited cleanly.
                signal.signal(signal.SIGINT, signal.SIG_IGN if self.stop_requested else previous_handler)

    def _render(self, batch: list[Any]) -> None:
        """Render one batch, halving it on out-of-memory; store every frame the moment it is done."""
        try:
            pngs = self.renderer.render_batch(batch)
        except Exception as exc:
            if not _out_of_memory(exc):
                raise
            if len(batch) == 1:
                raise ModelError(
                    f"out of memory rendering a single frame at {self.renderer.scene.width}x{self.renderer.scene.height}: "
                    "lower the size, use 'dtype: float16' on a GPU, or free memory used by other programs"
                ) from None
            _free_memory()
            self.batch_size = max(1, len(batch) // 2)
            print(
                f"out of memory with {len(batch)} frames per batch; going on with {self.batch_size}",
                file=sys.stderr,
            )
            half = len(batch) // 2
            self._render(batch[:half])
            self._render(batch[half:])
            return
        for job, png in zip(batch, pngs, strict=True):
            # Stored at once: a run killed after this line resumes without rendering this frame again.
            self.cache.frames.put(job.key, png)
            self.rendered.add(job.key)
            if self.log:
                with open(self.log, "a") as f:
                    f.write(f"{job.key} {os.getpid()}\n")

    def _catch_sigint(self) -> Any:
        """First Ctrl-C: finish the batch in flight, then stop. Second: stop now (further ones ignored)."""
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum: int, frame: Any) -> None:
            if self.stop_requested:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                raise KeyboardInterrupt
            self.stop_requested = True
            print("\nstopping after the frames in flight (Ctrl-C again to stop now)", file=sys.stderr)

        return signal.signal(signal.SIGINT, handler)


class _ReadyQueue:
    """Frames to render, by batch group, in frame order; a feedback frame becomes ready when the
    frame before it is finished. Every operation is O(1) per frame, so a 100,000-frame render spends
    no time re-scanning what is left."""

    def __init__(self, jobs: list[Any]):
        self.remaining = {job.key: job for job in jobs}
        self.groups: dict[str, deque[Any]] = {}
        self.waiting: dict[str, list[Any]] = {}
        for job in jobs:
            prev = job.recipe["mode"].get("prev")
            if prev in self.remaining:
                self.waiting.setdefault(prev, []).append(job)
            else:
                self.put_back(job)

    def put_back(self, job: Any) -> None:
        self.groups.setdefault(job.batch_group, deque()).append(job)

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
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
