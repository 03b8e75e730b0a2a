"""The render page: ``index.html`` in the output folder, a static page (no server, no script) that
shows what a render made and what made it::

    write_page(out_dir, scene, plan, cache, targets, rendered=keys_rendered_this_run)

It holds the video (the first MP4 output, else the first GIF), a contact sheet of the keyframes, the
plot of every keyframed value over the frames (``pipeline.outputs.plot``), the per-frame table
(``pipeline.outputs.record.frame_rows``) with which frames this run rendered and which it found
cached, and the settings (the resolved scene and the record's summary). Its pictures live in
``page/`` beside it; every link is relative, so the folder can be moved or zipped and still shows.

The page is written with the record (when an output was written, or when the page is missing), never
read back, and nothing in it feeds a frame key. Previews never write it (``pipeline.outputs.preview``
writes into ``preview/`` only).
"""

from __future__ import annotations

import contextlib
import html
import json
import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pipeline import __version__
from pipeline.outputs.assemble import link_or_copy
from pipeline.outputs.files import atomic_output
from pipeline.outputs.plot import write_plot
from pipeline.outputs.record import flat, frame_rows, record_names, scene_yaml, table_columns, write_text
from pipeline.outputs.targets import PAGE, PAGE_DIR, Target
from pipeline.plan.planner import Plan
from pipeline.scene.core import Scene
from pipeline.store.cache import CacheDir

__all__ = ["MAX_ROWS", "MAX_THUMBS", "page_paths", "sheet_frames", "write_page"]

# Rows of the per-frame table shown on the page; the CSV and JSON beside it hold every frame.
MAX_ROWS = 5000
# Pictures on the contact sheet at most.
MAX_THUMBS = 32
# A frame key is shown by its first characters (all of it on hover; the CSV has every one).
_KEY_CHARS = 12


def page_paths(out_dir: Path) -> tuple[Path, Path]:
    """(the page, the folder of its pictures) in ``out_dir``: paths no output may take."""
    return out_dir / PAGE, out_dir / PAGE_DIR


def write_page(
    out_dir: Path,
    scene: Scene,
    plan: Plan,
    cache: CacheDir,
    targets: Sequence[Target],
    *,
    rendered: Collection[str],
    model: str | None = None,
    keep_into: Path | None = None,
) -> list[Path]:
    """Write ``index.html`` and its pictures into ``out_dir``; returns the paths written.

    ``rendered``: the frame keys this run rendered (the others were cached). ``keep_into``: the
    ``previous/<time>/`` folder of this run, where the page it replaces is kept (hard links), so the
    page of the replaced outputs still shows them. Every file is written atomically.
    """
    page, folder = page_paths(out_dir)
    if keep_into is not None:
        _keep(out_dir, keep_into)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    keyframes = [f for f in dict.fromkeys(scene.written_keyframe_frames) if 0 <= f < len(plan)]
    thumbs: list[tuple[int, str]] = []
    wanted: set[str] = set()
    for frame in sheet_frames(keyframes, len(plan)):
        name = f"keyframe_{frame:05d}.png"
        blob = cache.frames.get(plan[frame].key)
        if blob is None:  # only a frame damaged since the outputs were written; the page says so
            continue
        wanted.add(name)
        path = folder / name
        with atomic_output(path) as tmp:
            tmp.write_bytes(blob)  # the frame's own PNG, as cached: nothing decoded
        written.append(path)
        thumbs.append((frame, f"{PAGE_DIR}/{name}"))
    for stale in folder.glob("keyframe_*.png"):  # keyframes an earlier version of the scene had
        if stale.name not in wanted:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
    plot = folder / "values.svg"
    write_plot(plan, plot, title=scene.path.name, keyframes=keyframes, fps=scene.fps)
    written.append(plot)
    text = page_html(
        out_dir, scene, plan, targets, rendered, thumbs, f"{PAGE_DIR}/{plot.name}", keyframes, model=model
    )
    write_text(page, text)
    written.append(page)
    return written


def page_html(
    out_dir: Path,
    scene: Scene,
    plan: Plan,
    targets: Sequence[Target],
    rendered: Collection[str],
    thumbs: Sequence[tuple[int, str]],
    plot: str,
    keyframes: Sequence[int],
    *,
    model: str | None = None,
) -> str:
    """The page's HTML (``thumbs``: (frame, relative path) per frame of the sheet; ``plot``: the plot's
    relative path; ``keyframes``: the scene's keyframe frames)."""
    names = record_names(scene)
    rendered = set(rendered)
    here = sum(1 for job in plan if job.key in rendered)
    title = f"{scene.path.name}: {len(plan)} frames"
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_e(scene.path.name)}</h1>",
        f'<p class="sub">{len(plan)} frames, {scene.width}x{scene.height}, {scene.fps:g} fps, '
        f"{scene.steps} steps, model {_e(model or scene.model)}: {here} rendered in this run, "
        f"{len(plan) - here} cached. Written by sd-scenes {_e(__version__)}.</p>",
        _video(out_dir, targets),
        _outputs(out_dir, targets, names),
        '<h2 id="keyframes">Keyframes</h2>',
        _sheet(thumbs, keyframes, len(plan)),
        '<h2 id="values">Values over the frames</h2>',
        f'<p><img class="plot" src="{_url(plot)}" alt="every keyframed value over the frames"></p>',
        '<h2 id="frames">Frames</h2>',
        _table(plan, rendered, names),
        '<h2 id="settings">Settings</h2>',
        _settings(out_dir, scene, names, model),
        "</body></html>",
        "",
    ]
    return "\n".join(parts)


def _video(out_dir: Path, targets: Sequence[Target]) -> str:
    by_kind = {t.kind: t for t in reversed(targets)}  # the first of each kind
    if "mp4" in by_kind:
        src = _rel(out_dir, by_kind["mp4"].path)
        return f'<video controls loop muted playsinline preload="auto" src="{src}"></video>'
    if "gif" in by_kind:
        src = _rel(out_dir, by_kind["gif"].path)
        return f'<p><img class="anim" src="{src}" alt="the animation"></p>'
    return '<p class="sub">This scene has no MP4 or GIF output.</p>'


def _outputs(out_dir: Path, targets: Sequence[Target], names: dict[str, str]) -> str:
    items = [
        f'<a href="{_rel(out_dir, t.path)}">{_e(os.path.relpath(t.path, out_dir))}</a> ({t.kind})'
        for t in targets
    ]
    items += [
        f'<a href="{_url(names[k])}">{_e(names[k])}</a>'
        for k in ("record", "scene", "frames_csv", "frames_json")
    ]
    return '<p class="files">Files: ' + " · ".join(items) + "</p>"


def sheet_frames(keyframes: Sequence[int], frames: int) -> list[int]:
    """The frames of the contact sheet: the keyframes, at most :data:`MAX_THUMBS` of them evenly
    chosen; a scene without keyframes (a grid, a walk) shows that many frames evenly spaced."""
    chosen = list(keyframes) or list(range(frames))
    if len(chosen) <= MAX_THUMBS:
        return chosen
    return [chosen[round(i * (len(chosen) - 1) / (MAX_THUMBS - 1))] for i in range(MAX_THUMBS)]


def _sheet(thumbs: Sequence[tuple[int, str]], keyframes: Sequence[int], frames: int) -> str:
    cells = [
        f'<figure><img src="{_url(src)}" alt="frame {frame}" loading="eager">'
        f"<figcaption>frame {frame}</figcaption></figure>"
        for frame, src in thumbs
    ]
    shown = sheet_frames(keyframes, frames)
    notes = []
    if not keyframes:
        notes.append(f"The scene has no keyframes: {len(shown)} of its {frames} frames, evenly spaced.")
    elif len(shown) < len(keyframes):
        notes.append(f"{len(shown)} of the {len(keyframes)} keyframes, evenly chosen.")
    if len(thumbs) < len(shown):
        notes.append(f"{len(shown) - len(thumbs)} of these frames could not be read from the cache.")
    note = "".join(f'<p class="sub">{_e(n)}</p>' for n in notes)
    return '<div class="sheet">' + "".join(cells) + "</div>" + note


def _table(plan: Plan, rendered: set[str], names: dict[str, str]) -> str:
    rows = [flat(r) for r in frame_rows(plan)]
    columns = table_columns(rows)
    head = "".join(f"<th>{_e(c)}</th>" for c in ["frame", "this run", *columns[1:]])
    body = []
    for r in rows[:MAX_ROWS]:
        how = "rendered" if r["key"] in rendered else "cached"
        cells = [f"<td>{r['frame']}</td>", f'<td class="{how}">{how}</td>']
        for c in columns[1:]:
            value = r.get(c, "")
            if c == "key":
                cells.append(f'<td title="{_e(value)}"><code>{_e(value[:_KEY_CHARS])}</code></td>')
            elif c in ("prompt", "negative_prompt"):  # cut to the column's width; all of it on hover
                cells.append(f'<td class="text" title="{_e(value)}">{_e(value)}</td>')
            else:
                cells.append(f"<td>{_e(_fmt(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = (
        f'<p class="sub">The first {MAX_ROWS} of {len(rows)} frames; every frame is in '
        f'<a href="{_url(names["frames_csv"])}">{_e(names["frames_csv"])}</a>.</p>'
        if len(rows) > MAX_ROWS
        else ""
    )
    return (
        f'<div class="scroll"><table id="frame-table"><thead><tr>{head}</tr></thead><tbody>'
        + "\n".join(body)
        + "</tbody></table></div>"
        + more
    )


def _settings(out_dir: Path, scene: Scene, names: dict[str, str], model: str | None) -> str:
    try:
        resolved = (out_dir / names["scene"]).read_text(encoding="utf-8")
    except OSError:
        resolved = scene_yaml(scene, model=model)
    summary = ""
    with contextlib.suppress(OSError, ValueError):
        record: dict[str, Any] = json.loads((out_dir / names["record"]).read_text(encoding="utf-8"))
        about = record.get("model", {})
        facts = {
            "written at": record.get("written_at"),
            "command": record.get("command"),
            "model": about.get("spec"),
            "pipeline": about.get("pipeline"),
            "scheduler": about.get("scheduler"),
            "device": f"{record.get('device')} ({record.get('dtype')})",
            "base key": record.get("base_key"),
        }
        summary = (
            "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(str(v))}</dd>" for k, v in facts.items()) + "</dl>"
        )
    return summary + f'<pre id="resolved-scene">{_e(resolved)}</pre>'


def _keep(out_dir: Path, into: Path) -> None:
    """Hard-link the page being replaced (and its pictures) into ``into``, at their own relative paths."""
    page, folder = page_paths(out_dir)
    files = [page, *sorted(folder.glob("*"))] if page.exists() else []
    for file in files:
        if file.is_file():
            target = into / file.relative_to(out_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                link_or_copy(file, target)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _rel(out_dir: Path, path: Path) -> str:
    return _url(Path(os.path.relpath(path, out_dir)).as_posix())


def _url(relative: str) -> str:
    # Relative, percent-encoded: a name with spaces or '#' still loads from file:// or a zip.
    return html.escape(quote(relative), quote=True)


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px; padding: 0 1em;
  color: #1d1d1f; background: #fafafa; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.sub { color: #555; } .files a { white-space: nowrap; }
video, img.anim { width: 100%; max-width: 512px; background: #000; display: block; }
.sheet { display: flex; flex-wrap: wrap; gap: 8px; }
.sheet figure { margin: 0; } .sheet img { width: 160px; height: auto; display: block; image-rendering: auto; }
.sheet figcaption { font-size: 12px; color: #555; text-align: center; }
img.plot { max-width: 100%; background: #fff; }
.scroll { max-height: 480px; overflow: auto; border: 1px solid #ddd; background: #fff; }
table { border-collapse: collapse; font-size: 12px; }
th, td { padding: 2px 6px; border-bottom: 1px solid #eee; text-align: left; white-space: nowrap; }
th { position: sticky; top: 0; background: #f0f0f0; }
td.text { max-width: 24em; overflow: hidden; text-overflow: ellipsis; }
td.rendered { color: #0a6d2c; font-weight: 600; } td.cached { color: #777; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 12px; }
dt { color: #555; } dd { margin: 0; font-family: monospace; }
pre { background: #fff; border: 1px solid #ddd; padding: 8px; overflow: auto; max-height: 480px; }
"""
