"""Where a scene's outputs go, checked before anything renders, and the settings each is written with.

::

    targets = check_outputs(scene, out_dir)      # SceneError, located at the output's line, if unsafe
    [(t.kind, t.path) for t in targets]          # [("mp4", .../dog_cat.mp4), ("gif", .../dog_cat.gif)]
    output_settings(scene, targets[0], frames)   # {"fps": 12, "rubber_band": False}
    left_behind(scene, targets, cache)           # notes on files an earlier run wrote and this one does not

Path safety: no output lands on the scene or one of its inputs, outside the output folder (symlinks
resolved), on or inside another output, or under a name too long for the file system.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.outputs.files import name_length_problem
from pipeline.render.environment import input_files
from pipeline.scene.core import Scene
from pipeline.scene.problems import SceneError
from pipeline.scene.rules import output_kind
from pipeline.scene.schema import Output
from pipeline.store.cache import CacheDir
from pipeline.store.records import outputs_of_key

__all__ = ["PAGE", "PAGE_DIR", "Target", "Targets", "check_outputs", "left_behind", "output_settings"]

# The render page and the folder of its pictures, in the output folder (``pipeline.outputs.page``):
# no output may be written there.
PAGE = "index.html"
PAGE_DIR = "page"


@dataclass
class Target:
    """An output to write: its scene entry, kind and final path."""

    output: Output
    kind: str
    path: Path


class Targets(list[Target]):
    """The outputs of one run, in scene order, and the folder they were checked against."""

    def __init__(self, targets: list[Target], out_dir: Path):
        super().__init__(targets)
        self.out_dir = out_dir


def check_outputs(scene: Scene, out_dir: Path) -> Targets:
    """Where each output goes. Raises :class:`SceneError`, pointing at the output's line, for any output
    that would land on the scene, on one of its inputs, or outside ``out_dir`` (symlinks resolved); that
    is the same file as another output, or inside another output (a file in a frames folder); or whose
    name is too long for the file system once the temporary name it is written under is counted."""
    out_dir = out_dir.resolve()
    protected = {scene.path.resolve()} | {scene.resolve(rel) for rel in input_files(scene)}
    outputs = scene.effective_outputs()
    targets, problems = [], []
    claimed = _Claimed(out_dir)
    limits: dict[str, tuple[str, int, int]] = {}  # file system limits by folder
    for i, out in enumerate(outputs):
        kind = output_kind(out)
        assert kind is not None  # validated with the scene
        at = ("outputs", i)
        try:
            path = (out_dir / out.path).resolve()
        except (OSError, ValueError) as exc:  # a NUL byte or a lone surrogate, if validation let one by
            problems.append(scene.problem(at, f"output '{out.path}' is not a usable file name: {exc}"))
            continue
        if not path.is_relative_to(out_dir):
            problems.append(
                scene.problem(
                    at, f"output '{out.path}' resolves to {path}, outside the output folder {out_dir}"
                )
            )
        elif path in protected or (kind == "frames" and any(p.is_relative_to(path) for p in protected)):
            problems.append(
                scene.problem(
                    at,
                    f"output '{out.path}' would overwrite {path}, the scene or one of its inputs; choose another path or --out",
                )
            )
        elif path == out_dir / PAGE or path.is_relative_to(out_dir / PAGE_DIR):
            problems.append(
                scene.problem(
                    at,
                    f"output '{out.path}' would be written over by the render page ({PAGE} and its "
                    f"{PAGE_DIR}/ folder in the output folder); choose another path",
                )
            )
        elif (clash := claimed.overlap(path)) is not None:
            j, how = clash
            problems.append(
                scene.problem(
                    at,
                    f"output {i + 1} '{out.path}' {how} output {j + 1} '{outputs[j].path}', so one would "
                    "overwrite the other; give each output its own path, none inside another output's folder",
                )
            )
        elif (why := name_length_problem(path, kind, scene.total_frames, limits=limits)) is not None:
            problems.append(scene.problem(at, f"output {i + 1} cannot be written: {why}"))
        claimed.add(path, i)
        targets.append(Target(out, kind, path))
    if problems:
        raise SceneError(problems)
    return Targets(targets, out_dir)


class _Claimed:
    """Resolved output paths seen so far, to find two outputs that would write over each other.

    Paths are compared as strings, folder by folder up to the output folder: a scene with 20,000
    outputs is checked in a fraction of a second."""

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.paths: dict[str, int] = {}  # output path -> its index
        self.folders: dict[str, int] = {}  # every folder above an output path -> the first output below it

    def _parents(self, path: str) -> Iterator[str]:
        while path != self.root and (up := os.path.dirname(path)) != path:
            path = up
            yield path

    def overlap(self, path: Path) -> tuple[int, str] | None:
        """(index, how) of an earlier output that ``path`` is, lies inside, or contains; else None."""
        text = str(path)
        if text in self.paths:
            return self.paths[text], "is the same path as"
        for parent in self._parents(text):
            if parent in self.paths:
                return self.paths[parent], "lies inside"
        if text in self.folders:
            return self.folders[text], "is a folder that holds"
        return None

    def add(self, path: Path, index: int) -> None:
        text = str(path)
        self.paths.setdefault(text, index)
        for parent in self._parents(text):
            if parent in self.folders:
                break  # and so are all above it
            self.folders[parent] = index


def output_settings(scene: Scene, target: Target, frames: int) -> dict[str, Any]:
    """The settings ``target`` is written with (its writer's keyword arguments) for ``frames`` frames;
    part of the output's key, so a change of them rewrites the output."""
    out = target.output
    fps = out.fps or scene.fps
    if target.kind == "mp4":
        return {"fps": fps, "rubber_band": out.rubber_band}
    if target.kind == "gif":
        return {"fps": fps, "rubber_band": out.rubber_band, "loop": out.loop}
    if target.kind == "grid":
        # A grid scene's sheet has the grid's own columns; any other is as square as the frames allow,
        # as the Keras example's plot_grid lays out its grid_size x grid_size images.
        return {"cols": out.cols or (scene.grid.cols if scene.grid else math.ceil(math.sqrt(frames)))}
    return {}


def left_behind(scene: Scene, targets: Targets, cache: CacheDir) -> list[str]:
    """A note for each file in the output folder that an earlier run wrote and this one no longer does.

    Such a file is left as is (it may be wanted; deleting files is not a renderer's business), but it
    no longer follows the scene, so it must not pass without a word. Two kinds: the default MP4, GIF
    (and grid image) of a scene that now lists ``outputs:``, and any output an earlier run of this
    scene into this folder wrote that is no longer listed (remembered in the cache's records; a
    file is remembered until it is gone).
    """
    current = {t.path for t in targets}
    defaults: list[Path] = []
    if scene.outputs is not None:
        # The outputs the scene would have without its list (effective_outputs keeps that rule in one place).
        unlisted = scene.model_copy(update={"outputs": None})
        defaults = [(targets.out_dir / out.path).resolve() for out in unlisted.effective_outputs()]
    rec_key = outputs_of_key(scene.path, targets.out_dir)
    record = cache.records.get_json(rec_key)
    earlier = [Path(p) for p in record.get("paths", [])] if isinstance(record, dict) else []
    notes, kept = [], []
    for path in dict.fromkeys([*defaults, *earlier]):
        if path in current or not path.exists():
            continue
        kept.append(path)
        why = (
            "its 'outputs:' list replaces the default outputs"
            if path in defaults
            else "it was taken off 'outputs:'"
        )
        notes.append(
            f"{path} is no longer an output of this scene ({why}); the file from an earlier run was left as is "
            "and is not updated any more"
        )
    remembered = sorted(str(p) for p in [*current, *kept])
    if record != {"paths": remembered} and not cache.records.readonly:
        cache.records.put_json(rec_key, {"paths": remembered})
    return notes
