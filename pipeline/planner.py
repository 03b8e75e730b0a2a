"""The planner: a validated scene becomes one job per frame, each with the recipe of its pixels and its key.

Pure and fast: no torch, no model, no disk (the facts from outside the scene arrive in a
:class:`~pipeline.environment.RenderEnv`)::

    jobs = plan(scene, env)
    jobs[10].key, jobs[10].recipe["cond"]     # {"a": [[emb_key, 1.0]], "b": [[emb_key, 1.0]], "t": 0.17}

How values change over time. Each keyframed value (prompt, negative prompt, seed, each scalar,
each LoRA scale, mode and its inputs) has its own track made of the keyframes that set it; the
scene's top-level value is that track's value at frame 0 unless a keyframe at frame 0 sets it.
Between two keyframes of a track, the value is eased with the curve of the later keyframe (or
the scene's ``curve``); ``hold: true`` on the earlier one keeps its values until the later one.
Before a track's first keyframe its first value holds; after the last, the last. Modes and input
images never blend: they hold from the keyframe that sets them.

A frame's key is ``key_of`` the base recipe's key plus the frame's own recipe, which names only what
decides its pixels: prompt embeddings by their keys with their weights and the eased ``t``, the
noise as seeds and ``t``, the scalars its mode uses, the content hashes of its input images. A frame
exactly on a keyframe has ``t == 0`` and so depends on that keyframe alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.curves import parse_curve
from pipeline.environment import RenderEnv
from pipeline.keys import key_of, round_float
from pipeline.models import T5_COMPONENTS, TEXT_COMPONENTS
from pipeline.scene import HELD, SCALARS, Keyframe, PromptPart, Scene

# Bump when a change to the renderer changes pixels for the same recipe: every frame re-renders.
RENDERER_VERSION = 1
EMBEDDING_VERSION = 1
# Scalars that matter only in some modes: a txt2img frame's key must not change with strength.
_MODE_SCALARS: dict[str, tuple[str, ...]] = {
    "txt2img": ("guidance",),
    "img2img": ("guidance", "strength"),
    "inpaint": ("guidance", "strength"),
    "depth2img": ("guidance", "strength"),
    "feedback": ("guidance", "strength", "zoom", "angle", "translate_x", "translate_y"),
}


@dataclass(slots=True)
class FrameJob:
    """One frame to render: its index, its key, and the per-frame recipe its pixels depend on."""

    frame: int
    key: str
    recipe: dict[str, Any]

    @property
    def batch_group(self) -> str:
        """Frames with equal settings can go through one pipeline call together."""
        r = self.recipe
        mode = {k: v for k, v in r["mode"].items() if k != "prev"}
        # A feedback chain that starts with nothing to feed back renders as txt2img: its own group.
        mode["starts_chain"] = r["mode"].get("prev") is None
        return key_of({"scalars": r["scalars"], "mode": mode})


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

    __slots__ = ("curves", "frames", "holds", "i", "values")

    def __init__(self) -> None:
        self.frames: list[int] = []
        self.values: list[Any] = []
        self.curves: list[Callable[[float], float]] = []
        self.holds: list[bool] = []
        self.i = -1  # index of the last keyframe at or before the current frame

    def add(self, frame: int, value: Any, curve: Callable[[float], float], hold: bool) -> None:
        self.frames.append(frame)
        self.values.append(value)
        self.curves.append(curve)
        self.holds.append(hold)

    def at(self, n: int) -> tuple[int, int, float]:
        """(index a, index b, eased t) at frame ``n``; frames must be asked in increasing order."""
        frames = self.frames
        last = len(frames) - 1
        if last == 0:
            return 0, 0, 0.0  # one value: most tracks (a scalar never keyframed)
        while self.i < last and frames[self.i + 1] <= n:
            self.i += 1
        i = self.i
        if i < 0:
            return 0, 0, 0.0
        if i == last or frames[i] == n or self.holds[i]:
            return i, i, 0.0
        u = (n - frames[i]) / (frames[i + 1] - frames[i])
        t = round_float(self.curves[i + 1](u))
        if t == 0.0:
            return i, i, 0.0
        if t == 1.0:
            return i + 1, i + 1, 0.0
        return i, i + 1, t


def _tracks(scene: Scene) -> dict[str, _Track]:
    """Build every track from the keyframes and the scene's top-level values."""
    default_curve = parse_curve(scene.curve)
    kfs: list[tuple[int, Keyframe]] = list(zip(scene.keyframe_frames, scene.keyframes, strict=True))
    hold_at_0 = bool(kfs and kfs[0][0] == 0 and kfs[0][1].hold)
    tracks: dict[str, _Track] = {}

    def track(
        name: str, top: Any, getter: Callable[[Keyframe], Any], *, has_top: bool = True, held: bool = False
    ) -> None:
        t = _Track()
        if has_top and not any(f == 0 and getter(kf) is not None for f, kf in kfs):
            t.add(0, top, default_curve, held or hold_at_0)
        for f, kf in kfs:
            value = getter(kf)
            if value is not None:
                t.add(f, value, parse_curve(kf.curve) if kf.curve else default_curve, held or kf.hold)
        tracks[name] = t

    track("prompt", None, lambda kf: kf.prompt, has_top=False)
    track("negative_prompt", scene.negative_prompt, lambda kf: kf.negative_prompt)
    track("seed", scene.noise.seed if scene.noise.seed is not None else scene.seed, lambda kf: kf.seed)
    for name in SCALARS:
        track(name, getattr(scene, name), lambda kf, name=name: getattr(kf, name))
    for lora in scene.loras:
        name = scene.lora_name(lora)
        track(f"lora:{name}", lora.scale, lambda kf, name=name: (kf.lora or {}).get(name))
    for name in HELD:
        track(name, getattr(scene, name), lambda kf, name=name: getattr(kf, name), held=True)
    return tracks


def _base(scene: Scene, env: RenderEnv) -> dict[str, Any]:
    """What every frame of the scene shares (model, sampler, size, learned weights...)."""
    from pipeline.schedulers import SCHEDULERS  # plain data, no torch

    config = {k: v for k, v in env.scheduler_config.items() if not k.startswith("_")}
    if scene.scheduler:
        class_name, overrides = SCHEDULERS[scene.scheduler]
        scheduler = {"name": scene.scheduler, "class": class_name, "config": {**config, **overrides}}
    else:
        scheduler = {"name": "default", "class": env.scheduler_config.get("_class_name"), "config": config}
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
            "libraries": {k: v for k, v in env.libraries.items() if k in ("torch", "transformers")},
        }
        self.by_text: dict[str, str] = {}
        self.table: dict[str, dict[str, Any]] = {}

    def key(self, text: str) -> str:
        found = self.by_text.get(text)
        if found is None:
            recipe = {**self.common, "text": text}
            found = key_of(recipe)
            self.by_text[text] = found
            self.table[found] = recipe
        return found

    def blend(self, parts: list[PromptPart]) -> list[list[Any]]:
        total = sum(p.weight for p in parts)
        return [[self.key(p.text), round_float(p.weight / total)] for p in parts]


def _cond(track: _Track, n: int, made: list[Any], method: str) -> dict[str, Any]:
    """Conditioning at frame n; ``made[i]`` is keyframe i's prompt as [[embedding key, weight], ...]."""
    a, b, t = track.at(n)
    if a == b:
        return {"a": made[a]}
    return {"a": made[a], "b": made[b], "t": t, "method": method}


def _scalar(track: _Track, n: int) -> float:
    a, b, t = track.at(n)
    va = track.values[a]
    if a == b:
        return round_float(float(va))
    return round_float(va + (track.values[b] - va) * t)


def _noise_function(scene: Scene, tracks: dict[str, _Track], total: int) -> Callable[[int], dict[str, Any]]:
    """The noise recipe of frame n, for the scene's noise kind (the kind is chosen once, not per frame)."""
    noise = scene.noise
    base_seed = noise.seed if noise.seed is not None else scene.seed
    if noise.kind == "fixed":
        return lambda n: {"seed": base_seed}
    if noise.kind == "per_frame":
        return lambda n: {"seed": (base_seed + n) % 2**63}
    if noise.kind == "circle":
        assert noise.seeds is not None
        seeds = list(noise.seeds)
        # Without the endpoint the frame after the last is the first again: a seamless loop.
        steps = (total - 1) if noise.endpoint else total
        return lambda n: {"circle": seeds, "s": round_float(n / steps) if steps > 0 else 0.0}
    track = tracks["seed"]

    def travel(n: int) -> dict[str, Any]:
        a, b, t = track.at(n)
        if a == b:
            return {"seed": track.values[a]}
        return {"seed": track.values[a], "to": track.values[b], "t": t}

    return travel


def plan(scene: Scene, env: RenderEnv | None = None) -> Plan:
    """Expand a validated scene into one :class:`FrameJob` per frame.

    Pure given ``env``. Without one, the environment is resolved first (which reads the model's
    files and the scene's inputs, but never imports torch), as ``render.py`` does.
    """
    if env is None:
        from pipeline.environment import resolve_env

        env = resolve_env(scene)
    base = _base(scene, env)
    base_key = key_of(base)
    emb = _Embeddings(scene, env)
    method = scene.interpolation
    total = scene.total_frames
    jobs: list[FrameJob] = []
    tracks = _tracks(scene)
    lora_names = [scene.lora_name(lo) for lo in scene.loras]
    files = env.files

    # Each keyframe's prompt becomes [[embedding key, weight], ...] once, not once per frame.
    prompts = [emb.blend(parts) for parts in tracks["prompt"].values]
    negatives = [[[emb.key(text), 1.0]] for text in tracks["negative_prompt"].values]

    walk = scene.walk
    grid = scene.grid
    if walk is not None:
        walk_key = emb.key(walk.prompt)
        direction: Any = "ones" if walk.direction == "ones" else {"random": walk.direction_seed}
    if grid is not None:
        corners = [emb.key(p) for p in grid.prompts]

    # Modes and inputs rarely change: look up only the tracks that do. (Locals, not lookups: this loop
    # runs once per frame, 100,000 times for a long scene.)
    held_fixed = {name: tracks[name].values[0] for name in HELD if len(tracks[name].values) == 1}
    held_moving = [(name, tracks[name]) for name in HELD if name not in held_fixed]
    prompt_track, negative_track = tracks["prompt"], tracks["negative_prompt"]
    scalar_tracks = {mode: [(name, tracks[name]) for name in names] for mode, names in _MODE_SCALARS.items()}
    lora_tracks = [(name, tracks[f"lora:{name}"]) for name in lora_names]
    noise_at = _noise_function(scene, tracks, total)
    prev_key: str | None = None
    for n in range(total):
        # 1. Conditioning: which embeddings, mixed how.
        if walk is not None:
            cond: dict[str, Any] = {
                "a": [[walk_key, 1.0]],
                "walk": {"offset": round_float(n * walk.step_size), "direction": direction},
            }
        elif grid is not None:
            r, c = divmod(n, grid.cols)
            u = round_float(c / (grid.cols - 1)) if grid.cols > 1 else 0.0
            v = round_float(r / (grid.rows - 1)) if grid.rows > 1 else 0.0
            cond = {"grid": corners, "u": u, "v": v, "method": method}
        else:
            cond = _cond(prompt_track, n, prompts, method)
        # 2. Scalars the frame's mode uses, and the mode's inputs.
        held = held_fixed
        if held_moving:
            held = dict(held_fixed)
            for name, track in held_moving:
                held[name] = track.values[track.at(n)[0]]
        mode_name = held["mode"]
        scalars: dict[str, Any] = {name: _scalar(track, n) for name, track in scalar_tracks[mode_name]}
        if lora_tracks:
            scalars["lora"] = {name: _scalar(track, n) for name, track in lora_tracks}
        mode: dict[str, Any] = {"mode": mode_name}
        if mode_name != "txt2img":
            if held["init_image"]:
                mode["init"] = files[held["init_image"]]
            if mode_name == "inpaint":
                mode["mask"] = files[held["mask"]]
            if mode_name == "depth2img":
                mode["depth"] = files[held["depth_map"]] if held["depth_map"] else "estimated"
            if mode_name == "feedback":
                # A feedback frame starts from the frame before it: its key carries that frame's key,
                # so an edit at frame k re-renders k and everything after, and nothing before.
                mode["prev"] = prev_key
        recipe: dict[str, Any] = {
            "cond": cond,
            "noise": noise_at(n),
            "scalars": scalars,
            "mode": mode,
        }
        # Without guidance (<= 1) diffusers never runs the negative branch: it cannot change pixels.
        if scalars["guidance"] > 1.0:
            recipe["neg"] = _cond(negative_track, n, negatives, method)
        # Every float in a recipe came through round_float, so the rounding pass can be skipped.
        key = key_of({"base": base_key, "frame": recipe}, normalised=True)
        jobs.append(FrameJob(n, key, recipe))
        prev_key = key
    return Plan(jobs, base, base_key, emb.table, dict(env.files))
