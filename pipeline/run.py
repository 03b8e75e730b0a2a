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
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.assemble import clean_partials, write_output
from pipeline.cache import CacheDir, record_key
from pipeline.environment import RenderEnv, input_files
from pipeline.keys import key_of
from pipeline.models import ModelRef
from pipeline.planner import Plan
from pipeline.scene import Output, Scene, output_kind

ASSEMBLE_VERSION = 1


class OutputError(Exception):
    """An output path that is not allowed (it would overwrite the scene or an input)."""


@dataclass
class Target:
    """An output to write: its scene entry, kind and final path."""

    output: Output
    kind: str
    path: Path


def check_outputs(scene: Scene, out_dir: Path) -> list[Target]:
    """Where each output goes; refuses any that would land on the scene, an input, or outside ``out_dir``."""
    out_dir = out_dir.resolve()
    protected = {scene.path.resolve()} | {scene.resolve(rel) for rel in input_files(scene)}
    targets = []
    for out in scene.effective_outputs():
        kind = output_kind(out)
        assert kind is not None  # validated with the scene
        path = (out_dir / out.path).resolve()
        if not path.is_relative_to(out_dir):
            raise OutputError(f"output '{out.path}' resolves to {path}, outside the output folder {out_dir}")
        if path in protected or any(p.is_relative_to(path) for p in protected if kind == "frames"):
            raise OutputError(f"output '{out.path}' would overwrite {path}, the scene or one of its inputs")
        targets.append(Target(out, kind, path))
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
            raise RuntimeError(f"frame {i} vanished from the cache while writing outputs; run again to re-render it")
        return Image.open(io.BytesIO(blob)).convert("RGB")


def _settings(scene: Scene, target: Target) -> dict[str, Any]:
    out = target.output
    fps = out.fps or scene.fps
    if target.kind == "mp4":
        return {"fps": fps, "rubber_band": out.rubber_band}
    if target.kind == "gif":
        return {"fps": fps, "rubber_band": out.rubber_band, "loop": out.loop}
    if target.kind == "grid":
        cols = out.cols or (scene.grid.cols if scene.grid else max(1, round(len(scene.keyframes) ** 0.5) or 1))
        return {"cols": cols}
    return {}


def assemble(scene: Scene, plan: Plan, cache: CacheDir, targets: list[Target]) -> dict[str, str]:
    """Write every output whose frames or settings changed; returns {path: 'written' | 'up to date'}."""
    keys = [job.key for job in plan]
    frames = CachedFrames(cache, keys)
    status: dict[str, str] = {}
    for target in targets:
        settings = _settings(scene, target)
        out_key = key_of({"kind": "output", "v": ASSEMBLE_VERSION, "type": target.kind, "frames": keys, "settings": settings})
        rec_key = record_key("output", str(target.path))
        record = cache.records.get_json(rec_key)
        if record and record.get("key") == out_key and _stamp(target.path) == record.get("stamp"):
            status[str(target.path)] = "up to date"
            continue
        target.path.parent.mkdir(parents=True, exist_ok=True)
        clean_partials(target.path.parent)
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
    todo: dict[str, Any] = {}
    for job in plan:
        if job.key not in cached and job.key not in todo:
            todo[job.key] = job
    missing_frames = sum(1 for job in plan if job.key not in cached)
    renders, encoded = 0, 0
    if todo:
        renders, encoded = _render(
            scene, env, ref, plan, cache, list(todo.values()), batch_size, quiet, len(plan) - missing_frames
        )
    status = assemble(scene, plan, cache, targets)
    return {
        "scene": str(scene.path),
        "frames": len(plan),
        "rendered": missing_frames,
        "cached": len(plan) - missing_frames,
        "renders": renders,
        "embeddings_encoded": encoded,
        "outputs": [str(t.path) for t in targets],
        "output_status": status,
        "device": env.device,
        "dtype": env.dtype,
        "model": env.model,
    }


def _render(
    scene: Scene,
    env: RenderEnv,
    ref: ModelRef,
    plan: Plan,
    cache: CacheDir,
    jobs: list[Any],
    batch_size: int | None,
    quiet: bool,
    already: int,
) -> tuple[int, int]:
    """Render ``jobs``; returns (frames rendered, embeddings encoded rather than read from the cache)."""
    from tqdm import tqdm

    from pipeline.models import load_pipeline
    from pipeline.renderer import FrameRenderer, configure, default_batch_size

    pipe = configure(load_pipeline(ref, device=env.device, dtype=env.dtype), scene)
    renderer = FrameRenderer(pipe, scene, plan, cache, device=env.device, dtype=env.dtype)
    size = batch_size or default_batch_size(env.device)
    done = 0
    frames_per_key = Counter(job.key for job in plan)  # a held frame repeats one key
    bar = tqdm(total=len(plan), initial=already, unit="frame", disable=quiet or None, file=sys.stderr, dynamic_ncols=True)
    bar.set_postfix_str(f"cached {already}, rendered 0")
    try:
        for batch, pngs in renderer.render(jobs, size):
            for job, png in zip(batch, pngs, strict=True):
                # Stored at once: a run killed after this line resumes without this frame.
                cache.frames.put(job.key, png)
            done += len(batch)
            bar.update(sum(frames_per_key[job.key] for job in batch))
            bar.set_postfix_str(f"cached {already}, rendered {done}")
    finally:
        bar.close()
    return done, renderer.encoded
