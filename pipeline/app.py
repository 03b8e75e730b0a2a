"""The application: one scene from its source to its outputs. The CLI, the tests and the benchmarks all
go through this API; nothing else strings the stages together.

::

    import pipeline

    session = pipeline.open("scenes/dog_cat.yaml")       # a path, YAML text, or a dict
    if session.problems:                                 # the located problems the CLI prints
        print(*session.problems, sep="\\n")
    plan = session.plan()                                # one FrameJob per frame, with its key
    [f.status for f in session.status()]                 # 'cached', 'not rendered yet', 'changed: ...'
    report = session.render(progress=print)             # renders what is missing, writes outputs
    images = session.frames()                            # the frames as PIL images

A frame travels: ``open`` validates the scene (``pipeline.scene.load``) and its outputs (``pipeline.outputs.targets``)
-> ``plan`` resolves the model and environment without torch (``pipeline.render.environment``) and expands the
scene into keyed jobs (``pipeline.plan.planner``) -> ``render`` renders the jobs not in the cache
(``pipeline.render.loop.Renders`` with ``pipeline.render.renderer``) and writes the outputs (``pipeline.outputs.assemble``).

Every input is checked before any model loads, and nothing is written until every input has passed.
A renderer can be injected (``session.render(renderer=...)``): an object with ``render_batch(jobs) ->
list[image]`` (PIL images, HxWx3 uint8 arrays, or PNG bytes), or a factory called with a
:class:`RenderSetup` that can also build the real one. The run encodes and stores the images in a
writer thread while the renderer draws the next batch.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline import _API
from pipeline.api_base import (
    BatchRenderer,
    FrameStatus,
    InputError,
    OptionProblem,
    ProgressFn,
    RendererArg,
    RenderError,
    RenderSetup,
    Report,
    check_shown_frames,
    checked_preview_paths,
    file_memo,
    load_source,
    make_renderer,
    open_cache,
    option_problems,
)
from pipeline.audio.store import analysis_cache
from pipeline.audio.store import remember_scene_analysis as remember_analysis
from pipeline.outputs.assemble import CachedFrames, readable_frames
from pipeline.outputs.page import page_paths, write_page
from pipeline.outputs.plot import scene_plot
from pipeline.outputs.preview import (
    Draft,
    PreviewPaths,
    draft_scene,
    finish_preview,
    live_sheet,
    needed_jobs,
    sub_plan,
)
from pipeline.outputs.targets import Target, check_outputs
from pipeline.paths import default_cache_dir
from pipeline.plan.history import frame_status, load_plan, save_plan
from pipeline.plan.planner import Plan, plan
from pipeline.render.environment import RenderEnv, resolve_env, torch_device
from pipeline.render.farm import FarmError
from pipeline.render.loop import Progress, run  # noqa: F401 - Progress is part of the API (_API)
from pipeline.render.modelfiles import ModelError, ModelRef, check_model_spec
from pipeline.render.models import resolve_model
from pipeline.scene.core import Scene
from pipeline.scene.modelrules import check_against_model
from pipeline.scene.problems import Problem, SceneError  # noqa: F401 - Problem is part of the API (_API)
from pipeline.store.claims import live_claims
from pipeline.store.records import FILE_DIGESTS


def open(  # shadows the builtin on purpose: `pipeline.open(scene)`
    source: str | Path | Mapping[str, Any],
    *,
    model: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    threads: int | None = None,
    workers: int | None = None,
    ray: str | None = None,
    worker_timeout: float | None = None,
    cache_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    allow_outside_inputs: bool = False,
    base_dir: str | Path | None = None,
    name: str = "scene",
    draft: Draft | None = None,
) -> Session:
    """Open a scene from a file path, YAML text, or a dict (the parsed form of a scene file).

    ``threads``: CPU threads for rendering on the CPU (None: the free physical cores, see
    ``pipeline.cpu``; 0: torch's default of one per core); per worker on a render farm.
    ``workers``: render on a Ray render farm (``pipeline.render.farm``) of that many workers, on a
    local Ray cluster started here, or on the cluster at ``ray`` (an address, as ``ray start --head``
    prints it; workers default to one per GPU there). ``worker_timeout``: seconds after which a batch
    that has not come back has its worker replaced.
    Text and dicts are placed in ``base_dir`` (default: the current folder) as if they were the file
    ``<name>.yaml`` there: their relative input paths and default outputs are read from there.
    Problems are collected, not raised: see :attr:`Session.problems`.
    ``draft``: the scene with fewer steps and a smaller size (``pipeline.outputs.preview.draft_scene``); a
    draft session renders previews only.
    """
    return Session(
        source,
        model=model,
        device=device,
        batch_size=batch_size,
        threads=threads,
        workers=workers,
        ray=ray,
        worker_timeout=worker_timeout,
        cache_dir=Path(cache_dir) if cache_dir is not None else None,
        out_dir=Path(out_dir) if out_dir is not None else None,
        allow_outside_inputs=allow_outside_inputs,
        base_dir=Path(base_dir) if base_dir is not None else None,
        name=name,
        draft=draft,
    )


class Session:
    """One scene with the options of a run. Cheap to open; each step does only what it needs."""

    def __init__(
        self,
        source: str | Path | Mapping[str, Any],
        *,
        model: str | None,
        device: str,
        batch_size: int | None,
        threads: int | None,
        cache_dir: Path | None,
        out_dir: Path | None,
        workers: int | None = None,
        ray: str | None = None,
        worker_timeout: float | None = None,
        allow_outside_inputs: bool,
        base_dir: Path | None,
        name: str,
        draft: Draft | None = None,
    ):
        self.model = model
        self.draft = draft
        self.device = device
        self.batch_size = batch_size
        self.threads = threads
        self.threads_used: int | None = None
        self.workers = workers
        self.ray = ray
        self.worker_timeout = worker_timeout
        self.farm: Any = None  # the render farm's renderer of the last render (its counts: sent, requeued)
        self.cache_dir = cache_dir or default_cache_dir()
        self.scene: Scene | None = None
        self.targets: list[Target] = []
        self._problems: list[Any] = option_problems(
            device, batch_size, threads, workers, ray, worker_timeout, self.cache_dir
        )
        self._resolved: tuple[ModelRef, RenderEnv] | None = None
        self._plan: Plan | None = None
        self._checked_model = False
        self._memo_changes: dict[str, Any] | None = None
        self._rendered = False
        try:
            with analysis_cache(self.cache_dir):  # the soundtrack's analysis, if any, is cached there
                self.scene = load_source(source, allow_outside_inputs, base_dir, name)
            if draft is not None:
                try:  # another scene, with its own keys: the overrides apply before anything is planned
                    self.scene = draft_scene(self.scene, draft)
                except ValueError as exc:
                    self._problems.append(str(exc))
            outputs_dir = (out_dir or self.scene.base_dir / "renders" / self.scene.name).resolve()
            self.out_dir = outputs_dir
            self.targets = check_outputs(self.scene, outputs_dir)
        except SceneError as exc:
            self._problems = list(exc.problems) + self._problems

    # 1. Problems: the scene's, the options', then the model's (read from disk, no torch).
    @property
    def problems(self) -> list[Any]:
        """Every problem found, each printable as the CLI prints it; [] when the scene can render."""
        cache_ok = not any(isinstance(p, OptionProblem) and p.option == "--cache-dir" for p in self._problems)
        if self.scene is not None and cache_ok and not self._checked_model:
            # The model's problems too, with the scene's outputs' and the options': all in one report.
            self._checked_model = True
            try:
                self._resolve()
            except InputError as exc:
                self._problems = self._problems + exc.problems
        return list(self._problems)

    def _require(self) -> Scene:
        if self.problems:
            raise InputError(self._problems)
        assert self.scene is not None
        return self.scene

    def _resolve(self) -> tuple[ModelRef, RenderEnv]:
        """The model and environment (fingerprints, input hashes, device), read-only on the cache."""
        if self._resolved is None:
            scene = self.scene
            assert scene is not None
            cache = open_cache(self.cache_dir, writable=False)
            try:
                memo = file_memo(cache)
                before = dict(memo)
                if self.model is not None:
                    # --model gets the checks and the words that the scene's model: gets.
                    problem = check_model_spec(self.model, Path.cwd())
                    if problem:
                        raise InputError([OptionProblem("--model", problem)])
                try:
                    # A model named on the command line is relative to the current folder, not the scene.
                    base = Path.cwd() if self.model else scene.base_dir
                    ref = resolve_model(
                        self.model or scene.model,
                        base,
                        revision=scene.revision,
                        memo=memo,
                        config=scene.config,  # the scene's, relative to the scene, like its vae:
                        vae=scene.vae,
                        scene_dir=scene.base_dir,
                    )
                    env = resolve_env(scene, device=self.device, ref=ref, memo=memo)  # memo: token counts too
                except ModelError as exc:
                    raise InputError([f"{scene.path}: {exc}"]) from None
                misfits = check_against_model(
                    scene,
                    pipeline_class=ref.pipeline_class,
                    family=ref.family,
                    components=ref.index,
                    model=self.model,  # messages name the model used, and that it came from --model
                    folder=ref.folder,  # tokens and embedding widths checked against the model's files
                )
                if misfits:
                    raise InputError(misfits)
            finally:
                if cache is not None:
                    cache.close()
            self._memo_changes = memo if memo != before else None
            self._resolved = (ref, env)
        return self._resolved

    # 2. Plan: pure, no torch, nothing written.
    def plan(self) -> Plan:
        """One job per frame with its key; computed once per session."""
        self._require()
        if self._plan is None:
            self._plan = plan(self._require(), self._resolve()[1])
        return self._plan

    @property
    def env(self) -> RenderEnv:
        self._require()
        return self._resolve()[1]

    def status(self) -> list[FrameStatus]:
        """Per frame: cached, or why not (compared with the plan of this scene's last render)."""
        p = self.plan()
        cache = open_cache(self.cache_dir, writable=False)
        try:
            cached = cache.frames.present([j.key for j in p]) if cache is not None else set()
            records = cache.records if cache is not None else None
            previous = load_plan(records, self._require().path)
            claimed = live_claims(records)  # frames another render is working on now
        finally:
            if cache is not None:
                cache.close()
        return [
            FrameStatus(j.frame, j.key, s == "cached", s)
            for j, s in zip(p, frame_status(p, previous, cached, claimed), strict=True)
        ]

    def plot(self, path: str | Path) -> list[str]:
        """Write the plot of every keyframed value over the frames (PNG or SVG by suffix) without
        loading a model or importing torch; returns the names of the values that change."""
        self._require()
        return scene_plot(self, Path(path))

    # 3. Render: the cache may be created and written from here on.
    def render(
        self,
        *,
        progress: ProgressFn | None = None,
        renderer: RendererArg = None,
        quiet: bool = True,
        on_start: Callable[[RenderSetup], None] | None = None,
        command: str | None = None,
        overwrite: bool = False,
        frames: Sequence[int] | None = None,
    ) -> Report:
        """Render the frames that are not cached, store each as it finishes, write changed outputs.

        ``quiet=False`` shows a progress bar on stderr. ``on_start`` is called once everything is
        checked and before the first frame renders (the CLI prints its notes there). ``command`` is
        written into the record beside the outputs; outputs this run replaces are kept in
        ``previous/`` there unless ``overwrite``. Raises
        :class:`InputError` (nothing written), :class:`RenderError` (finished frames kept) or
        ``KeyboardInterrupt`` (Ctrl-C: finished frames kept; call again to resume).

        ``frames`` (frame numbers), or a draft session, renders a preview instead
        (``pipeline.outputs.preview``): those frames (all of a draft's by default), with the earlier frames of
        their feedback chains, into ``preview/`` only; no final output, record or plan history.
        """
        scene = self._require()
        shown: list[int] | None = None
        if frames is not None or self.draft is not None:
            shown = self.shown_frames(frames)
            paths = self._preview_paths(shown)  # checked before anything is written
        if self._rendered:
            # A session used again (a notebook) reads its model and inputs afresh: files edited since
            # the last render are planned with their new content, not stopped as changed mid-run.
            self._resolved = self._plan = None
        self._rendered = True
        self.farm = None
        ref, env = self._resolve()
        p = self.plan()
        cache = open_cache(self.cache_dir, writable=True)
        assert cache is not None
        try:
            cached = readable_frames(cache, p)
            if self._memo_changes is not None:
                cache.records.put_json(FILE_DIGESTS, self._memo_changes)
            remember_analysis(cache, scene)  # made before the cache existed (a first render)
            if self.device == "auto" and any(j.key not in cached for j in p):
                # Rendering imports torch anyway: let it confirm the device guessed without it.
                actual = torch_device()
                if actual != env.device:
                    env = resolve_env(scene, device=actual, ref=ref)
                    p = self._plan = plan(scene, env)
                    self._resolved = (ref, env)
                    cached = readable_frames(cache, p)
            todo, targets = p, self.targets
            if shown is not None:
                todo, targets = sub_plan(p, needed_jobs(p, shown)), []  # a plain list: no record either
            if cache.readonly and any(j.key not in cached for j in todo):
                # Stop before the model loads: nothing rendered could be stored.
                missing = sum(1 for j in todo if j.key not in cached)
                raise RenderError(
                    f"the cache in {cache.path} is read-only ({cache.readonly_reason}); {missing} frames "
                    "are not cached and cannot be stored: render into a cache you can write (--cache-dir)"
                )
            setup = RenderSetup(scene, env, ref, p, cache, self.threads)
            if on_start is not None:
                on_start(setup)
            previous = load_plan(cache.records, scene.path)
            if shown is None and (
                previous is None
                or previous.get("keys") != [j.key for j in p]
                or previous.get("base") != p.base
            ):
                save_plan(cache.records, scene.path, p)  # what --plan compares against to say why
            started = time.perf_counter()
            sheet = None
            if shown is not None:
                sheet, progress = live_sheet(paths, p, shown, (scene.width, scene.height), cache, progress)
            try:
                result = run(
                    scene,
                    env,
                    ref,
                    todo,
                    cache,
                    cached,
                    targets,
                    batch_size=self.batch_size,
                    quiet=quiet,
                    make_renderer=lambda: self._make_renderer(renderer, setup),
                    progress=progress,
                    command=command,
                    overwrite=overwrite,
                    model=self.model,
                )
            except ModelError as exc:
                raise InputError([f"{scene.path}: {exc}"]) from None
            except FarmError as exc:
                raise RenderError(str(exc)) from exc
            except (OSError, sqlite3.Error) as exc:
                # Disk full, permissions: every finished frame is in the cache and old outputs are intact.
                raise RenderError(str(exc)) from exc
            if sheet is not None:
                assert shown is not None
                finish_preview(result, scene, p, shown, paths, len(todo), cache, sheet)
            elif result["record"] or not page_paths(self.out_dir)[0].exists():
                # The page follows the record: written with it, or when it is missing.
                try:
                    written = write_page(
                        self.out_dir,
                        scene,
                        p,
                        cache,
                        targets,
                        rendered={j.key for j in p if j.key not in cached},
                        model=self.model,
                        keep_into=Path(result["previous"]) if result["previous"] else None,
                    )
                except OSError as exc:
                    raise RenderError(str(exc)) from exc
                result["page"] = str(written[-1])
        finally:
            if self.farm is not None:
                self.farm.close()
            cache.close()
        known = set(Report.__dataclass_fields__)
        report = Report(**{k: v for k, v in result.items() if k in known})
        report.seconds = round(time.perf_counter() - started, 3)
        report.threads = self.threads_used
        report.workers = self.farm.workers if self.farm is not None else None
        report.shown = shown
        return report

    def shown_frames(self, frames: Sequence[int] | None) -> list[int]:
        """The frames a preview shows (every frame by default), checked: InputError if one is beyond the end."""
        return check_shown_frames(self._require().total_frames, frames)

    def _preview_paths(self, shown: list[int]) -> PreviewPaths:
        scene = self._require()
        return checked_preview_paths(scene, self.out_dir, shown, self.draft is not None, self.targets)

    def _make_renderer(self, renderer: RendererArg, setup: RenderSetup) -> BatchRenderer:
        """The batch renderer, built when the first frame must render (torch is imported from here)."""
        made, self.farm, self.threads_used = make_renderer(
            renderer, setup, self.workers, self.ray, self.worker_timeout
        )
        return made

    # 4. Frames back as pictures.
    def frames(self) -> list[Any]:
        """Every frame of the plan as a PIL image, from the cache. Raises if one is not rendered yet."""
        p = self.plan()
        cache = open_cache(self.cache_dir, writable=False)
        if cache is None:
            raise RenderError(f"no cache in {self.cache_dir}: render the scene first")
        with cache:
            present = cache.frames.present([j.key for j in p])
            missing = [j.frame for j in p if j.key not in present]
            if missing:
                raise RenderError(f"{len(missing)} frames are not rendered yet (first: frame {missing[0]})")
            return list(CachedFrames(cache, [j.key for j in p]))


__all__ = list(_API)  # the names pipeline/__init__.py exports, listed once there
