"""What a :class:`pipeline.app.Session` is made of: the API's types and errors, the checks of a run's
options, opening a scene's source and the cache, and building the renderer a render uses.

Everything here is re-exported by ``pipeline.app`` (and so by ``pipeline``): import from there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from pipeline.cpu import choose_threads
from pipeline.outputs.preview import PreviewPaths, check_frame, clash, preview_paths
from pipeline.outputs.targets import Target
from pipeline.plan.planner import FrameJob, Plan
from pipeline.render.environment import RenderEnv
from pipeline.render.farm import DEFAULT_TIMEOUT_S, FarmError, FarmRenderer, farm_pool, farm_problems
from pipeline.render.loop import Progress
from pipeline.render.modelfiles import ModelRef
from pipeline.render.models import load_pipeline
from pipeline.scene.core import Scene
from pipeline.scene.load import load_scene, parse_scene
from pipeline.store.cache import CacheDir, CacheUnavailable
from pipeline.store.records import FILE_DIGESTS

DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass(frozen=True)
class OptionProblem:
    """A problem with an option of the run (not with the scene file): ``--device: 'tpu' is not allowed``."""

    option: str
    message: str

    def __str__(self) -> str:
        return f"{self.option}: {self.message}"


class InputError(Exception):
    """Bad input (scene, option, model): nothing was written. The CLI prints ``problems`` and exits 2."""

    def __init__(self, problems: list[Any]):
        self.problems = list(problems)
        super().__init__("\n".join(map(str, self.problems)))


class RenderError(Exception):
    """A failure while rendering (disk full, permissions). Finished frames stay cached; exit 1."""


ProgressFn = Callable[[Progress], None]


@dataclass(frozen=True)
class FrameStatus:
    """One frame of the plan: its key and whether it is cached, or why not."""

    frame: int
    key: str
    cached: bool
    status: str


@dataclass
class Report:
    """What a render did; ``to_dict()`` is the ``--report`` JSON."""

    scene: str
    frames: int
    rendered: int
    cached: int
    renders: int
    embeddings_encoded: int
    outputs: list[str]
    output_status: dict[str, str]
    device: str
    dtype: str
    model: str
    seconds: float = 0.0
    threads: int | None = None  # CPU threads torch rendered with (None: nothing rendered on the CPU)
    workers: int | None = None  # render-farm workers (pipeline.render.farm); None: rendered in this process
    notes: list[str] = field(default_factory=list)
    record: list[str] = field(default_factory=list)  # the record files written (pipeline.outputs.record)
    previous: str | None = None  # where the outputs this run replaced were kept
    shown: list[int] | None = (
        None  # a preview (pipeline.outputs.preview): the frames it shows; None: a final render
    )
    page: str | None = None  # the render page, when this run wrote it (pipeline.outputs.page)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BatchRenderer(Protocol):
    """Renders frames of one plan: an image per job, in order. ``encoded`` counts embeddings encoded.

    An image is a PIL image (RGB), an HxWx3 uint8 array, or PNG bytes; the run encodes the first two
    as PNG (``pipeline.render.batches.encode_png``) in its writer thread, overlapping the next ``render_batch``.
    The jobs of one call share their ``FrameJob.batch_group``.
    """

    encoded: int

    def render_batch(self, jobs: list[FrameJob]) -> list[Any]: ...


@dataclass
class RenderSetup:
    """What a renderer factory is given; ``default()`` loads the model and builds the real renderer."""

    scene: Scene
    env: RenderEnv
    ref: ModelRef
    plan: Plan
    cache: CacheDir
    threads: int | None = None  # CPU threads to render with: None auto, 0 torch's default

    def default(self) -> BatchRenderer:
        from pipeline.render.renderer import (  # imports torch: only when a frame renders
            FrameRenderer,
            configure,
        )

        env = self.env
        pipe = configure(load_pipeline(self.ref, device=env.device, dtype=env.dtype), self.scene)
        return FrameRenderer(pipe, self.scene, self.plan, self.cache, device=env.device, dtype=env.dtype)


RendererArg = BatchRenderer | Callable[[RenderSetup], BatchRenderer] | None


def option_problems(
    device: str,
    batch_size: int | None,
    threads: int | None,
    workers: int | None,
    ray: str | None,
    worker_timeout: float | None,
    cache_dir: Path,
) -> list[OptionProblem]:
    """The problems of a run's options (not of its scene): ``--device: 'tpu' is not allowed``."""
    problems = []
    if device not in DEVICES:
        problems.append(
            OptionProblem("--device", f"'{device}' is not allowed; allowed: {', '.join(DEVICES)}")
        )
    if batch_size is not None and not 1 <= batch_size <= 1024:
        problems.append(
            OptionProblem("--batch-size", f"{batch_size} is not allowed; use a whole number from 1 to 1024")
        )
    if threads is not None and not 0 <= threads <= 1024:
        problems.append(
            OptionProblem(
                "--threads",
                f"{threads} is not allowed; use 0 (torch's default) or a whole number from 1 to 1024",
            )
        )
    problems += [OptionProblem(o, m) for o, m in farm_problems(workers, ray, worker_timeout)]
    if cache_dir.exists() and not cache_dir.is_dir():
        problems.append(OptionProblem("--cache-dir", f"{cache_dir} is a file, not a folder"))
    return problems


def make_renderer(
    renderer: RendererArg,
    setup: RenderSetup,
    workers: int | None,
    ray: str | None,
    worker_timeout: float | None,
) -> tuple[BatchRenderer, Any, int | None]:
    """The batch renderer, built when the first frame must render (torch is imported from here); the
    render farm's renderer when it is one (else None); the CPU threads it renders with (None: not on
    the CPU here)."""
    if renderer is None and (workers is not None or ray is not None):
        try:
            pool = farm_pool(workers, ray, setup.env.device, setup.threads or None)
        except FarmError as exc:
            if exc.option is None:
                raise
            raise InputError([OptionProblem(exc.option, str(exc))]) from None
        farm = FarmRenderer(pool, setup, timeout_s=worker_timeout or DEFAULT_TIMEOUT_S)
        return farm, farm, pool.threads
    threads = None
    if setup.env.device == "cpu":
        import torch  # about to render anyway: the renderer imports it too

        wanted = choose_threads(setup.threads)
        if wanted is not None:
            torch.set_num_threads(wanted)
        threads = torch.get_num_threads()
    if renderer is None:
        return setup.default(), None, threads
    if hasattr(renderer, "render_batch"):
        return renderer, None, threads  # type: ignore[return-value]
    return renderer(setup), None, threads  # type: ignore[operator]


def load_source(
    source: str | Path | Mapping[str, Any], allow_outside: bool, base_dir: Path | None, name: str
) -> Scene:
    """A validated scene from a path, YAML text or a dict."""
    if isinstance(source, Mapping):
        text = yaml.safe_dump(dict(source), sort_keys=False, allow_unicode=True)
        shown = f"<dict {name}>"
    elif isinstance(source, Path) or ("\n" not in source and source.strip().endswith((".yaml", ".yml"))):
        return load_scene(source, allow_outside_inputs=allow_outside)
    else:
        text, shown = source, f"<string {name}>"
    base = (base_dir or Path.cwd()).resolve() / f"{name}.yaml"
    return parse_scene(text, shown, base_path=base, allow_outside_inputs=allow_outside)


def file_memo(cache: CacheDir | None) -> dict[str, Any]:
    """File-hash memo (stat -> sha256) kept in the cache, so big checkpoints are hashed once."""
    if cache is None:
        return {}
    return dict(cache.records.get_json(FILE_DIGESTS) or {})


def open_cache(cache_dir: Path, *, writable: bool) -> CacheDir | None:
    """The cache, created if ``writable``; read-only (None if there is none yet) otherwise."""
    # A cache that may not be written (read-only mount) opens read-only: --plan and fully cached
    # renders work; a full disk is a failure (exit 1), anything else bad input; hints never advise
    # clearing an intact store.
    try:
        return CacheDir.open(cache_dir) if writable else CacheDir.open_readonly(cache_dir)
    except CacheUnavailable as exc:
        if exc.kind == "full":
            raise RenderError(f"--cache-dir: {exc}\n{exc.hint()}") from None
        raise InputError([f"--cache-dir: {exc}", exc.hint()]) from None


def check_shown_frames(total: int, frames: Sequence[int] | None) -> list[int]:
    """The frames a preview shows (every frame by default), checked: InputError if one is beyond the end."""
    if frames is None:
        return list(range(total))
    problems, shown = [], []
    for frame in frames:
        try:
            shown.append(check_frame(int(frame), total))
        except ValueError as exc:
            problems.append(OptionProblem("--frame", str(exc)))
    if problems or not shown:
        raise InputError(problems or [OptionProblem("--frame", "no frame given")])
    return list(dict.fromkeys(shown))


def checked_preview_paths(
    scene: Scene, out_dir: Path, shown: list[int], draft: bool, targets: Sequence[Target]
) -> PreviewPaths:
    """Where a preview of ``shown`` goes (``pipeline.outputs.preview``); InputError if that would
    write into one of the final outputs."""
    paths = preview_paths(scene, out_dir, shown, scene if draft else None)
    final = clash(paths, [t.path for t in targets])
    if final is not None:
        raise InputError(
            [OptionProblem("preview", f"{paths.sheet.parent} would write into the output {final}; use --out")]
        )
    return paths
