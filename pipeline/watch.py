"""Watch mode: render a scene, then render it again each time it or one of its inputs is saved.

::

    from pipeline.watch import watch
    watch("scenes/dog_cat.yaml", {"cache_dir": "cache"}, render=lambda s: s.render(), echo=print)

Each round opens a new :class:`pipeline.app.Session` (the scene and its inputs are read afresh), so
a round plans exactly what a separate ``render.py`` run would: unchanged frames come from the cache.
A save that makes the scene invalid prints its located problems and waits for the next save; a
failed render (a full disk) prints the error and waits too. Files are watched through their
folders (editors often save by writing a new file and renaming it over the old one) with watchfiles;
a save made while a round renders starts the next round as soon as it ends.

Stopping: ``stop`` (a ``threading.Event``) ends the loop; Ctrl-C while waiting for a save returns
normally (the CLI exits 0); Ctrl-C during a render raises ``KeyboardInterrupt`` as a render does.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pipeline import app as api
from pipeline.render.environment import input_files

Echo = Callable[[str], None]


def watched_files(scene_file: Path, session: api.Session | None) -> set[Path]:
    """The scene file and every input file its (valid) scene names, resolved."""
    files = {scene_file.resolve()}
    scene = session.scene if session is not None else None
    if scene is not None:
        files |= {scene.resolve(name) for name in input_files(scene)}
    return files


def _stamps(files: Iterable[Path]) -> dict[Path, tuple[int, int, int] | None]:
    """What each file looks like now (None: missing): a save changes it."""
    stamps: dict[Path, tuple[int, int, int] | None] = {}
    for path in files:
        try:
            st = os.stat(path)
            stamps[path] = (st.st_size, st.st_mtime_ns, st.st_ino)
        except OSError:
            stamps[path] = None
    return stamps


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def watch(
    scene_file: str | Path,
    options: dict[str, Any],
    *,
    render: Callable[[api.Session], Any] | None = None,
    echo: Echo = print,
    stop: threading.Event | None = None,
) -> None:
    """Render ``scene_file`` (opened with ``pipeline.open(scene_file, **options)``) now and after
    every save of it or of its inputs, until ``stop`` is set or Ctrl-C comes while waiting.

    ``render(session)`` renders one round (default: ``session.render()``) and says what it did.
    """
    import watchfiles

    scene_file = Path(scene_file)
    render = render or (lambda session: session.render())
    files: set[Path] = {scene_file.resolve()}
    while stop is None or not stop.is_set():
        session = api.open(scene_file, **options)
        problems = session.problems
        # An invalid scene names no inputs we can trust: keep watching those of the last valid one.
        files = watched_files(scene_file, session) if not problems else files | {scene_file.resolve()}
        before = _stamps(files)
        if problems:
            for problem in problems:
                echo(str(problem))
            echo(f"{len(problems)} problem(s): nothing rendered; waiting for the next save")
        else:
            try:
                render(session)
            except api.InputError as exc:
                for problem in exc.problems:
                    echo(str(problem))
                echo("nothing rendered; waiting for the next save")
            except api.RenderError as exc:
                echo(f"error: {exc}")
                echo("frames finished so far are cached; waiting for the next save")
        after = _stamps(files)
        changed = sorted(p for p, st in after.items() if before.get(p, st) != st)
        if not changed:
            echo(f"watching {len(files)} file(s) for saves (Ctrl-C stops)")
            try:
                changed = _wait(files, after, stop, watchfiles)
            except KeyboardInterrupt:
                echo("stopped watching")
                return
        if not changed:
            return  # stopped
        echo("changed: " + ", ".join(_shown(p) for p in changed))


def _wait(
    files: set[Path], since: dict[Path, Any], stop: threading.Event | None, watchfiles: Any
) -> list[Path]:
    """Block until one of ``files`` is saved (or ``stop`` is set: []); the files that changed.

    A file counts as saved when its stamps differ from ``since`` (taken when the round ended):
    checked on every event watchfiles reports, and twice a second, which catches a save made before
    the watcher started."""
    folders = sorted({p.parent for p in files if p.parent.is_dir()})

    def wanted(change: Any, path: str) -> bool:
        return Path(path).resolve() in files

    for changes in watchfiles.watch(
        *folders,
        watch_filter=wanted,
        stop_event=stop,
        recursive=False,
        debounce=400,
        step=50,
        rust_timeout=500,
        yield_on_timeout=True,
    ):
        if changes:
            # Only what differs from the end of the last round: a late event of a save that round
            # already read (an editor's save can come as several batches of events) is not a save.
            saved = sorted(p for p, st in _stamps(files).items() if since.get(p) != st)
            if saved:
                return saved
            continue
        if _stamps(files) != since:
            time.sleep(0.2)  # let a save in progress finish before the scene is read
            return sorted(p for p, st in _stamps(files).items() if since.get(p) != st)
    return []


__all__ = ["watch", "watched_files"]
