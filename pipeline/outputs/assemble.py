"""Assembling a run's outputs from the cached frames: each output whose frames or settings changed is
written (``pipeline.outputs.writers``), the others are left alone::

    targets = check_outputs(scene, out_dir)                  # pipeline.outputs.targets
    assemble(scene, plan, cache, targets, keep=Keeper(out_dir, record))
    # {".../dog_cat.mp4": "written", ".../dog_cat.gif": "up to date"}

An output's key is the keys of its frames plus its own settings; when the file at its path is the one
we wrote for that key (its :func:`_stamp` matches), it is left alone. A re-render keeps the outputs it
replaces in ``previous/`` (:class:`Keeper`). This module never imports torch.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline import __version__
from pipeline.outputs.files import clean_partials, is_frame_file
from pipeline.outputs.record import flat, frame_rows, png_texts, record_names
from pipeline.outputs.targets import Target, output_settings
from pipeline.outputs.writers import partials_folder, write_output
from pipeline.plan.keys import key_of
from pipeline.plan.planner import Plan
from pipeline.scene.core import Scene
from pipeline.store.cache import CacheDir
from pipeline.store.records import output_key

__all__ = [
    "ASSEMBLE_VERSION",
    "CachedFrames",
    "FrameMissing",
    "Keeper",
    "assemble",
    "mp4_comment",
    "readable_frames",
]

# 2: MP4s carry a comment and frames folders their parameters as PNG text chunks; 3: GIFs have one
# palette fitted to all frames and delta frames. Each bump writes every output once more.
ASSEMBLE_VERSION = 3


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
        blob = self.cache.frames.get(self.keys[i])
        if blob is None:
            raise FrameMissing(self.keys[i])
        return Image.open(io.BytesIO(blob)).convert("RGB")


def readable_frames(cache: CacheDir, plan: Plan) -> set[str]:
    """Keys of the plan's frames that are stored AND read back intact: a damaged one is rendered again."""
    return {key for key in cache.frames.present([j.key for j in plan]) if cache.frames.get(key) is not None}


class FrameMissing(RuntimeError):
    """A cached frame turned out unreadable while writing outputs: it must be rendered again."""

    def __init__(self, key: str):
        super().__init__(f"frame {key[:12]} is unreadable in the cache")
        self.key = key


def assemble(
    scene: Scene,
    plan: Plan,
    cache: CacheDir,
    targets: list[Target],
    *,
    keep: Callable[[Path], None] | None = None,
    model: str | None = None,
) -> dict[str, str]:
    """Write every output whose frames or settings changed; returns {path: 'written' | 'up to date'}.

    ``keep(path)`` is called before an output that exists is replaced (see :class:`Keeper`).
    ``model`` names the model in an MP4's comment (default: the scene's).
    """
    keys = [job.key for job in plan]
    frames = CachedFrames(cache, keys)
    status: dict[str, str] = {}
    rows: list[tuple[dict[str, Any], dict[str, Any]]] | None = None
    folders: dict[Path, None] = {}
    for target in targets:
        target.path.parent.mkdir(parents=True, exist_ok=True)
        folders.update(dict.fromkeys([target.path.parent, partials_folder(target.kind, target.path)]))
    for folder in folders:
        # Temporary files of a run killed while writing outputs, once per folder (also where every
        # output is up to date: a kill can leave one beside an output that a later run left as it was).
        clean_partials(folder)
    for target in targets:
        settings = output_settings(scene, target, len(keys))
        if target.kind == "mp4" and scene.audio is not None:
            # The song's content and start are in the MP4's key (a new song re-muxes), in no frame's key.
            settings["audio"] = {
                "sha256": plan.files[scene.audio.path],
                "start": float(scene.audio.start_seconds),
            }
        out_key = key_of(
            {
                "kind": "output",
                "v": ASSEMBLE_VERSION,
                "type": target.kind,
                "frames": keys,
                "settings": settings,
            }
        )
        rec_key = output_key(target.path)
        record = cache.records.get_json(rec_key)
        if record and record.get("key") == out_key and _stamp(target.path) == record.get("stamp"):
            status[str(target.path)] = "up to date"
            continue
        # What the file says of itself: decided by the frame keys and the scene, never fed back into them.
        extra: dict[str, Any] = {}
        if target.kind == "mp4":
            extra["comment"] = mp4_comment(scene, plan, model or scene.model)
            if scene.audio is not None:
                extra["audio_file"] = scene.resolve(scene.audio.path)
        elif target.kind == "frames":
            if rows is None:
                rows = [(r, flat(r)) for r in frame_rows(plan)]
            extra["texts"] = [png_texts(r, v) for r, v in rows]
        if keep is not None and _stamp(target.path) is not None:
            keep(target.path)
        write_output(target.kind, target.path, frames, clean_first=False, **settings, **extra)
        cache.records.put_json(rec_key, {"key": out_key, "stamp": _stamp(target.path)})
        status[str(target.path)] = "written"
    return status


def mp4_comment(scene: Scene, plan: Plan, model: str) -> str:
    """An MP4's comment: what made it, in one line. Decided by the scene and the frame keys alone (no
    time, no command), so the same frames make the same bytes."""
    frames = hashlib.sha256("\n".join(job.key for job in plan).encode()).hexdigest()[:16]
    return (
        f"sd-scenes {__version__}: {scene.path.name}, {len(plan)} frames {scene.width}x{scene.height}, "
        f"{scene.steps} steps, model {model}; frame keys {frames}; "
        f"settings in {record_names(scene)['record']}"
    )


class Keeper:
    """Keeps the outputs a re-render replaces: each is hard-linked (copied where links are not
    possible) into ``previous/<when it was written>/`` in the output folder, at its own relative
    path, before the new one is renamed over it. One folder per run, named after the time in the
    previous record (else the file's mtime), in UTC: ``previous/2026-12-01T15-35-23Z``."""

    def __init__(self, out_dir: Path, record: Path) -> None:
        self.out_dir = out_dir
        self.record = record
        self.folder: Path | None = None

    def __call__(self, path: Path) -> None:
        if self.folder is None:
            self.folder = self._new_folder(path)
        into = self.folder / path.relative_to(self.out_dir)
        if path.is_dir():
            with os.scandir(path) as entries:
                files = [Path(e.path) for e in entries if is_frame_file(e.name) and e.is_file()]
            into.mkdir(parents=True, exist_ok=True)
            for file in files:
                link_or_copy(file, into / file.name)
        else:
            into.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(path, into)

    def _new_folder(self, path: Path) -> Path:
        when: datetime | None = None
        try:
            when = datetime.fromisoformat(json.loads(self.record.read_text())["written_at"])
        except (OSError, ValueError, KeyError, TypeError):
            when = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
        name = when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H-%M-%SZ")
        base = self.out_dir / "previous"
        base.mkdir(parents=True, exist_ok=True)
        for n in range(1, 10_000):
            folder = base / (name if n == 1 else f"{name}-{n}")
            try:
                folder.mkdir()  # atomic: two renders into one folder never share a previous/ folder
            except FileExistsError:
                continue
            return folder
        raise FileExistsError(f"{base / name}: too many folders of that name")


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` as ``target``; copy it where links are not possible (another file system)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _stamp(path: Path) -> list[int] | str | None:
    """What the file system says of an output as we left it; any change to what it holds changes it.

    A file: size, mtime, ctime and inode. The ctime matters: ``cp -p`` or ``touch -r`` can put back an
    old mtime, but the kernel sets the ctime to now on every write and nobody can set it back; a file
    moved or hard-linked into place has another inode. A frames folder: a sha256 over the same four
    numbers and the name of every ``frame_*.png`` in it, so one frame replaced by another (even of the
    same size and mtime), added or removed is noticed. Only metadata is read, never the frames: a
    no-op re-run of a long scene stays a few stat calls per frame. A change of metadata alone
    (chmod, a hard link) rewrites the output once; it never leaves a stale one.
    """
    try:
        if path.is_dir():
            digest = hashlib.sha256()
            with os.scandir(path) as entries:
                for name, st in sorted((e.name, e.stat()) for e in entries if is_frame_file(e.name)):
                    digest.update(
                        f"{name} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} {st.st_ino}\n".encode()
                    )
            return digest.hexdigest()
        st = path.stat()
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    except OSError:
        return None
