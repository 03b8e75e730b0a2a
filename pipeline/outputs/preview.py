"""Previews: a few frames of a scene, or a draft of it, without touching its final outputs.

A preview renders from the same cache as a final render, under the same keys (a frame is a frame, a
preview never makes a key the scene's plan does not have), and writes only into
``renders/<scene>/preview/``: a contact sheet PNG, rewritten as each frame finishes, and a GIF when
it shows more than one frame. Nothing else is written there or elsewhere: no final output, no
record, no ``previous/`` folder.

- ``--frames START:STOP:STEP`` selects frames as a Python slice of ``range(total_frames)`` does;
  ``--frame N`` (repeatable) names frames one by one. A feedback frame starts from the frame before
  it, so the frames of its chain up to it are rendered too (cached ones are not rendered again);
  the preview shows only the frames asked for, and the run says how many more it rendered.
- ``--draft`` is the same scene with fewer steps and a smaller size (steps/4, size/2 rounded to a
  multiple of 8; ``--draft-steps``/``--draft-size`` set them): another scene, with its own keys.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.outputs.assemble import CachedFrames, FrameMissing
from pipeline.outputs.writers import write_output
from pipeline.plan.planner import FrameJob, Plan
from pipeline.render.loop import Progress
from pipeline.scene.core import Scene
from pipeline.store.cache import CacheDir

PREVIEW_DIR = "preview"
THUMB = 256  # longest side of a frame on a contact sheet of several frames


@dataclass(frozen=True)
class Draft:
    """A draft's steps and size (None: derived from the scene's, see :func:`draft_scene`)."""

    steps: int | None = None
    width: int | None = None
    height: int | None = None


def parse_frames(text: str, total: int) -> list[int]:
    """The frames ``--frames`` selects: ``START:STOP[:STEP]`` as a Python slice of ``range(total)``
    (each part optional, negative counts from the end), or one frame number. Raises ValueError with
    what is wrong and what is allowed."""
    usage = "use START:STOP:STEP (a Python slice, e.g. 0:64:8) or one frame number"
    parts = text.strip().split(":")
    if len(parts) > 3:
        raise ValueError(f"'{text}' has {len(parts) - 1} colons; {usage}")
    try:
        numbers = [int(p) if p.strip() else None for p in parts]
    except ValueError:
        raise ValueError(f"'{text}' is not a frame range; {usage}") from None
    if len(parts) == 1:
        assert numbers[0] is not None or not parts[0].strip()
        if numbers[0] is None:
            raise ValueError(f"'{text}' is empty; {usage}")
        return [check_frame(numbers[0], total)]
    if len(numbers) == 3 and numbers[2] == 0:
        raise ValueError(f"'{text}': the step cannot be 0; {usage}")
    chosen = list(range(total)[slice(*numbers)])
    if not chosen:
        raise ValueError(f"'{text}' selects no frame of the {total} (frames 0 to {total - 1}); {usage}")
    return chosen


def check_frame(frame: int, total: int) -> int:
    """``frame`` as a frame number (negative counts from the end); ValueError if there is no such frame."""
    if not -total <= frame < total:
        raise ValueError(f"{frame} is beyond the end; the scene has {total} frames (0 to {total - 1})")
    return frame % total


def draft_scene(scene: Scene, draft: Draft) -> Scene:
    """The scene with the draft's steps and size (defaults: steps/4, at least 1; width and height
    halved and rounded to a multiple of 8, at least 8). Raises ValueError for a size or steps a
    scene could not have."""
    steps = draft.steps if draft.steps is not None else max(1, scene.steps // 4)
    width = draft.width if draft.width is not None else _half(scene.width)
    height = draft.height if draft.height is not None else _half(scene.height)
    if not 1 <= steps <= 1000:
        raise ValueError(f"--draft-steps: {steps} is not allowed; use a whole number from 1 to 1000")
    for axis, value in (("width", width), ("height", height)):
        if not 8 <= value <= 8192 or value % 8:
            raise ValueError(
                f"--draft-size: {axis} {value} is not allowed; use a multiple of 8 from 8 to 8192"
            )
    return scene.model_copy(update={"steps": steps, "size": [width, height]})


def parse_size(text: str) -> tuple[int, int]:
    """``WxH`` as (width, height); ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if match is None:
        raise ValueError(f"--draft-size: '{text}' is not a size; use WIDTHxHEIGHT, e.g. 256x256")
    return int(match[1]), int(match[2])


def _half(value: int) -> int:
    return max(8, round(value / 2 / 8) * 8)


def needed_jobs(plan: Plan, frames: Sequence[int]) -> list[FrameJob]:
    """The jobs to have in the cache to show ``frames``: theirs, and for a feedback frame the frames
    of its chain before it (each starts from the one before). In frame order, each key once."""
    by_key = {job.key: job for job in plan}
    wanted: dict[str, FrameJob] = {}
    for frame in frames:
        job: FrameJob | None = plan[frame]
        while job is not None and job.key not in wanted:
            wanted[job.key] = job
            prev = job.view.mode.prev
            job = by_key.get(prev) if prev is not None else None
    return sorted(wanted.values(), key=lambda j: j.frame)


def sub_plan(plan: Plan, jobs: list[FrameJob]) -> Plan:
    """The plan restricted to ``jobs`` (same base, embeddings and files: the same keys)."""
    return replace(plan, jobs=list(jobs))


def step_of(frames: Sequence[int]) -> int | None:
    """The step between frames evenly spaced (as a range selects them), else None."""
    if len(frames) < 2:
        return None
    step = frames[1] - frames[0]
    return step if step and all(b - a == step for a, b in itertools.pairwise(frames)) else None


def label(frames: Sequence[int], total: int, draft: Scene | None) -> str:
    """The part of a preview's file name that says what it shows, e.g. ``frames_0-56_step8``."""
    if list(frames) == list(range(total)):
        what = "all"
    elif len(frames) == 1:
        what = f"frame_{frames[0]}"
    else:
        step = step_of(frames)
        if step is not None:
            what = f"frames_{frames[0]}-{frames[-1]}" + (f"_step{step}" if step != 1 else "")
        elif len(frames) <= 8:
            what = "frames_" + "_".join(map(str, frames))
        else:
            what = f"frames_{frames[0]}_and_{len(frames) - 1}_more"
    if draft is not None:
        what = f"draft_{draft.width}x{draft.height}_{draft.steps}steps_{what}"
    return what


@dataclass
class PreviewPaths:
    """Where a preview goes: its contact sheet and, for several frames, its GIF."""

    sheet: Path
    gif: Path | None

    def all(self) -> list[Path]:
        return [self.sheet] + ([self.gif] if self.gif is not None else [])


def preview_paths(scene: Scene, out_dir: Path, frames: Sequence[int], draft: Scene | None) -> PreviewPaths:
    folder = out_dir / PREVIEW_DIR
    stem = f"{scene.name}_{label(frames, scene.total_frames, draft)}"
    return PreviewPaths(folder / f"{stem}.png", folder / f"{stem}.gif" if len(frames) > 1 else None)


def clash(paths: PreviewPaths, finals: Sequence[Path]) -> Path | None:
    """A final output that a preview file would write over or into (then the preview must not run)."""
    for path in paths.all():
        for final in finals:
            if path == final or path.is_relative_to(final):
                return final
    return None


class Sheet:
    """The preview's contact sheet, rewritten (atomically) each time one of its frames is stored.

    ``load(key)`` returns a stored frame as a PIL image. Frames not stored yet are grey cells; every
    cell is labelled with its frame number. One frame is written at its own size."""

    def __init__(self, path: Path, frames: Sequence[int], keys: Sequence[str], size: tuple[int, int]):
        self.path = path
        self.frames = list(frames)
        self.keys = list(keys)
        self.single = len(self.frames) == 1
        w, h = size
        scale = 1.0 if self.single else min(1.0, THUMB / max(w, h))
        self.cell = (max(1, round(w * scale)), max(1, round(h * scale)))
        self.cols = 1 if self.single else math.ceil(math.sqrt(len(self.frames)))
        self.rows = math.ceil(len(self.frames) / self.cols)
        self.shown: set[str] = set()
        self._lock = threading.Lock()
        self._canvas: Any = None

    def update(self, keys: Sequence[str], load: Callable[[str], Any]) -> bool:
        """Paste the frames of ``keys`` this sheet shows and rewrite it; False if none was new."""
        new = [k for k in dict.fromkeys(keys) if k in self.keys and k not in self.shown]
        if not new:
            return False
        with self._lock:
            canvas = self._canvas_now()
            for key in new:
                image = load(key).convert("RGB")
                if image.size != self.cell:
                    image = image.resize(self.cell)
                for i, k in enumerate(self.keys):
                    if k == key:
                        self._paste(canvas, i, image)
                self.shown.add(key)
            self._save(canvas)
        return True

    def _canvas_now(self) -> Any:
        from PIL import Image, ImageDraw

        if self._canvas is None:
            gap = 0 if self.single else 2
            w, h = self.cell
            self._canvas = Image.new(
                "RGB", (self.cols * (w + gap) - gap, self.rows * (h + gap) - gap), (24, 24, 24)
            )
            draw = ImageDraw.Draw(self._canvas)
            for i in range(len(self.frames)):
                x, y = self._at(i)
                draw.rectangle([x, y, x + w - 1, y + h - 1], fill=(96, 96, 96))
                self._label(draw, i)
        return self._canvas

    def _at(self, i: int) -> tuple[int, int]:
        gap = 0 if self.single else 2
        return (i % self.cols) * (self.cell[0] + gap), (i // self.cols) * (self.cell[1] + gap)

    def _paste(self, canvas: Any, i: int, image: Any) -> None:
        from PIL import ImageDraw

        canvas.paste(image, self._at(i))
        if not self.single:
            self._label(ImageDraw.Draw(canvas), i)

    def _label(self, draw: Any, i: int) -> None:
        if self.single:
            return
        x, y = self._at(i)
        text = str(self.frames[i])
        draw.rectangle([x, y, x + 6 * len(text) + 3, y + 11], fill=(0, 0, 0))
        draw.text((x + 2, y), text, fill=(255, 255, 255))

    def _save(self, canvas: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Written beside and renamed over: an image viewer open on the sheet never reads half a file.
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
        canvas.save(partial, format="PNG")
        os.replace(partial, self.path)


def live_sheet(
    paths: PreviewPaths,
    plan: Plan,
    shown: list[int],
    size: tuple[int, int],
    cache: CacheDir,
    progress: Callable[[Progress], None] | None,
) -> tuple[Sheet, Callable[[Progress], None]]:
    """The preview's contact sheet, written now with the frames already cached, and a progress
    callback (wrapping ``progress``) that rewrites it each time one of its frames is stored."""
    sheet = Sheet(paths.sheet, shown, [plan[f].key for f in shown], size)

    def load(key: str) -> Any:
        from PIL import Image

        blob = cache.frames.get(key)
        if blob is None:
            raise FrameMissing(key)
        return Image.open(io.BytesIO(blob))

    sheet.update(list(cache.frames.present(sheet.keys)), load)

    def told(event: Progress) -> None:
        if event.keys:
            # A live view must not stop the render: the sheet is written in full at the end anyway.
            with contextlib.suppress(Exception):
                sheet.update(event.keys, load)
        if progress is not None:
            progress(event)

    return sheet, told


def finish_preview(
    result: dict[str, Any],
    scene: Scene,
    plan: Plan,
    shown: list[int],
    paths: PreviewPaths,
    rendered_jobs: int,
    cache: CacheDir,
    sheet: Sheet,
) -> None:
    """Complete the contact sheet, write the GIF, and say in ``result`` (a run's) what the preview was."""
    keys = [plan[f].key for f in shown]
    frames = CachedFrames(cache, keys)
    sheet.update(keys, lambda key: frames[keys.index(key)])
    if paths.gif is not None:
        step = step_of(shown)
        # Frames every `step` play at the pace they have in the final animation.
        fps = scene.fps / abs(step) if step is not None else scene.fps
        write_output("gif", paths.gif, frames, fps=fps, loop=0)
    result["outputs"] = [str(path) for path in paths.all()]
    result["output_status"] = {str(path): "written" for path in paths.all()}
    if rendered_jobs > len(shown):
        result["notes"].append(
            f"feedback: {rendered_jobs - len(shown)} earlier frames of the chains were rendered or read too "
            "(each feedback frame starts from the one before it); the preview shows only the frames asked for"
        )


__all__ = [
    "Draft",
    "PreviewPaths",
    "Sheet",
    "check_frame",
    "clash",
    "draft_scene",
    "finish_preview",
    "label",
    "live_sheet",
    "needed_jobs",
    "parse_frames",
    "parse_size",
    "preview_paths",
    "step_of",
    "sub_plan",
]
