"""One render run: render the frames that are not cached, then (re)write the outputs that changed.

torch is imported only when at least one frame must be rendered, so a no-op re-run is quick::

    targets = check_outputs(scene, out_dir)
    result = run(scene, env, ref, plan, cache, cached_keys, targets, batch_size=None)
    result["rendered"], result["cached"], result["outputs"]

An output's key is the keys of its frames plus its own settings; when the file at its path is the
one we wrote for that key, it is left alone.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.outputs.assemble import clean_partials, is_frame_file, name_length_problem, write_output
from pipeline.outputs.record import record_names, write_record
from pipeline.plan.keys import key_of
from pipeline.plan.planner import Plan
from pipeline.render.environment import RenderEnv, input_files
from pipeline.render.models import ModelError, ModelRef
from pipeline.scene.core import Output, Scene, output_kind
from pipeline.scene.yamlio import SceneError
from pipeline.store.cache import CacheDir
from pipeline.store.records import output_key, outputs_of_key

# 2: MP4s carry a comment and frames folders their parameters as PNG text chunks; 3: GIFs have one
# palette fitted to all frames and delta frames. Each bump writes every output once more.
ASSEMBLE_VERSION = 3
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


def _settings(scene: Scene, target: Target, frames: int) -> dict[str, Any]:
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
    for target in targets:
        target.path.parent.mkdir(parents=True, exist_ok=True)
        clean_partials(target.path.parent)  # temporary files of a run killed while writing outputs
        settings = _settings(scene, target, len(keys))
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
        elif target.kind == "frames":
            if rows is None:
                from pipeline.outputs.record import flat, frame_rows

                rows = [(r, flat(r)) for r in frame_rows(plan)]
            from pipeline.outputs.record import png_texts

            extra["texts"] = [png_texts(r, v) for r, v in rows]
        if keep is not None and _stamp(target.path) is not None:
            keep(target.path)
        write_output(target.kind, target.path, frames, **settings, **extra)
        cache.records.put_json(rec_key, {"key": out_key, "stamp": _stamp(target.path)})
        status[str(target.path)] = "written"
    return status


def mp4_comment(scene: Scene, plan: Plan, model: str) -> str:
    """An MP4's comment: what made it, in one line. Decided by the scene and the frame keys alone (no
    time, no command), so the same frames make the same bytes."""
    from pipeline import __version__
    from pipeline.outputs.record import record_names

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
                _link_or_copy(file, into / file.name)
        else:
            into.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(path, into)

    def _new_folder(self, path: Path) -> Path:
        import json
        from datetime import datetime, timezone

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


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        import shutil

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
    - A feedback frame is ready once the frame before it is in the cache: chains render in waves.
    - Out of memory halves the batch size and goes on; one frame that still fails is an error.
    - The first Ctrl-C stores the frames already rendered and stops when the batch on the device
      returns (that batch is not stored: it would come on top of the frames being written); a second
      Ctrl-C stops at once, once the frames already rendered are stored.
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
        import errno

        from tqdm import tqdm

        from pipeline.store.cache import CacheReadOnly
        from pipeline.store.claims import Claims

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
        try:
            while queue.remaining:
                batch = queue.next_batch(self.batch_size)
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
                        # The device renders while the writer stores the batch before.
                        images = self._render(todo)
                        settle(writer.wait())
                        if self.stop_requested:
                            raise KeyboardInterrupt
                        writer.put(list(zip(todo, images, strict=True)))
                    if self.stop_requested:
                        raise KeyboardInterrupt
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

    def _render(self, batch: list[Any]) -> list[Any]:
        """Render one batch, halving it on out-of-memory: an image (or PNG bytes) per job."""
        try:
            return list(self.renderer.render_batch(batch))
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
            return self._render(batch[:half]) + self._render(batch[half:])

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
        from concurrent.futures import ThreadPoolExecutor

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
            prev = job.recipe["mode"].get("prev")
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
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
