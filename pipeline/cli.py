"""The command line: ``python render.py SCENE`` renders a scene; ``--plan`` shows what would render.

::

    python render.py scenes/dog_cat.yaml --plan          # table of frames, cached or why not; no torch
    python render.py scenes/dog_cat.yaml --plan --json   # the same as JSON
    python render.py scenes/dog_cat.yaml                 # render what is missing, write outputs
    python render.py scenes/dog_cat.yaml --frames 0:64:8 # a preview of those frames, in preview/
    python render.py scenes/dog_cat.yaml --draft --watch # a draft, rendered again on every save
    python render.py cache info | cache clear --yes      # the cache's size; empty it

Exit codes: 0 done, 1 a failure while rendering, 2 bad input (scene, option, model), 130 interrupted.
``--watch`` stopped by Ctrl-C while waiting for a save exits 0 (during a render: 130).
Every input is checked before any model loads; bad input prints ``FILE:LINE:COL: ...`` lines.
"""

from __future__ import annotations

import json
import shlex
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

import typer

from pipeline import __version__
from pipeline import app as api
from pipeline.outputs.plot import plot_problem
from pipeline.outputs.preview import Draft, parse_frames, parse_size
from pipeline.paths import default_cache_dir
from pipeline.plantable import print_plan
from pipeline.render.models import RANDOM_WEIGHTS_NOTE
from pipeline.scene.editor_schema import schema_text
from pipeline.scene.import_common import ImportFailed
from pipeline.scene.importer import convert
from pipeline.scene.problems import SceneError
from pipeline.store.cache import STORE_NAMES, CacheDir, CacheUnavailable
from pipeline.watch import watch

DEFAULT_CACHE = default_cache_dir()
HELP = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    context_settings=HELP,
    help="Declarative Stable Diffusion animations. 'render.py SCENE [OPTIONS]' is short for "
    "'render.py render SCENE [OPTIONS]'; see 'render.py render --help'.",
)
cache_app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    context_settings=HELP,
    help="Show or clear the cache.",
)
app.add_typer(cache_app, name="cache")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"sd-scenes {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_print_version, help="Show the version and exit."
    ),
) -> None:
    """Declarative Stable Diffusion animations."""


def _fail(lines: list[str], code: int = 2) -> NoReturn:
    for line in lines:
        typer.echo(line, err=True)
    raise typer.Exit(code)


@app.command("render")
def render_command(
    ctx: typer.Context,
    scene_file: Path = typer.Argument(..., help="The scene YAML file.", show_default=False),
    plan_only: bool = typer.Option(
        False, "--plan", help="Show the frames and whether each is cached; render nothing."
    ),
    as_json: bool = typer.Option(False, "--json", help="With --plan: print JSON, one object per frame."),
    plot: Path | None = typer.Option(
        None,
        "--plot",
        help="Write the plot of every keyframed value over the frames (.png or .svg); render nothing.",
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        help="Override the scene's model: embedded name, HF id or folder (relative to the current folder).",
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Frames per pipeline call (default: 4 on CPU, 8 on GPU)."
    ),
    threads: int | None = typer.Option(
        None,
        "--threads",
        help="CPU threads for rendering (default: the physical cores not busy with other work; 0: torch's).",
    ),
    workers: int | None = typer.Option(
        None,
        "--workers",
        help="Render on a Ray render farm of N workers: one per GPU, else CPU workers sharing the cores "
        '(needs Ray: pip install -e ".\\[ray]").',
    ),
    ray_address: str | None = typer.Option(
        None,
        "--ray",
        help="Render on the Ray cluster at this address (from 'ray start --head'); workers default to one per GPU.",
    ),
    worker_timeout: float | None = typer.Option(
        None, "--worker-timeout", help="Seconds a farm batch may take before its worker is replaced (900)."
    ),
    cache_dir: Path = typer.Option(
        DEFAULT_CACHE,
        "--cache-dir",
        help="Where frames and embeddings are cached (cache/ in a checkout, else the user's cache folder).",
    ),
    out_dir: Path | None = typer.Option(
        None, "--out", help="Output folder (default: renders/<scene name>/ beside the scene)."
    ),
    report: Path | None = typer.Option(None, "--report", help="Write a JSON report of the run here."),
    allow_outside_inputs: bool = typer.Option(
        False, "--allow-outside-inputs", help="Accept input files outside the scene's folder."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace changed outputs without keeping the previous ones in previous/."
    ),
    frames_range: str | None = typer.Option(
        None,
        "--frames",
        help="Preview only these frames, START:STOP:STEP as a Python slice (e.g. 0:64:8), into preview/.",
    ),
    frame: list[int] = typer.Option(
        [], "--frame", help="Preview only this frame (may be given more than once), into preview/."
    ),
    draft: bool = typer.Option(
        False, "--draft", help="Preview a draft: steps/4 and half the size (own keys), into preview/."
    ),
    draft_steps: int | None = typer.Option(
        None, "--draft-steps", help="The draft's steps (implies --draft)."
    ),
    draft_size: str | None = typer.Option(
        None, "--draft-size", help="The draft's size, WIDTHxHEIGHT (implies --draft)."
    ),
    watch: bool = typer.Option(
        False,
        "--watch",
        help="Render, then render again each time the scene or an input is saved; Ctrl-C stops.",
    ),
) -> None:
    """Render a scene: only frames that are not cached are rendered; outputs are rebuilt when they changed."""
    # 1. Check every input before anything loads or is written (pipeline.app does the work).
    problems: list[str] = []
    wanted: Draft | None = None
    if draft or draft_steps is not None or draft_size is not None:
        wanted = Draft(steps=draft_steps)
        if draft_size is not None:
            try:
                width, height = parse_size(draft_size)
                wanted = Draft(steps=draft_steps, width=width, height=height)
            except ValueError as exc:
                problems.append(str(exc))
    open_options: dict[str, Any] = {
        "model": model,
        "device": device,
        "batch_size": batch_size,
        "threads": threads,
        "workers": workers,
        "ray": ray_address,
        "worker_timeout": worker_timeout,
        "cache_dir": cache_dir,
        "out_dir": out_dir,
        "allow_outside_inputs": allow_outside_inputs,
        "draft": wanted,
    }
    session = api.open(scene_file, **open_options)
    problems = [str(p) for p in session.problems] + problems
    if frames_range is not None and frame:
        problems.append("--frames and --frame: give one or the other")
    if watch and (plan_only or plot is not None or report is not None):
        problems.append("--watch renders again on every save; it does not go with --plan, --plot or --report")
    if as_json and not plan_only:
        problems.append("--json only goes with --plan")
    if plot is not None and (why := plot_problem(plot)) is not None:
        problems.append(f"--plot: {why}")
    shown: list[int] | None = list(frame) or None
    if frames_range is not None and session.scene is not None:
        try:
            shown = parse_frames(frames_range, session.scene.total_frames)
        except ValueError as exc:
            problems.append(f"--frames: {exc}")
    if shown is not None and session.scene is not None and not problems:
        try:
            session.shown_frames(shown)  # the same check a Python caller gets
        except api.InputError as exc:
            problems += [str(p) for p in exc.problems]
    if problems:
        _fail(problems)
    options: dict[str, Any] = ctx.obj or {}
    if watch:
        _watch(ctx, scene_file, open_options, shown, quiet=quiet, overwrite=overwrite)
        return
    try:
        if plot is not None:
            drawn = session.plot(plot)
            typer.echo(f"values plot: {plot} ({', '.join(drawn) or 'no value changes'})", err=plan_only)
        if plot is not None and not plan_only:
            return
        if plan_only:
            status = [f.status for f in session.status()]
            assert session.scene is not None
            p = session.plan()
            if shown is not None:  # the rows of the frames asked for
                status, p = [status[f] for f in shown], replace(p, jobs=[p[f] for f in shown])
            print_plan(session.scene, session.env, p, status, as_json)
            return

        # 2. Render: now the cache may be created and written.
        def on_start(setup: api.RenderSetup) -> None:
            if setup.ref.has_random_weights and not quiet:
                typer.echo(RANDOM_WEIGHTS_NOTE.format(name=setup.ref.spec), err=True)

        result = session.render(
            progress=options.get("progress"),
            quiet=quiet,
            on_start=on_start,
            command=options.get("command") or _command(ctx),
            overwrite=overwrite,
            frames=shown,
        )
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a further Ctrl-C must not break the clean exit
        typer.echo(
            "\ninterrupted: every finished frame is cached; run the same command again to resume:\n"
            f"  {options.get('command') or _command(ctx)}",
            err=True,
        )
        raise typer.Exit(130) from None
    except api.InputError as exc:
        _fail([str(p) for p in exc.problems])
    except api.RenderError as exc:
        _fail(
            [f"error: {exc}", "frames finished so far are cached; fix the problem and run again to resume"],
            code=1,
        )
    _summary(result)
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(result.to_dict(), indent=2))


def _summary(result: api.Report) -> None:
    """The notes and the one line a render ends with (a preview says so, and names its files)."""
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    files = ", ".join(f"{o} ({s})" for o, s in result.output_status.items())
    if result.shown is not None:
        typer.echo(
            f"preview of {len(result.shown)} frames: {result.rendered} rendered, {result.cached} cached; "
            f"preview: {files}"
        )
        return
    farm = f" on {result.workers} worker{'s' if result.workers > 1 else ''}" if result.workers else ""
    typer.echo(
        f"{result.frames} frames: {result.rendered} rendered{farm}, {result.cached} cached; outputs: {files}"
    )


def _watch(
    ctx: typer.Context,
    scene_file: Path,
    open_options: dict[str, Any],
    shown: list[int] | None,
    *,
    quiet: bool,
    overwrite: bool,
) -> None:
    """``--watch``: render now and after every save (``pipeline.watch``). Ctrl-C while waiting for a
    save stops with exit 0; during a render it stops that render as any Ctrl-C does (exit 130)."""

    options: dict[str, Any] = ctx.obj or {}

    def render(session: api.Session) -> api.Report:
        result = session.render(
            progress=options.get("progress"),
            quiet=quiet,
            command=options.get("command") or _command(ctx),
            overwrite=overwrite,
            frames=shown,
        )
        _summary(result)
        return result

    try:
        watch(scene_file, open_options, render=render, echo=lambda line: typer.echo(line, err=True))
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        typer.echo("\ninterrupted: every finished frame is cached; watching stopped", err=True)
        raise typer.Exit(130) from None


@app.command("schema")
def schema_command() -> None:
    """Print the JSON Schema of the scene format (scenes/scene.schema.json is this, for editors)."""
    typer.echo(schema_text(), nl=False)


@app.command("import")
def import_command(
    source: Path = typer.Argument(
        ..., help="A Parseq JSON export or a Deforum settings file (JSON).", show_default=False
    ),
    out: Path | None = typer.Option(
        None, "--out", help="The scene to write (default: beside FILE, as NAME.yaml)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the scene file if it exists."),
) -> None:
    """Turn a Parseq export or a Deforum settings file into a scene YAML, and say what it could not carry over."""
    target = out or source.with_suffix(".yaml")
    try:
        text, notes = convert(source, str(source))
    except ImportFailed as exc:
        _fail([str(exc.problem)])
    except SceneError as exc:
        _fail([str(p) for p in exc.problems])
    if target.exists() and not overwrite:
        _fail([f"{target}: already exists; pass --overwrite to replace it, or --out to write elsewhere"])
    target.write_text(text, encoding="utf-8")
    typer.echo(f"wrote {target}")
    for note in notes:
        typer.echo(f"not carried over: {note}", err=True)


def _command(ctx: typer.Context) -> str:
    """The command line of this run, to resume it (each argument quoted for the shell)."""
    root = ctx.find_root()
    return shlex.join([root.info_name or "render.py", *sys.argv[1:]])


@cache_app.command("info")
def cache_info(cache_dir: Path = typer.Option(DEFAULT_CACHE, "--cache-dir")) -> None:
    """Show where the cache is, every byte it holds on disk, and how many entries each store has."""
    where = cache_dir.resolve()
    if not CacheDir.exists(cache_dir):
        typer.echo(f"{where}: empty (no cache yet)")
        return
    survey = CacheDir.survey(cache_dir)
    size = sum(s.size for s in survey)
    counts = ", ".join(
        f"{s.entries} {s.name}" if s.problem is None else f"{s.name} unreadable" for s in survey
    )
    readonly = CacheDir.unwritable(cache_dir)
    typer.echo(
        f"{where}: {size / 2**20:.1f} MiB on disk; {counts}"
        + (f"; read-only ({readonly})" if readonly else "")
    )
    problems = [s.problem for s in survey if s.problem is not None]
    for problem in problems:
        typer.echo(f"{problem}", err=True)
        typer.echo(problem.hint(), err=True)
    if problems:
        raise typer.Exit(2)


@cache_app.command("clear")
def cache_clear(
    cache_dir: Path = typer.Option(DEFAULT_CACHE, "--cache-dir"),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask."),
    stores: list[str] = typer.Option(
        [],
        "--store",
        help=f"Clear only this store ({', '.join(STORE_NAMES)}); may be given more than once.",
        show_default=False,
    ),
) -> None:
    """Delete cached frames, embeddings and records (outputs already written stay).

    When a store is damaged, only the damaged stores are removed and the intact ones are kept.
    """
    unknown = [name for name in stores if name not in STORE_NAMES]
    if unknown:
        _fail([f"--store: '{name}' is not a store; stores: {', '.join(STORE_NAMES)}" for name in unknown])
    survey = [s for s in CacheDir.survey(cache_dir) if s.entries is not None or s.problem is not None]
    damaged = [s.name for s in survey if s.problem is not None and s.problem.kind == "damaged"]
    # Repairing must not destroy what is intact: with damage, only the damaged stores go.
    names = [s.name for s in survey if s.name in stores] if stores else damaged or [s.name for s in survey]
    if not names:
        typer.echo(f"{cache_dir}: nothing to clear")
        return
    what = "everything cached" if len(names) == len(STORE_NAMES) else f"the {' and '.join(names)} store"
    if damaged and not stores:
        what = f"the damaged {' and '.join(names)} store"
    if not yes and not typer.confirm(f"Delete {what} in {cache_dir}?"):
        typer.echo(f"{cache_dir}: nothing cleared")
        return
    freed = 0
    for name in names:
        try:
            size, why = CacheDir.clear_store(cache_dir, name)
        except CacheUnavailable as exc:
            _fail([f"{exc}", f"{cache_dir}: {'nothing more' if freed else 'nothing'} was cleared"], code=1)
        freed += size
        if why:
            typer.echo(f"{cache_dir}: the {name} store was damaged ({why}); removed it")
    typer.echo(f"{cache_dir}: cleared {freed / 2**20:.1f} MiB ({', '.join(names)})")
    kept = [s.name for s in survey if s.name not in names]
    if damaged and not stores and kept:
        flags = " ".join(f"--store {name}" for name in kept)
        typer.echo(f"{cache_dir}: kept the intact {', '.join(kept)}; to empty them too: cache clear {flags}")


def main(argv: list[str] | None = None, *, progress: Any = None) -> None:
    """Entry point: ``render.py SCENE ...`` is short for ``render.py render SCENE ...``.

    ``progress`` (Python callers only) is handed to ``Session.render``: a callback that hears of every
    frame done (see ``pipeline.app.Progress``).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    prog = _prog_name()
    command = shlex.join([*prog.split(" "), *args])
    if args and args[0] not in ("render", "cache", "schema", "import", "--help", "-h", "--version"):
        args.insert(0, "render")
    app(args=args, prog_name=prog, obj={"progress": progress, "command": command})


def _prog_name() -> str:
    """How the user started us, for usage lines and the resume hint."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "render.py"
    if name == "__main__.py":
        return "python -m pipeline"
    if name == "cli.py":
        return "python -m pipeline.cli"
    if name.endswith(".py"):
        return f"python {name}"
    return name


if __name__ == "__main__":
    main()
