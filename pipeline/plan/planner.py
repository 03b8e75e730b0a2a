"""The planner: a validated scene becomes one job per frame, each with the recipe of its pixels and its key.

Pure and fast: no torch, no model, no disk (the facts from outside the scene arrive in a
:class:`~pipeline.render.environment.RenderEnv`)::

    jobs = plan(scene, env)
    jobs[10].key, jobs[10].recipe["cond"]     # {"a": [[emb_key, 1.0]], "b": [[emb_key, 1.0]], "t": 0.17}

How values change over time. Each keyframed value (prompt, negative prompt, seed, each scalar,
each LoRA scale, mode and its inputs) has its own track made of the keyframes that set it; the
scene's top-level value is that track's value at frame 0 unless a keyframe at frame 0 sets it. A
value the scene never writes at the top level has no value at frame 0 (its built-in default counts
only when no keyframe sets it). Between two keyframes of a track, the value is eased with the curve
of the later keyframe (or the scene's ``curve``); ``hold: true`` on the earlier one keeps its values
until the later one. Before a track's first keyframe its first value holds; after the last, the
last. Modes and input images never blend: they hold from the keyframe that sets them, and the
top-level value (txt2img, no image) holds before it. A blend of a value with itself is that value.

A frame's key is ``key_of`` the base recipe's key plus the frame's own recipe, which names only what
decides its pixels: prompt embeddings by their keys with their weights and the eased ``t``, the
noise as seeds and ``t``, the scalars its mode uses, the content hashes of its input images. A frame
exactly on a keyframe has ``t == 0`` and so depends on that keyframe alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from pipeline.audio.timeline import AudioCurve, curve_parser
from pipeline.gcpause import gc_paused
from pipeline.modes import MODES, mode_recipe
from pipeline.plan.curves import parse_curve
from pipeline.plan.keys import KeyTemplate, Slot, key_of, round_float
from pipeline.plan.prompts import (
    PARSER_VERSION,
    WEIGHTED_FAMILIES,
    load_tokenizer,
    may_be_long,
    may_need_parser,
)
from pipeline.render.environment import RenderEnv
from pipeline.render.models import T5_COMPONENTS, TEXT_COMPONENTS
from pipeline.scene.core import Scene
from pipeline.scene.schema import HELD, SCALARS, PromptPart

# Bump when a change to the renderer changes pixels for the same recipe: every frame re-renders.
RENDERER_VERSION = 1
EMBEDDING_VERSION = 1
# The libraries whose code makes an embedding's bytes: torch (the numerics), transformers (the text
# encoders), tokenizers (the token ids) and diffusers (its ``encode_prompt`` picks the layer, pads,
# truncates and loads textual inversions). An upgrade of any of them must not reuse old embeddings.
EMBEDDING_LIBRARIES: tuple[str, ...] = ("diffusers", "tokenizers", "torch", "transformers")


@dataclass(slots=True)
class FrameJob:
    """One frame to render: its index, its key, and the per-frame recipe its pixels depend on."""

    frame: int
    key: str
    recipe: dict[str, Any]

    def batch_group(self, steps: int, family: str) -> str:
        """Frames of one group go through one pipeline call together, each keeping its own pixels.

        A call shares: the mode and its input images, the LoRA scales, whether classifier-free
        guidance runs (guidance above 1; the renderer applies each frame's own scale), and, where the
        mode has a strength, the denoising steps that strength leaves (``steps`` of the scene's
        ``family``, counted as diffusers counts them) and whether it is the full 1.0 (an inpaint
        starts from pure noise then). Prompts, negative prompts, noise, guidance and feedback motion
        are per frame.
        """
        r = self.recipe
        scalars = r["scalars"]
        mode = {k: v for k, v in r["mode"].items() if k != "prev"}
        # A feedback chain that starts with nothing to feed back renders as txt2img: its own group.
        mode["starts_chain"] = r["mode"].get("prev") is None
        group: dict[str, Any] = {"mode": mode, "cfg": "neg" in r, "lora": scalars.get("lora")}
        if "strength" in scalars:
            strength = float(scalars["strength"])
            group["denoised"] = denoised_steps(steps, strength, family)
            group["full"] = strength == 1.0
        return key_of(group)


def denoised_steps(steps: int, strength: float, family: str) -> int:
    """The steps an image-to-image call runs at ``strength``: the last ones of the schedule.

    As diffusers 0.42's ``get_timesteps`` counts them: SD 1.x/2.x and SDXL truncate ``steps *
    strength``; SD3 truncates the steps it skips instead. Frames with equal counts run the same
    timesteps from the same starting noise level (``tests/test_batch_values.py`` checks this against
    each family's pipeline).
    """
    if family == "sd3":
        return steps - int(max(steps - min(steps * strength, steps), 0))
    return steps - max(steps - min(int(steps * strength), steps), 0)


@dataclass
class Plan(Sequence[FrameJob]):
    """The jobs of a scene (a sequence of :class:`FrameJob`) and what they share."""

    jobs: list[FrameJob]
    base: dict[str, Any]
    base_key: str
    # embedding key -> {"text": ..., plus the recipe the key was made from}
    embeddings: dict[str, dict[str, Any]] = field(default_factory=dict)
    # scene-relative input path -> content hash (mode recipes name inputs by hash)
    files: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: Any) -> Any:
        return self.jobs[i]

    def __iter__(self) -> Iterator[FrameJob]:
        return iter(self.jobs)

    def text(self, emb_key: str) -> str:
        return str(self.embeddings[emb_key]["text"])


class _Track:
    """One keyframed value: frames ascending, values, the curve into each, and holds."""

    __slots__ = ("curves", "frames", "holds", "values")

    def __init__(self) -> None:
        self.frames: list[int] = []
        self.values: list[Any] = []
        self.curves: list[Callable[[float], float]] = []
        self.holds: list[bool] = []

    def add(self, frame: int, value: Any, curve: Callable[[float], float], hold: bool) -> None:
        self.frames.append(frame)
        self.values.append(value)
        self.curves.append(curve)
        self.holds.append(hold)

    @property
    def schedule(self) -> tuple[Any, ...]:
        """What decides :meth:`column`: tracks keyed at the same frames, with the same curves, share it."""
        return (tuple(self.frames), tuple(self.curves), tuple(self.holds))

    def column(self, total: int) -> tuple[list[tuple[int, int]], list[float]]:
        """For every frame: the indices (a, b) of the values it lies between, and the eased t.

        ``a == b`` (with t 0.0) where the frame takes one value whole: before the first keyframe,
        on a keyframe, after the last, through a hold, and where t rounds to 0 or 1 (so a frame
        whose eased t equals a keyframe's at key precision depends on that keyframe alone).
        Built a segment at a time, not a frame at a time: this runs for 100,000-frame scenes.
        """
        frames, last = self.frames, len(self.frames) - 1
        if last == 0:
            return [(0, 0)] * total, [0.0] * total  # one value: most tracks (a scalar never keyframed)
        pairs = [(0, 0)] * min(frames[0], total)
        ts = [0.0] * len(pairs)
        for i, start in enumerate(frames):
            if start >= total:
                break
            end = min(frames[i + 1] if i < last else total, total)
            here = (i, i)
            if end - start == 1:  # the next keyframe is the next frame (a scene keyed at every frame)
                pairs.append(here)
                ts.append(0.0)
                continue
            if i == last or self.holds[i]:
                pairs += [here] * (end - start)
                ts += [0.0] * (end - start)
                continue
            curve, span = self.curves[i + 1], frames[i + 1] - start
            if isinstance(curve, AudioCurve):  # curve: audio depends on the span, not on u alone
                curve = curve.between(start, frames[i + 1])
            there, between = (i + 1, i + 1), (i, i + 1)
            eased = [round_float(curve((n - start) / span)) for n in range(start + 1, end)]
            pairs.append(here)
            pairs += [here if t == 0.0 else there if t == 1.0 else between for t in eased]
            ts.append(0.0)
            ts += [0.0 if t == 1.0 else t for t in eased]
        return pairs, ts


def _tracks(scene: Scene) -> dict[str, _Track]:
    """Build every track from the keyframes and the scene's top-level values."""
    parse = curve_parser(scene, parse_curve)  # parse_curve, and `audio` from the scene's soundtrack
    default_curve = parse(scene.curve)
    frames, keyframes = scene.keyframe_frames, scene.keyframes
    at_0 = bool(frames) and frames[0] == 0  # keyframes are in order: only the first can be at 0
    hold_at_0 = at_0 and keyframes[0].hold
    # Per keyframe once, not per track, and every field read in one call per keyframe (a scene
    # exported with a keyframe at every frame has 100,000 of them).
    curves = [parse(kf.curve) if kf.curve else default_curve for kf in keyframes]
    holds = [kf.hold for kf in keyframes]
    fields = ("prompt", "negative_prompt", "seed", "lora", *SCALARS, *HELD)
    by_field: dict[str, Sequence[Any]] = (
        dict(zip(fields, zip(*map(attrgetter(*fields), keyframes), strict=True), strict=True))
        if keyframes
        else {}
    )
    tracks: dict[str, _Track] = {}

    def track(
        name: str,
        top: Any,
        column: Sequence[Any],
        *,
        has_top: bool = True,
        written: bool = True,
        held: bool = False,
    ) -> None:
        """``column``: the value each keyframe sets (None where it sets none). ``written``: whether the
        scene sets ``top`` itself; a built-in default only counts where no keyframe sets the value."""
        t = _Track()
        found = [(i, v) for i, v in enumerate(column) if v is not None]
        # A top-level value is the value at frame 0. A value never written at the top level has no
        # value at frame 0: its first keyframe's value holds before it (as in Deforum and Parseq),
        # rather than a ramp from the built-in default into it.
        if has_top and (written or not found) and not (at_0 and column[0] is not None):
            t.add(0, top, default_curve, held or hold_at_0)
        t.frames += [frames[i] for i, _ in found]
        t.values += [v for _, v in found]
        t.curves += [curves[i] for i, _ in found]
        t.holds += [True] * len(found) if held else [holds[i] for i, _ in found]
        tracks[name] = t

    def field(name: str) -> Sequence[Any]:
        return by_field.get(name, ())  # no keyframes (a walk or a grid): every column is empty

    written = scene.model_fields_set
    track("prompt", None, field("prompt"), has_top=False)
    track(
        "negative_prompt",
        scene.negative_prompt,
        field("negative_prompt"),
        written="negative_prompt" in written,
    )
    seed_written = "seed" in written or scene.noise.seed is not None
    track(
        "seed",
        scene.noise.seed if scene.noise.seed is not None else scene.seed,
        field("seed"),
        written=seed_written,
    )
    for name in SCALARS:
        track(name, getattr(scene, name), field(name), written=name in written)
    for lora in scene.loras:
        name = scene.lora_name(lora)
        scales = [(scales or {}).get(name) for scales in field("lora")]
        track(f"lora:{name}", lora.scale, scales, written="scale" in lora.model_fields_set)
    # Modes and input images never blend: the top-level value (txt2img, no image) holds until the
    # keyframe that sets another, written or not.
    for name in HELD:
        track(name, getattr(scene, name), field(name), held=True)
    return tracks


def _base(scene: Scene, env: RenderEnv) -> dict[str, Any]:
    """What every frame of the scene shares (model, sampler, size, learned weights...)."""
    from pipeline.schedulers import SCHEDULERS  # plain data, no torch

    # The scheduler as it will be built (class and config), not as it is spelled: `scheduler: pndm`
    # on a model whose own scheduler already is that PNDM is the same sampler, and the same frames.
    config = {k: v for k, v in env.scheduler_config.items() if not k.startswith("_")}
    scheduler: dict[str, Any] = {"class": env.scheduler_config.get("_class_name"), "config": config}
    if scene.scheduler:
        class_name, overrides = SCHEDULERS[scene.scheduler]
        scheduler = {"class": class_name, "config": {**config, **overrides}}
    return {
        "kind": "frame",
        "v": RENDERER_VERSION,
        "model": env.fingerprint,
        "pipeline": env.pipeline_class,
        "family": env.family,
        "scheduler": scheduler,
        "steps": scene.steps,
        "size": [scene.width, scene.height],
        "device": env.device,
        "dtype": env.dtype,
        "libraries": env.libraries,
        "clip_skip": scene.clip_skip,
        "t5": scene.t5 if env.family == "sd3" else False,
        "learned": [[e.token or "", env.files[e.path]] for e in scene.embeddings],
        "loras": [[scene.lora_name(lo), env.files[lo.path]] for lo in scene.loras],
    }


class _Embeddings:
    """Makes (and remembers) the key of each prompt text's embedding."""

    def __init__(self, scene: Scene, env: RenderEnv):
        components = TEXT_COMPONENTS.get(env.family, TEXT_COMPONENTS["sd"])
        if env.family == "sd3" and scene.t5:
            components = components + T5_COMPONENTS
        self.common = {
            "kind": "embedding",
            "v": EMBEDDING_VERSION,
            "family": env.family,
            "encoders": {c: env.fingerprint.get(c, "") for c in components},
            "clip_skip": scene.clip_skip,
            "t5": bool(scene.t5 and env.family == "sd3"),
            "learned": [[e.token or "", env.files[e.path]] for e in scene.embeddings],
            "device": env.device,
            "dtype": env.dtype,
            "libraries": {k: v for k, v in env.libraries.items() if k in EMBEDDING_LIBRARIES},
        }
        # Texts that may encode otherwise than diffusers' plain encode_prompt (weighting
        # syntax, or longer than one CLIP window) name the prompt format and parser in their key; the
        # keys of the other texts stay as they were before weighting and long prompts existed.
        self.prompts = (
            {"format": scene.prompt_format, "long": scene.long_prompts, "parser": PARSER_VERSION}
            if env.family in WEIGHTED_FAMILIES
            else None
        )
        self.learned = [e.token or "" for e in scene.embeddings]
        self._tokenizer_folder = env.tokenizer
        self.by_text: dict[str, str] = {}
        self.table: dict[str, dict[str, Any]] = {}
        self.blends: dict[tuple[tuple[str, float], ...], list[list[Any]]] = {}

    def key(self, text: str) -> str:
        found = self.by_text.get(text)
        if found is None:
            recipe = {**self.common, "text": text}
            if self.prompts and self._may_need_parser(text):
                recipe["prompts"] = self.prompts
            found = key_of(recipe)
            self.by_text[text] = found
            self.table[found] = recipe
        return found

    def _may_need_parser(self, text: str) -> bool:
        # The tokenizer is read only for a text that may be long (most scenes never read it).
        tokenizer = load_tokenizer(self._tokenizer_folder) if may_be_long(text) else None
        return may_need_parser(text, str(self.prompts["format"]), self.learned, tokenizer)  # type: ignore[index]

    def blend(self, parts: list[PromptPart]) -> list[list[Any]]:
        """A prompt as [[embedding key, weight], ...]; equal prompts give the same (shared) list."""
        sig = tuple((p.text, p.weight) for p in parts)
        found = self.blends.get(sig)
        if found is None:
            total = sum(p.weight for p in parts)
            found = self.blends[sig] = [[self.key(p.text), round_float(p.weight / total)] for p in parts]
        return found


class _Frames:
    """Every frame's recipe, made from columns: the planner's inner loop, kept cheap.

    A frame's recipe is decided by its *state* (which prompts it lies between, whether it takes a
    keyframe's values whole, whether the negative prompt counts, the held mode and inputs: small ints
    and bools shared by long runs of frames) and its *values* (eased t, seeds, scalars, offsets: the
    numbers that change from frame to frame). Both are computed a column at a time over the whole
    scene, and :meth:`recipe` puts one frame's together. :meth:`recipe` only places values, it never
    computes with them: called with :class:`~pipeline.plan.keys.Slot` s in place of the values it gives
    the skeleton of a :class:`~pipeline.plan.keys.KeyTemplate` that every frame of that state shares, so
    one function decides both a frame's recipe and its key.
    """

    def __init__(self, scene: Scene, env: RenderEnv, emb: _Embeddings) -> None:
        self.total = total = scene.total_frames
        tracks = _tracks(scene)
        self.states: list[list[Any]] = []
        self.values: list[list[Any]] = []
        self._schedules: dict[tuple[Any, ...], tuple[list[tuple[int, int]], list[float]]] = {}
        method = scene.interpolation

        # 1. Conditioning: which embeddings, mixed how. Each keyframe's prompt becomes
        #    [[embedding key, weight], ...] once, not once per frame.
        prompts = [emb.blend(parts) for parts in tracks["prompt"].values]
        negatives = [emb.blend([PromptPart(text=text)]) for text in tracks["negative_prompt"].values]
        walk, grid = scene.walk, scene.grid
        if walk is not None:
            a = [[emb.key(walk.prompt), 1.0]]
            direction: Any = "ones" if walk.direction == "ones" else {"random": walk.direction_seed}
            i = self._value([round_float(n * walk.step_size) for n in range(total)])
            self._cond = lambda s, v: {"a": a, "walk": {"offset": v[i], "direction": direction}}
        elif grid is not None:
            corners = [emb.key(p) for p in grid.prompts]
            cols, rows = grid.cols, grid.rows
            iu = self._value(
                [round_float((n % cols) / (cols - 1)) if cols > 1 else 0.0 for n in range(total)]
            )
            iv = self._value(
                [round_float((n // cols) / (rows - 1)) if rows > 1 else 0.0 for n in range(total)]
            )
            # grid method 'rows' (the Keras example) slerps the whole top row into the whole bottom
            # row: a middle row's cells depend on every column, so their key names the row width.
            # The first and last rows are the rows themselves, and with lerp there is no angle: there
            # both methods give the same cells, and the same keys.
            whole_rows = self._state(
                [
                    grid.method == "rows" and method == "slerp" and 0 < n // cols < rows - 1
                    for n in range(total)
                ]
            )

            def grid_cond(s: Any, v: Any) -> dict[str, Any]:
                cond = {"grid": corners, "u": v[iu], "v": v[iv], "method": method}
                if s[whole_rows]:
                    cond["whole_rows"] = cols
                return cond

            self._cond = grid_cond
        else:
            self._cond = self._blend(tracks["prompt"], prompts, method)
        self._neg = self._blend(tracks["negative_prompt"], negatives, method)
        self._noise = self._noise_of(scene, tracks)

        # 2. The held mode and its inputs. Most scenes have one mode throughout; a scene that changes
        #    it gets a state column naming the combination of held values each frame has.
        files = env.files
        moving = [name for name in HELD if len(tracks[name].values) > 1]
        combos = (
            zip(*[[a for a, _ in self._schedule(tracks[name])[0]] for name in moving], strict=True)
            if moving
            else [()]
        )
        self._held: dict[tuple[int, ...], tuple[str, dict[str, Any]]] = {}
        column = [self._held_mode(combo, tracks, files) for combo in combos]
        self._h = self._state(column) if moving else None
        self.feedback = any(MODES[name].chains for name, _ in self._held.values())

        # 3. Scalars: those of every mode the scene uses, each a value column; each mode picks its own.
        modes = {name for name, _ in self._held.values()}
        # Scalars that matter only in some modes (MODES[m].scalars): a txt2img frame's key must not
        # change with strength.
        used = [name for name in SCALARS if any(name in MODES[m].scalars for m in modes)]
        index = {name: self._value(self._scalar_column(tracks[name])) for name in used}
        self._scalars = {m: [(name, index[name]) for name in MODES[m].scalars] for m in modes}
        self._loras = [
            (name, self._value(self._scalar_column(tracks[f"lora:{name}"])))
            for name in (scene.lora_name(lo) for lo in scene.loras)
        ]
        # Without guidance (<= 1) diffusers never runs the negative branch: it cannot change pixels.
        self._has_neg = self._state([g > 1.0 for g in self.values[index["guidance"]]])

    def _state(self, column: list[Any]) -> int:
        self.states.append(column)
        return len(self.states) - 1

    def _value(self, column: list[Any]) -> int:
        self.values.append(column)
        return len(self.values) - 1

    def _schedule(self, track: _Track) -> tuple[list[tuple[int, int]], list[float]]:
        """The track's (a, b) and t columns; tracks keyed alike (prompt, seed, guidance...) share one."""
        schedule = track.schedule  # three tuples as long as the track: build them once
        found = self._schedules.get(schedule)
        if found is None:
            found = self._schedules[schedule] = track.column(self.total)
        return found

    def _scalar_column(self, track: _Track) -> list[float]:
        values = track.values
        rounded = [round_float(float(v)) for v in values]
        if len(values) == 1:
            return rounded * self.total
        pairs, ts = self._schedule(track)
        return [
            rounded[a] if a == b else round_float(values[a] + (values[b] - values[a]) * t)
            for (a, b), t in zip(pairs, ts, strict=True)
        ]

    def _blend(self, track: _Track, made: list[Any], method: str) -> Callable[[Any, Any], dict[str, Any]]:
        """Conditioning from a prompt track; ``made[i]`` is keyframe i's prompt as [[embedding key, weight], ...]."""
        pairs, ts = self._schedule(track)
        # Keyframes with equal blends (the same embeddings with the same normalised weights) share an
        # index, so frames between keyframes with the same prompts share a state, and a key template:
        # a scene keyed at every frame repeats a few prompts. And a blend from a prompt to itself is
        # that prompt whole (slerp and lerp of a tensor with itself give it back exactly): restating
        # the prompt in force at a later keyframe changes no frame.
        first: dict[tuple[tuple[str, float], ...], int] = {}
        same = [first.setdefault(tuple((k, w) for k, w in blend), i) for i, blend in enumerate(made)]
        state_of = {(a, b): (same[a], same[b], same[a] == same[b]) for a, b in set(pairs)}
        s, i = self._state([state_of[p] for p in pairs]), self._value(ts)

        def cond(state: Any, values: Any) -> dict[str, Any]:
            a, b, whole = state[s]
            if whole:
                return {"a": made[a]}
            return {"a": made[a], "b": made[b], "t": values[i], "method": method}

        return cond

    def _noise_of(self, scene: Scene, tracks: dict[str, _Track]) -> Callable[[Any, Any], dict[str, Any]]:
        """The noise recipe for the scene's noise kind (the kind is chosen once, not per frame)."""
        noise, total = scene.noise, self.total
        base_seed = noise.seed if noise.seed is not None else scene.seed
        if noise.kind == "fixed":
            return lambda s, v: {"seed": base_seed}
        if noise.kind == "per_frame":
            i = self._value([(base_seed + n) % 2**63 for n in range(total)])
            return lambda s, v: {"seed": v[i]}
        if noise.kind == "circle":
            assert noise.seeds is not None
            seeds = list(noise.seeds)
            # Without the endpoint the frame after the last is the first again: a seamless loop.
            steps = (total - 1) if noise.endpoint else total
            i = self._value([round_float(n / steps) if steps > 0 else 0.0 for n in range(total)])
            return lambda s, v: {"circle": seeds, "s": v[i]}
        track = tracks["seed"]
        pairs, ts = self._schedule(track)
        # The seeds are values, not state: frames between other keyframes still share a key template.
        seeds = track.values
        # A seed travelling to itself is that seed whole: its noise slerped with itself is itself.
        s = self._state([seeds[a] == seeds[b] for a, b in pairs])
        ia, ib = self._value([seeds[a] for a, _ in pairs]), self._value([seeds[b] for _, b in pairs])
        it = self._value(ts)

        def travel(state: Any, values: Any) -> dict[str, Any]:
            if state[s]:
                return {"seed": values[ia]}
            return {"seed": values[ia], "to": values[ib], "t": values[it]}

        return travel

    def _held_mode(
        self, combo: tuple[int, ...], tracks: dict[str, _Track], files: dict[str, str]
    ) -> tuple[int, ...]:
        """Remember the mode and mode recipe of one combination of held values (indices into their tracks)."""
        if combo not in self._held:
            held = {name: tracks[name].values[0] for name in HELD if len(tracks[name].values) == 1}
            moving = [name for name in HELD if name not in held]
            held.update((name, tracks[name].values[i]) for name, i in zip(moving, combo, strict=True))
            name = held["mode"]
            mode: dict[str, Any] = mode_recipe(name, held, files)
            self._held[combo] = (name, mode)
        return combo

    def rows(self) -> Iterator[tuple[int, tuple[Any, ...], tuple[Any, ...]]]:
        """(frame, state, values) for every frame (neither list of columns is ever empty: guidance is a
        value column and whether the negative prompt counts a state column, in every scene)."""
        return zip(
            range(self.total), zip(*self.states, strict=True), zip(*self.values, strict=True), strict=True
        )

    def slots(self) -> tuple[Slot, ...]:
        """A slot in place of every value (and of the previous frame's key, for feedback)."""
        slots = tuple(Slot(i) for i in range(len(self.values)))
        return (*slots, Slot(len(slots), text=True)) if self.feedback else slots

    def recipe(self, state: tuple[Any, ...], values: Sequence[Any]) -> dict[str, Any]:
        """The recipe of a frame in ``state`` with ``values`` (for feedback, both end with the previous frame's)."""
        name, mode = self._held[state[self._h] if self._h is not None else ()]
        scalars: dict[str, Any] = {n: values[i] for n, i in self._scalars[name]}
        if self._loras:
            scalars["lora"] = {n: values[i] for n, i in self._loras}
        if MODES[name].chains:
            # A feedback frame starts from the frame before it: its key carries that frame's key,
            # so an edit at frame k re-renders k and everything after, and nothing before.
            mode = {**mode, "prev": None if state[-1] else values[-1]}
        recipe = {
            "cond": self._cond(state, values),
            "noise": self._noise(state, values),
            "scalars": scalars,
            "mode": mode,
        }
        if state[self._has_neg]:
            recipe["neg"] = self._neg(state, values)
        return recipe


def plan(scene: Scene, env: RenderEnv | None = None) -> Plan:
    """Expand a validated scene into one :class:`FrameJob` per frame.

    Pure given ``env``. Without one, the environment is resolved first (which reads the model's
    files and the scene's inputs, but never imports torch), as ``render.py`` does.
    """
    if env is None:
        from pipeline.render.environment import resolve_env

        env = resolve_env(scene)
    # Planning allocates about ten objects per frame, none in a cycle.
    with gc_paused():
        return _plan(scene, env)


def _plan(scene: Scene, env: RenderEnv) -> Plan:
    base = _base(scene, env)
    base_key = key_of(base)
    emb = _Embeddings(scene, env)
    frames = _Frames(scene, env, emb)
    slots = frames.slots()
    # State -> the key template of its frames, or None for a state seen once so far: a template pays
    # for itself from its second frame (a scene with a new prompt at every frame has a new state at
    # every frame).
    templates: dict[tuple[Any, ...], KeyTemplate | None] = {}
    jobs: list[FrameJob] = []
    prev_key: str | None = None
    for n, state, values in frames.rows():
        if frames.feedback:
            state, values = (*state, prev_key is None), (*values, prev_key)
        recipe = frames.recipe(state, values)
        template = templates.get(state)
        if template is not None:
            key = template.key(values)
        else:
            # Every float in a recipe came through round_float, so the rounding pass can be skipped.
            key = key_of({"base": base_key, "frame": recipe}, normalised=True)
            if state in templates:
                template = templates[state] = KeyTemplate(
                    {"base": base_key, "frame": frames.recipe(state, slots)}
                )
                # The template's first key is checked against key_of: a wrong one would be a wrong frame.
                if template.key(values) != key:
                    raise AssertionError(f"frame {n}: the key template disagrees with key_of; a planner bug")
            else:
                templates[state] = None
        jobs.append(FrameJob(n, key, recipe))
        prev_key = key
    return Plan(jobs, base, base_key, emb.table, dict(env.files))
