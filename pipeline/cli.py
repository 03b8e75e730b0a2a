"""The command line: ``python render.py SCENE`` renders a scene; ``--plan`` shows what would render.

::

    python render.py scenes/dog_cat.yaml --plan          # table of frames, cached or why not; no torch
    python render.py scenes/dog_cat.yaml --plan --json   # the same as JSON
    python render.py scenes/dog_cat.yaml                 # render what is missing, write outputs
    python render.py cache info | cache clear --yes      # the cache's size; empty it

Exit codes: 0 done, 1 a failure while rendering, 2 bad input (scene, option, model), 130 interrupted.
Every input is checked before any model loads; bad input prints ``FILE:LINE:COL: ...`` lines.
"""

from __future__ import annotations

import errno
import json
import shutil
import signal
import sqlite3
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NoReturn

import typer

from pipeline.cache import STORE_NAMES, CacheDir, record_key
from pipeline.environment import RenderEnv, resolve_env
from pipeline.history import frame_status, load_plan, save_plan
from pipeline.models import RANDOM_WEIGHTS_NOTE, ModelError, resolve_model
from pipeline.planner import Plan, plan
from pipeline.run import check_outputs, readable_frames, run
from pipeline.scene import Scene, check_against_model, load_scene
from pipeline.yamlio import SceneError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = PROJECT_ROOT / "cache"
DEVICES = ("auto", "cpu", "cuda", "mps")

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Declarative Stable Diffusion animations. 'render.py SCENE [OPTIONS]' is short for "
    "'render.py render SCENE [OPTIONS]'; see 'render.py render --help'.",
)
cache_app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Show or clear the cache.",
)
app.add_typer(cache_app, name="cache")


def _fail(lines: list[str], code: int = 2) -> NoReturn:
    for line in lines:
        typer.echo(line, err=True)
    raise typer.Exit(code)


def _memo(cache: CacheDir | None) -> dict[str, Any]:
    """File-hash memo (stat -> sha256) kept in the cache, so big checkpoints are hashed once."""
    if cache is None:
        return {}
    return dict(cache.records.get_json(record_key("file-digests")) or {})


def _save_memo(cache: CacheDir, memo: dict[str, Any]) -> None:
    cache.records.put_json(record_key("file-digests"), memo)


def _open_cache(cache_dir: Path, *, writable: bool) -> CacheDir | None:
    """The cache, created if ``writable``; read-only (None if there is none yet) otherwise."""
    try:
        return CacheDir(cache_dir) if writable else CacheDir.open_readonly(cache_dir)
    except (sqlite3.DatabaseError, OSError) as exc:
        full = "full" in str(exc).lower() or getattr(exc, "errno", None) == errno.ENOSPC
        hint = (
            "free some space on that disk, or choose another --cache-dir"
            if full
            else f"if it is damaged, clear it with: python render.py cache clear --yes --cache-dir {cache_dir}"
        )
        _fail([f"--cache-dir: cannot open the cache in {cache_dir}: {exc}", hint])


class _Describe:
    """One-line descriptions of frame conditioning for the plan table and ``--plan --json``."""

    def __init__(self, p: Plan) -> None:
        self.plan = p
        # Frames share their keyframes' blend lists, so each is described once (by identity: the
        # lists live as long as the plan, which outlives this object).
        self._blends: dict[int, str] = {}

    def blend(self, parts: list[list[Any]]) -> str:
        found = self._blends.get(id(parts))
        if found is None:
            p = self.plan
            if len(parts) == 1:
                found = _short(p.text(parts[0][0]))
            else:
                found = " + ".join(f"{_short(p.text(k), 18)}×{w:g}" for k, w in parts)
            self._blends[id(parts)] = found
        return found

    def cond(self, cond: dict[str, Any]) -> str:
        if "grid" in cond:
            return f"grid u={cond['u']:g} v={cond['v']:g}"
        if "walk" in cond:
            return f"{self.blend(cond['a'])} +{cond['walk']['offset']:g}"
        if "b" in cond:
            return f"{self.blend(cond['a'])} → {self.blend(cond['b'])} @{cond['t']:.3f}"
        return self.blend(cond["a"])


def _describe_noise(noise: dict[str, Any]) -> str:
    if "circle" in noise:
        a, b = noise["circle"]
        return f"circle {a},{b} s={noise['s']:.3f}"
    if "to" in noise:
        return f"{noise['seed']}→{noise['to']} @{noise['t']:.3f}"
    return str(noise["seed"])


def _short(text: str, width: int = 32) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _print_plan(scene: Scene, env: RenderEnv, p: Plan, status: list[str], as_json: bool) -> None:
    describe = _Describe(p)
    if as_json:
        rows = [
            {
                "frame": j.frame,
                "key": j.key,
                "cached": s == "cached",
                "status": s,
                "prompt": describe.cond(j.recipe["cond"]),
                "cond": j.recipe["cond"],
                "noise": j.recipe["noise"],
                "scalars": j.recipe["scalars"],
                "mode": j.recipe["mode"]["mode"],
            }
            for j, s in zip(p, status, strict=True)
        ]
        # One object per line: readable, and without indent the encoder is the fast C one.
        encode = json.JSONEncoder(ensure_ascii=False).encode
        typer.echo("[\n" + ",\n".join(map(encode, rows)) + "\n]")
        return
    typer.echo(
        f"{scene.path.name}: {len(p)} frames, {scene.width}x{scene.height}, {scene.steps} steps, model {env.model} on {env.device}/{env.dtype}"
    )
    header = f"{'frame':>6}  {'key':12}  {'prompt':54}  {'noise':22}  {'values':28}  status"
    typer.echo(header)
    for j, s in zip(p, status, strict=True):
        values = " ".join(f"{k}={v:g}" for k, v in j.recipe["scalars"].items() if not isinstance(v, dict))
        if j.recipe["mode"]["mode"] != "txt2img":
            values = f"{j.recipe['mode']['mode']} {values}"
        typer.echo(
            f"{j.frame:>6}  {j.key[:12]}  {_short(describe.cond(j.recipe['cond']), 54):54}  "
            f"{_short(_describe_noise(j.recipe['noise']), 22):22}  {_short(values, 28):28}  {s}"
        )
    cached = sum(1 for s in status if s == "cached")
    typer.echo(f"{cached} cached, {len(status) - cached} to render")


@app.command("render")
def render_command(
    scene_file: Path = typer.Argument(..., help="The scene YAML file.", show_default=False),
    plan_only: bool = typer.Option(
        False, "--plan", help="Show the frames and whether each is cached; render nothing."
    ),
    as_json: bool = typer.Option(False, "--json", help="With --plan: print JSON, one object per frame."),
    model: str | None = typer.Option(
        None, "--model", help="Override the scene's model: embedded name, HF id or folder."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Frames per pipeline call (default: 4 on CPU, 8 on GPU)."
    ),
    cache_dir: Path = typer.Option(
        DEFAULT_CACHE, "--cache-dir", help="Where frames and embeddings are cached."
    ),
    out_dir: Path | None = typer.Option(
        None, "--out", help="Output folder (default: renders/<scene name>/ beside the scene)."
    ),
    report: Path | None = typer.Option(None, "--report", help="Write a JSON report of the run here."),
    allow_outside_inputs: bool = typer.Option(
        False, "--allow-outside-inputs", help="Accept input files outside the scene's folder."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Render a scene: only frames that are not cached are rendered; outputs are rebuilt when they changed."""
    # 1. Check every input before anything loads or is written.
    problems: list[str] = []
    if device not in DEVICES:
        problems.append(f"--device: '{device}' is not allowed; allowed: {', '.join(DEVICES)}")
    if batch_size is not None and not 1 <= batch_size <= 1024:
        problems.append(f"--batch-size: {batch_size} is not allowed; use a whole number from 1 to 1024")
    if as_json and not plan_only:
        problems.append("--json only goes with --plan")
    if cache_dir.exists() and not cache_dir.is_dir():
        problems.append(f"--cache-dir: {cache_dir} is a file, not a folder")
    try:
        scene = load_scene(scene_file, allow_outside_inputs=allow_outside_inputs)
        outputs_dir = (out_dir or scene.base_dir / "renders" / scene.name).resolve()
        targets = check_outputs(scene, outputs_dir)
    except SceneError as exc:
        problems = [str(p) for p in exc.problems] + problems
        _fail(problems)
    if problems:
        _fail(problems)

    with ExitStack() as stack:
        # 2. Read-only until every input (the model included) has passed: bad input writes nothing.
        cache = _open_cache(cache_dir, writable=False)
        if cache is not None:
            stack.callback(cache.close)
        memo = _memo(cache)
        memo_before = dict(memo)
        try:
            ref = resolve_model(model or scene.model, scene.base_dir, revision=scene.revision, memo=memo)
            env = resolve_env(scene, device=device, ref=ref)
        except ModelError as exc:
            _fail([f"{scene_file}: {exc}"])
        misfits = check_against_model(
            scene, pipeline_class=ref.pipeline_class, family=ref.family, components=ref.index
        )
        if misfits:
            _fail([str(m) for m in misfits])
        p = plan(scene, env)

        if plan_only:
            cached = cache.frames.present([j.key for j in p]) if cache is not None else set()
            previous = load_plan(cache.records if cache else None, scene.path)
            _print_plan(scene, env, p, frame_status(p, previous, cached), as_json)
            return

        # 3. Render: now the cache may be created and written.
        cache = _open_cache(cache_dir, writable=True)
        assert cache is not None
        stack.callback(cache.close)
        cached = readable_frames(cache, p)
        if memo != memo_before:
            _save_memo(cache, memo)
        if device == "auto" and any(j.key not in cached for j in p):
            # Rendering imports torch anyway: let it confirm the device guessed without it.
            from pipeline.models import torch_device

            actual = torch_device()
            if actual != env.device:
                env = resolve_env(scene, device=actual, ref=ref)
                p = plan(scene, env)
                cached = readable_frames(cache, p)
        if ref.is_embedded and not quiet:
            typer.echo(RANDOM_WEIGHTS_NOTE.format(name=ref.spec), err=True)
        previous = load_plan(cache.records, scene.path)
        if previous is None or previous.get("keys") != [j.key for j in p] or previous.get("base") != p.base:
            save_plan(cache.records, scene.path, p)  # what --plan compares against to say why
        started = time.perf_counter()
        try:
            result = run(scene, env, ref, p, cache, cached, targets, batch_size=batch_size, quiet=quiet)
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a further Ctrl-C must not break the clean exit
            typer.echo(
                f"\ninterrupted: every finished frame is cached; run the same command again to resume:\n"
                f"  python render.py {scene_file}",
                err=True,
            )
            raise typer.Exit(130) from None
        except ModelError as exc:
            _fail([f"{scene_file}: {exc}"])
        except (OSError, sqlite3.Error) as exc:
            # Disk full, permissions: every finished frame is in the cache and old outputs are intact.
            _fail(
                [
                    f"error: {exc}",
                    "frames finished so far are cached; fix the problem and run again to resume",
                ],
                code=1,
            )
        result["seconds"] = round(time.perf_counter() - started, 3)
        typer.echo(
            f"{result['frames']} frames: {result['rendered']} rendered, {result['cached']} cached; "
            f"outputs: {', '.join(f'{o} ({s})' for o, s in result['output_status'].items())}"
        )
        if report is not None:
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(json.dumps(result, indent=2))


@cache_app.command("info")
def cache_info(cache_dir: Path = typer.Option(DEFAULT_CACHE, "--cache-dir")) -> None:
    """Show where the cache is, how big it is, and how many frames and embeddings it holds."""
    try:
        cache = CacheDir.open_readonly(cache_dir)
    except sqlite3.DatabaseError as exc:
        _fail(
            [
                f"{cache_dir}: the cache is damaged ({exc}); clear it with: python render.py cache clear --yes --cache-dir {cache_dir}"
            ]
        )
    if cache is None:
        typer.echo(f"{cache_dir}: empty (no cache yet)")
        return
    with cache:
        counts = cache.counts()
        typer.echo(
            f"{cache_dir}: {cache.volume() / 2**20:.1f} MiB; {counts['frames']} frames, "
            f"{counts['embeddings']} embeddings, {counts['records']} records"
        )


@cache_app.command("clear")
def cache_clear(
    cache_dir: Path = typer.Option(DEFAULT_CACHE, "--cache-dir"),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask."),
) -> None:
    """Delete every cached frame and embedding (outputs already written stay)."""
    if not CacheDir.exists(cache_dir):
        typer.echo(f"{cache_dir}: nothing to clear")
        return
    if not yes and not typer.confirm(f"Delete everything cached in {cache_dir}?"):
        raise typer.Exit(1)
    try:
        with CacheDir(cache_dir) as cache:
            before = cache.volume()
            cache.clear()
    except sqlite3.DatabaseError as exc:
        # A damaged store cannot be opened to be emptied: remove the stores whole (only ours).
        before = sum(
            f.stat().st_size for name in STORE_NAMES for f in (cache_dir / name).rglob("*") if f.is_file()
        )
        for name in STORE_NAMES:
            shutil.rmtree(cache_dir / name, ignore_errors=True)
        typer.echo(f"{cache_dir}: the cache was damaged ({exc}); removed its stores")
    typer.echo(f"{cache_dir}: cleared {before / 2**20:.1f} MiB")


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``render.py SCENE ...`` is short for ``render.py render SCENE ...``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] not in ("render", "cache", "--help", "-h"):
        args.insert(0, "render")
    app(args=args, prog_name="render.py")
