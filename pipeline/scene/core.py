"""Scene files: the pydantic models of a scene, loading from YAML, and every validation rule.

A scene is a YAML mapping (see README "Scene format"). Loading is strict and reports every problem
at once as ``FILE:LINE:COL: what is wrong, and what is allowed``::

    scene = load_scene("scenes/dog_cat.yaml")     # raises SceneError listing every problem
    scene.total_frames, scene.keyframe_frames

Two passes: pydantic checks types and unknown keys; then the scene rules (keyframe order, ranges,
files, names) run on the typed scene. Nothing here imports torch or touches a model.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from decimal import ROUND_HALF_UP, Decimal
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

from pipeline.audio.model import Audio, audio_ref
from pipeline.audio.rules import check_audio, drive_values, take_drives
from pipeline.audio.timeline import AUDIO_CURVE
from pipeline.gcpause import gc_paused
from pipeline.plan import curves
from pipeline.scene.inputfiles import (
    embedding_problem,
    image_size,
    is_flat,
    lora_problem,
    path_kind,
    read_scene_bytes,
    read_weights_header,
)
from pipeline.scene.schedules import (
    EvalError,
    Point,
    ScheduleError,
    looks_like_schedule,
    parse_schedule,
    schedule_values,
)
from pipeline.scene.yamlerrors import DEFORUM_SCHEDULE, deforum_hint, deforum_name_hint
from pipeline.scene.yamlio import Problem, SceneError, YamlDoc, load_yaml_lenient, shorten
from pipeline.schedulers import scheduler_names

# The validation context of the loader: it runs the scene rules itself (see Scene._timeline).
_LOADING: dict[str, bool] = {"loading": True}
EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "embedded"
Mode = Literal["txt2img", "img2img", "inpaint", "depth2img", "feedback"]
# Scalars that a keyframe may set and that are interpolated with the keyframe's curve.
SCALARS: tuple[str, ...] = ("guidance", "strength", "zoom", "angle", "translate_x", "translate_y")
# Values that hold from the keyframe that sets them until the next one that does.
HELD: tuple[str, ...] = ("mode", "init_image", "mask", "depth_map")
IMAGE_FIELDS: tuple[str, ...] = ("init_image", "mask", "depth_map")
_SECONDS = re.compile(r"^(\d+(?:\.\d+)?)s$")
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MAX_FRAMES = 1_000_000
# Bounds that keep every keyframed value finite through interpolation: a value moves by at most
# (b - a) times a curve weight, and cubic_bezier weights stay within curves.MAX_BEZIER_Y, so values
# of at most a million never overflow to inf (which no cache key can hold). A feedback frame moves
# by a few pixels or degrees; a million is far beyond any use.
MAX_MOTION = 1e6
MAX_LORA_SCALE = 100.0
MAX_WALK_STEP = 100.0
# A GIF stores each frame's delay in 16 bits of centiseconds (at most 655 s a frame): Pillow raises
# an OverflowError below 0.0016 fps, after every frame has rendered. One frame in 100 s is plenty.
MIN_FPS = 0.01


class _Strict(BaseModel):
    # strict: YAML already typed every value; "5" is never silently a number and "yes" never a bool.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _text_to_parts(value: Any) -> Any:
    """``prompt: "a dog"`` is shorthand for a blend of one prompt with weight 1."""
    if isinstance(value, str):
        return [{"text": value, "weight": 1.0}]
    if not isinstance(value, list):
        raise PydanticCustomError(
            "prompt_type",
            "expected text, or a list of {text: ..., weight: ...}, got {got} (put quotes around it to make it text)",
            {"got": _describe(value)},
        )
    return value


def _frame_ref(value: Any) -> Any:
    """A keyframe's frame: a whole number, or seconds like '2.5s'; one clear message otherwise."""
    if (
        (isinstance(value, int) and not isinstance(value, bool))
        or (isinstance(value, str) and _SECONDS.match(value.strip()))
        or audio_ref(value) is not None
    ):
        return value
    raise PydanticCustomError(
        "frame_ref",
        "{got} is not a frame; write a whole number like 24 or seconds like 2.5s (or {ref} of the scene's audio)",
        {"got": _describe(value), "ref": "{beat: 8} or {onset: 3}"},
    )


def _duration(value: Any) -> Any:
    if value is None or _parse_duration(value) is not None:
        return value
    raise PydanticCustomError(
        "duration",
        "{got} is not a duration; write seconds greater than 0 like 10s or 10",
        {"got": _describe(value)},
    )


def _pair(what: str) -> Any:
    def check(value: Any) -> Any:
        if isinstance(value, list) and len(value) != 2:
            raise PydanticCustomError("pair", f"{what}, got {{n}} values", {"n": len(value)})
        return value

    return check


def _four_corners(value: Any) -> Any:
    if isinstance(value, list) and len(value) != 4:
        raise PydanticCustomError(
            "corners",
            "a grid needs exactly four corner prompts (top-left, top-right, bottom-left, bottom-right), got {n}",
            {"n": len(value)},
        )
    return value


def _text_to_mapping(field: str) -> Any:
    def convert(value: Any) -> Any:
        return {field: value} if isinstance(value, str) else value

    return convert


class PromptPart(_Strict):
    """One prompt of a weighted blend at a keyframe (only the ratios of the weights count)."""

    text: str
    weight: float = Field(default=1.0, gt=0)


Motion = Annotated[float, Field(ge=-MAX_MOTION, le=MAX_MOTION)]
LoraScale = Annotated[float, Field(ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE)]


Prompt = Annotated[list[PromptPart], BeforeValidator(_text_to_parts), Field(min_length=1)]


class Keyframe(_Strict):
    """Values set at one frame. Scalars are eased in with ``curve``; ``hold`` keeps them until the next one."""

    frame: Annotated[int | str | dict[str, int], BeforeValidator(_frame_ref)]
    prompt: Prompt | None = None
    prompt_prefix: str | None = None
    prompt_suffix: str | None = None
    negative_prompt: str | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    curve: str | None = None
    hold: bool = False
    guidance: float | None = Field(default=None, ge=0, le=100)
    strength: float | None = Field(default=None, ge=0, le=1)
    zoom: float | None = Field(default=None, gt=0, le=100)
    angle: Motion | None = None
    translate_x: Motion | None = None
    translate_y: Motion | None = None
    mode: Mode | None = None
    init_image: str | None = None
    mask: str | None = None
    depth_map: str | None = None
    lora: dict[str, LoraScale] | None = None


class Noise(_Strict):
    """Where each frame's initial latent comes from."""

    kind: Literal["fixed", "per_frame", "travel", "circle"] = "fixed"
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    seeds: list[Annotated[int, Field(ge=0, lt=2**63)]] | None = None
    endpoint: bool = False


class Walk(_Strict):
    """A walk around one prompt: a constant step added to its embeddings at every frame."""

    prompt: str
    frames: int = Field(ge=1, le=MAX_FRAMES)
    step_size: float = Field(default=0.01, ge=-MAX_WALK_STEP, le=MAX_WALK_STEP)
    direction: Literal["ones", "random"] = "ones"
    direction_seed: int = Field(default=0, ge=0, lt=2**63)


class Grid(_Strict):
    """A grid between four corner prompts (top-left, top-right, bottom-left, bottom-right).

    ``method: rows`` (the Keras example): the top and bottom rows are interpolated cell by cell, then
    slerped into each other as two whole rows, with one angle per row pair. ``cells``: every cell is
    slerped from its own top and bottom cells, each with its own angle.
    """

    prompts: Annotated[list[str], BeforeValidator(_four_corners)]
    rows: int = Field(default=8, ge=1, le=1000)
    cols: int = Field(default=8, ge=1, le=1000)
    method: Literal["rows", "cells"] = "rows"


class Output(_Strict):
    """One file the scene writes. The kind comes from the extension unless given."""

    path: str
    kind: Literal["mp4", "gif", "frames", "grid"] | None = None
    fps: float | None = Field(default=None, ge=MIN_FPS, le=240)
    rubber_band: bool = False
    loop: int = Field(default=0, ge=0, le=65535)  # a GIF stores its loop count in 16 bits
    cols: int | None = Field(default=None, ge=1, le=1000)


class LearnedEmbedding(_Strict):
    """A textual-inversion file and the token it adds to prompts."""

    path: str
    token: str | None = None


class Lora(_Strict):
    """LoRA weights; keyframes may set ``lora: {name: scale}``."""

    path: str
    name: str | None = None
    scale: LoraScale = 1.0


class Scene(_Strict):
    """A whole scene file. Top-level scalars are the values at frame 0 unless a keyframe there sets them."""

    model: str = "tiny"
    revision: str | None = None
    config: str | None = None  # a single-file model's configs: a diffusers folder, embedded name or hub id
    vae: str | None = None  # replaces the model's VAE: a diffusers VAE folder, a weights file or a hub id
    scheduler: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    size: Annotated[
        list[Annotated[int, Field(ge=8, le=8192)]], BeforeValidator(_pair("size is [width, height]"))
    ] = Field(default_factory=lambda: [512, 512])
    steps: int = Field(default=25, ge=1, le=1000)
    guidance: float = Field(default=7.5, ge=0, le=100)
    fps: float = Field(default=12.0, ge=MIN_FPS, le=240)
    frames: int | None = Field(default=None, ge=1, le=MAX_FRAMES)
    duration: Annotated[str | float | None, BeforeValidator(_duration)] = None
    seed: int = Field(default=0, ge=0, lt=2**63)
    negative_prompt: str = ""
    # Joined into every prompt when the scene loads (see ``join_prompt``), then cleared: the prompts
    # the planner keys are the joined texts.
    prompt_prefix: str | None = None
    prompt_suffix: str | None = None
    interpolation: Literal["slerp", "lerp"] = "slerp"
    curve: str = "linear"
    noise: Annotated[Noise, BeforeValidator(_text_to_mapping("kind"))] = Field(default_factory=Noise)
    clip_skip: int = Field(default=0, ge=0, le=11)
    # SD 1.x/2.x and SDXL: AUTOMATIC1111 weighting syntax, and prompts past 75 tokens chunked or cut (pipeline.plan.prompts).
    prompt_format: Literal["weighted", "plain"] = "weighted"
    long_prompts: Literal["chunk", "truncate"] = "chunk"
    t5: bool = False
    mode: Mode = "txt2img"
    init_image: str | None = None
    mask: str | None = None
    depth_map: str | None = None
    strength: float = Field(default=0.75, ge=0, le=1)
    zoom: float = Field(default=1.0, gt=0, le=100)
    angle: Motion = 0.0
    translate_x: Motion = 0.0
    translate_y: Motion = 0.0
    embeddings: list[LearnedEmbedding] = Field(default_factory=list)
    loras: list[Lora] = Field(default_factory=list)
    keyframes: list[Keyframe] = Field(default_factory=list)
    walk: Walk | None = None
    grid: Grid | None = None
    outputs: list[Annotated[Output, BeforeValidator(_text_to_mapping("path"))]] | None = None
    audio: Audio | None = None  # the soundtrack (pipeline.audio): muxed into MP4s, beats, driven values

    # Filled in by load_scene after the rules pass: where the file is and what its frame refs mean.
    _path: Path = PrivateAttr(default=Path("scene.yaml"))
    _keyframe_frames: list[int] = PrivateAttr(default_factory=list)
    _total_frames: int = PrivateAttr(default=0)
    _doc: YamlDoc | None = PrivateAttr(default=None)
    # Schedule strings taken out of the data before validation (value name -> schedule), and, once
    # they are keyframes, each keyframe's index in the file (None for a keyframe a schedule made).
    _schedules: dict[str, Any] = PrivateAttr(default_factory=dict)
    _written_index: list[int | None] | None = PrivateAttr(default=None)
    # The soundtrack on the frame axis (pipeline.audio.timeline), and the values it drives.
    _audio: Any = PrivateAttr(default=None)
    _audio_drives: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _timeline(self, info: ValidationInfo) -> Scene:
        """A scene built in code (``Scene.model_validate({...})``, ``Scene(...)``) gets its timeline
        and the scene rules here, as a loaded one does in ``load_scene`` (which skips this pass).
        Its relative paths are relative to the current folder."""
        if info.context is _LOADING:
            return self
        self._path = Path("scene.yaml").resolve()
        problems = _check_rules(self, YamlDoc("<Scene>", None), allow_outside_inputs=False)
        if problems:
            raise ValueError("; ".join(p.message for p in problems))
        _join_prompt_parts(self)
        return self

    @property
    def path(self) -> Path:
        return self._path

    @property
    def name(self) -> str:
        return self._path.stem

    @property
    def base_dir(self) -> Path:
        return self._path.parent

    @property
    def keyframe_frames(self) -> list[int]:
        return self._keyframe_frames

    @property
    def total_frames(self) -> int:
        return self._total_frames

    @property
    def written_keyframe_frames(self) -> list[int]:
        """The frames of the keyframes written in the file (not those a schedule string made)."""
        if self._written_index is None:
            return self._keyframe_frames
        return [f for f, i in zip(self._keyframe_frames, self._written_index, strict=True) if i is not None]

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]

    def resolve(self, relative: str) -> Path:
        """A path written in the scene, relative to the scene file's folder."""
        return (self.base_dir / relative).resolve()

    def problem(self, path: tuple[Any, ...], message: str) -> Problem:
        """A problem at the place in the scene file that ``path`` names (for rules checked after loading)."""
        doc = self._doc or YamlDoc(str(self.path), None)
        return doc.problem(path, message)

    def lora_name(self, lora: Lora) -> str:
        return lora.name or Path(lora.path).stem

    def effective_outputs(self) -> list[Output]:
        """The outputs to write: as given, or an MP4 and a GIF (and a grid image for grids)."""
        if self.outputs is not None:
            return list(self.outputs)
        outs = [Output(path=f"{self.name}.mp4"), Output(path=f"{self.name}.gif")]
        if self.grid is not None:
            outs.append(Output(path=f"{self.name}_grid.png", cols=self.grid.cols))
        return outs


def output_kind(out: Output) -> str | None:
    """The kind of an output: given, or from its path (see ``assemble.kind_for_path``); None if unknown."""
    from pipeline.outputs.assemble import kind_for_path  # one table of suffixes, shared with the writers

    if out.kind:
        return out.kind
    try:
        return kind_for_path(out.path)
    except ValueError:
        return None


def seconds_to_frames(seconds: Decimal, fps: float) -> int:
    """Seconds at ``fps`` as a frame count: rounded to the nearest frame, halves up (0.25s at 10 fps is 3).

    Computed in decimal from the digits as written, so that ``1.15s`` at 10 fps is exactly 11.5
    frames (rounded up to 12) rather than the binary 11.4999... that ``float`` would make of it, and
    so that no number of seconds, however long, overflows.
    """
    frames = (seconds * Decimal(repr(float(fps)))).to_integral_value(rounding=ROUND_HALF_UP)
    return int(frames)


def parse_frame_ref(ref: int | str, fps: float) -> int:
    """A keyframe's frame (already checked by ``_frame_ref``): an int, or seconds like '2.5s' at ``fps``."""
    if isinstance(ref, int):
        return ref
    m = _SECONDS.match(ref.strip())
    assert m is not None
    return seconds_to_frames(Decimal(m.group(1)), fps)


def embedded_models() -> list[str]:
    """Names of the models that ship inside the project."""
    if not EMBEDDED_DIR.is_dir():
        return []
    return sorted(p.name for p in EMBEDDED_DIR.iterdir() if (p / "model_index.json").is_file())


# ---------------------------------------------------------------------------------------------
# Loading


def load_scene(path: str | Path, *, allow_outside_inputs: bool = False) -> Scene:
    """Read, parse and validate a scene file. Raises :class:`SceneError` with every problem."""
    path = Path(path)
    shown = str(path)
    raw = read_scene_bytes(path, shown)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise SceneError(
            [
                Problem(
                    shown,
                    line,
                    col,
                    f"the scene file is not UTF-8 text (byte 0x{raw[exc.start]:02x}"
                    + ("; it starts like UTF-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "")
                    + "); save it as UTF-8",
                )
            ]
        ) from None
    return parse_scene(text, shown, base_path=path, allow_outside_inputs=allow_outside_inputs)


def parse_scene(
    text: str, shown: str, *, base_path: Path | None = None, allow_outside_inputs: bool = False
) -> Scene:
    """Validate scene text; ``shown`` is the file name used in messages.

    Every problem is reported in one go: YAML problems that leave the data usable, type problems,
    and the scene rules (run on the data with the badly typed keys set aside).
    """
    # YAML nodes, plain data and models, none in a cycle: a scene keyed at every frame makes millions.
    with gc_paused():
        return _parse_scene(text, shown, base_path=base_path, allow_outside_inputs=allow_outside_inputs)


def _parse_scene(
    text: str, shown: str, *, base_path: Path | None = None, allow_outside_inputs: bool = False
) -> Scene:
    """:func:`parse_scene`, with the collector paused."""
    doc, problems = load_yaml_lenient(text, shown)
    if not isinstance(doc.data, dict):
        kind = type(doc.data).__name__ if doc.data is not None else "empty"
        raise SceneError(
            [
                *problems,
                doc.problem((), f"the top level of a scene must be a mapping of keys, not a {_kind(kind)}"),
            ]
        )
    schedules, schedule_problems = _take_schedules(doc, text)
    problems += schedule_problems
    drives, drive_problems = take_drives(doc, SCALARS)
    problems += drive_problems
    scene, type_problems, removed = _validate(doc)
    problems += type_problems
    if scene is not None:
        scene._path = (base_path or Path(shown)).resolve()
        scene._doc = doc
        scene._schedules = schedules
        scene._audio_drives = drives
        problems += _check_rules(scene, doc, allow_outside_inputs=allow_outside_inputs, removed=removed)
    if problems:
        # One problem per place: a rule (or a type check) about a value already reported repeats it.
        seen: set[tuple[int, int]] = set()
        unique = []
        for p in problems:
            if (p.line, p.col) not in seen:
                seen.add((p.line, p.col))
                unique.append(p)
        raise SceneError(unique)
    assert scene is not None
    _join_prompt_parts(scene)
    for name, values in drive_values(scene).items():  # audio-driven values: a point at every frame
        schedules[name] = _Schedule(name, "", [], *doc.where((name,)), False, values=values)
    if schedules:
        _schedules_to_keyframes(scene)
    return scene


# ---------------------------------------------------------------------------------------------
# Shared prompt parts and Deforum schedules: both become plain keyframes when the scene loads,
# so the planner (and every key) sees only joined prompts and ordinary keyframes.

# A part that starts with one of these is joined without a space (", film grain").
_JOIN_WITHOUT_SPACE = ",.;:!?)]}"


def join_prompt(prefix: str, text: str, suffix: str) -> str:
    """``prefix``, ``text`` and ``suffix`` joined with one space, or none where the next part starts
    with punctuation or either side already has a space there ('A cute' + 'dog' + ', film grain'
    is 'A cute dog, film grain')."""

    def glue(a: str, b: str) -> str:
        if not a or not b:
            return a + b
        space = a[-1].isspace() or b[0].isspace() or b[0] in _JOIN_WITHOUT_SPACE
        return a + ("" if space else " ") + b

    return glue(glue(prefix, text), suffix)


def _join_prompt_parts(scene: Scene) -> None:
    """Join ``prompt_prefix`` / ``prompt_suffix`` into every prompt, then clear them.

    A keyframe that sets a prefix or suffix changes it from that keyframe on (it holds, as text
    cannot be eased); if it sets no prompt, the prompt in force is restated with the new parts.
    """
    prefix, suffix = scene.prompt_prefix or "", scene.prompt_suffix or ""
    if scene.walk is not None and (prefix or suffix):
        scene.walk.prompt = join_prompt(prefix, scene.walk.prompt, suffix)
    if scene.grid is not None and (prefix or suffix):
        scene.grid.prompts = [join_prompt(prefix, p, suffix) for p in scene.grid.prompts]
    raw: list[PromptPart] | None = None
    for kf in scene.keyframes:
        changed = kf.prompt is not None
        if kf.prompt_prefix is not None:
            prefix, changed = kf.prompt_prefix, True
        if kf.prompt_suffix is not None:
            suffix, changed = kf.prompt_suffix, True
        if kf.prompt is not None:
            raw = kf.prompt
        if changed and raw is not None and (prefix or suffix or kf.prompt is None):
            kf.prompt = [PromptPart(text=join_prompt(prefix, p.text, suffix), weight=p.weight) for p in raw]
        if kf.prompt_prefix is not None or kf.prompt_suffix is not None:
            kf.prompt_prefix = kf.prompt_suffix = None
    if scene.prompt_prefix is not None or scene.prompt_suffix is not None:
        scene.prompt_prefix = scene.prompt_suffix = None


# Values a schedule string may give (the eased keyframable numbers).
SCHEDULABLE: tuple[str, ...] = SCALARS


@dataclass
class _Schedule:
    """A schedule string of one value, its points, and where its characters are in the file."""

    name: str  # the value's name in messages: 'guidance', or 'loras 1, scale'
    text: str
    points: list[Point]
    line: int
    col: int  # of the string's first character (inside the quotes), or of the value if unknown
    exact: bool  # whether the string is on one line as written, so offsets are columns
    values: list[tuple[int, float]] = dataclass_field(default_factory=list)
    lora: int | None = None  # for a LoRA's scale: its index in 'loras'

    def at(self, offset: int) -> tuple[int, int]:
        return (self.line, self.col + offset) if self.exact else (self.line, self.col)


def _take_schedules(doc: YamlDoc, text: str) -> tuple[dict[str, _Schedule], list[Problem]]:
    """Take the schedule strings (``guidance: "0:(7.5), 30:(9)"``) out of the data before validation.

    The values stay unwritten at the top level, so before a schedule's first point its first value
    holds (as in Deforum). A malformed schedule is a problem at its column, and is set aside.
    """
    schedules: dict[str, _Schedule] = {}
    problems: list[Problem] = []
    lines = text.split("\n")

    def take(holder: dict[str, Any], key: str, path: tuple[Any, ...], name: str, lora: int | None) -> None:
        value = holder.get(key)
        if not isinstance(value, str) or not looks_like_schedule(value):
            return
        del holder[key]
        line, col = doc.where(path)
        source = lines[line - 1] if 0 < line <= len(lines) else ""
        start = col - 1
        if source[start : start + 1] in ("'", '"'):
            start += 1
        exact = source[start : start + len(value)] == value
        sched = _Schedule(name, value, [], line, start + 1 if exact else col, exact, lora=lora)
        try:
            sched.points = parse_schedule(value)
        except ScheduleError as exc:
            problems.append(Problem(doc.file, *sched.at(exc.offset), f"{name}: {exc.message}"))
            return
        schedules[name] = sched

    for name in SCHEDULABLE:
        take(doc.data, name, (name,), name, None)
    loras = doc.data.get("loras")
    for i, item in enumerate(loras if isinstance(loras, list) else []):
        if isinstance(item, dict):
            take(item, "scale", ("loras", i, "scale"), f"loras {i + 1}, scale", i)
    return schedules, problems


def _bounds(name: str) -> tuple[float | None, float | None, bool]:
    """A scalar's lowest and highest value (and whether the lowest is excluded), from the model."""
    low = high = None
    above = False
    field_info = Lora.model_fields["scale"] if name not in Scene.model_fields else Scene.model_fields[name]
    for m in field_info.metadata:
        if getattr(m, "ge", None) is not None:
            low = m.ge
        if getattr(m, "gt", None) is not None:
            low, above = m.gt, True
        if getattr(m, "le", None) is not None:
            high = m.le
    return low, high, above


def _check_schedules(scene: Scene, doc: YamlDoc, declared_total: int | None, total: int) -> list[Problem]:
    """Evaluate each schedule over the scene's frames; problems at the column they are about."""
    problems: list[Problem] = []

    def add(sched: _Schedule, offset: int, message: str) -> None:
        problems.append(Problem(doc.file, *sched.at(offset), f"{sched.name}: {message}"))

    for sched in scene._schedules.values():
        if scene.walk is not None or scene.grid is not None:
            add(sched, 0, "a schedule sets keyframes, and a walk or grid takes none; give one number")
            continue
        if sched.lora is not None and sched.lora >= len(scene.loras):
            continue  # that LoRA was set aside as badly typed: already reported
        lora_name = scene.lora_name(scene.loras[sched.lora]) if sched.lora is not None else None
        for i, kf in enumerate(scene.keyframes):
            given = (kf.lora or {}).get(lora_name) if lora_name is not None else getattr(kf, sched.name)
            if given is not None:
                what = f"the scale of LoRA '{lora_name}'" if lora_name is not None else sched.name
                problems.append(
                    doc.problem(
                        ("keyframes", i, "lora", lora_name)
                        if lora_name is not None
                        else ("keyframes", i, sched.name),
                        f"keyframe {i + 1}: {what} is also given by the schedule on line {sched.line}; "
                        "set it in one place",
                    )
                )
        beyond = [p for p in sched.points if declared_total is not None and p.frame >= declared_total]
        for p in beyond:
            add(
                sched,
                p.frame_offset,
                f"frame {p.frame} is beyond the end; the scene has {declared_total} frames (0 to {declared_total - 1})",
            )
        if beyond:
            continue
        try:
            values = schedule_values(sched.points, total, names={"max_f": total - 1, "s": scene.seed})
        except (EvalError, ScheduleError) as exc:
            add(sched, exc.offset, exc.message)
            continue
        low, high, above = _bounds(sched.name)
        for frame, value, p in values:
            if (low is not None and (value < low or (above and value == low))) or (
                high is not None and value > high
            ):
                allowed = f"{'over' if above else 'from'} {low:g} to {high:g}" if high is not None else ""
                add(sched, p.offset, f"the value at frame {frame} is {value:g}; allowed: {allowed}")
                break
        else:
            sched.values = [(frame, value) for frame, value, _ in values]
    return problems


def _schedules_to_keyframes(scene: Scene) -> None:
    """Merge the evaluated schedules into the keyframes, keeping every schedule linear.

    A schedule point at a written keyframe's frame sets its value there; elsewhere a keyframe with
    ``curve: linear`` is added. Where a written keyframe would ease the value otherwise (its
    ``curve``, or the scene's, is not linear; or the point before it ``hold`` s), the frames between
    the two points get keyframes of the linear values, so Deforum's straight lines stay straight.
    """
    frames, keyframes = scene.keyframe_frames, scene.keyframes
    at_frame = {f: i for i, f in enumerate(frames)}

    def linear_into(i: int) -> bool:
        return (keyframes[i].curve or scene.curve).strip() == "linear"

    updates: dict[int, dict[str, Any]] = {}
    for sched in scene._schedules.values():
        points = sched.values
        lora_name = scene.lora_name(scene.loras[sched.lora]) if sched.lora is not None else None

        def put(
            frame: int, value: float, sched: _Schedule = sched, lora_name: str | None = lora_name
        ) -> None:
            if lora_name is None:
                updates.setdefault(frame, {})[sched.name] = value
            else:
                updates.setdefault(frame, {}).setdefault("lora", {})[lora_name] = value

        for (fa, va), (fb, vb) in pairwise(points):
            ia, ib = at_frame.get(fa), at_frame.get(fb)
            bent = (ib is not None and not linear_into(ib)) or (ia is not None and keyframes[ia].hold)
            if bent and fb - fa > 1:
                for n in range(fa + 1, fb):
                    put(n, va + (vb - va) * (n - fa) / (fb - fa))
        for frame, value in points:
            put(frame, value)
    merged: list[Keyframe] = []
    merged_frames: list[int] = []
    index: list[int | None] = []
    order = sorted(set(frames) | set(updates))
    for frame in order:
        i = at_frame.get(frame)
        values = updates.get(frame)
        if i is not None:
            if values and "lora" in values:
                values = {**values, "lora": {**(keyframes[i].lora or {}), **values["lora"]}}
            kf = keyframes[i] if not values else keyframes[i].model_copy(update=values)
        else:
            assert values is not None
            kf = Keyframe.model_construct(
                _fields_set={"frame", "curve", *values}, frame=frame, curve="linear", **values
            )
        merged.append(kf)
        merged_frames.append(frame)
        index.append(i)
    scene.keyframes = merged
    scene._keyframe_frames = merged_frames
    scene._written_index = index


def _validate(doc: YamlDoc) -> tuple[Scene | None, list[Problem], set[tuple[Any, ...]]]:
    """Type-check; on errors, set the offending values aside and retry, so the rules can run too.

    Returns the scene (None if it could not be repaired), the type problems of every round, and
    the paths set aside. A value set aside never hides another problem: the rules run on the rest.
    """
    data = copy.deepcopy(doc.data)
    problems: list[Problem] = []
    removed: set[tuple[Any, ...]] = set()
    for _ in range(8):
        try:
            # The loader checks the rules itself, with positions: the constructor's own pass is skipped.
            return Scene.model_validate(data, context=_LOADING), problems, removed
        except ValidationError as exc:
            errors = exc.errors()
        for err in errors:
            loc = _clean_loc(tuple(err["loc"]), doc.data)
            missing = err["type"] == "missing"
            # A required key is missing because its bad value was set aside: already reported,
            # and it now gets a stand-in.
            if not (missing and loc in removed):
                problems.append(_problem_from_pydantic(doc, err))
            if any(loc[:depth] in removed for depth in range(1, len(loc) + (0 if missing else 1))):
                continue  # inside a value already set aside (two bad items of one list)
            path = _set_aside(data, loc, err["type"])
            if path is None:
                return None, problems, removed
            removed.add(path)
    return None, problems, removed


# A required key of a list item cannot be removed (the items after it would move) and cannot be
# left out; it gets a stand-in that the rules report at the same place as the original problem
# (and that the one-problem-per-place rule then drops): frame -1 is "negative", an empty path is
# "not a file". An output's stand-in is a valid name of its own, so no rule reports it.
_STAND_INS: dict[str, Any] = {"frame": -1, "text": "", "path": ""}
# The lists whose items are mappings, and the required key of each.
_LIST_ITEMS = {
    "keyframes": "frame",
    "prompt": "text",
    "outputs": "path",
    "embeddings": "path",
    "loras": "path",
}


def _stand_in(item: tuple[Any, ...]) -> dict[str, Any]:
    """A stand-in for the list item at ``item``: its required key with its stand-in value."""
    key = _LIST_ITEMS[item[-2]]
    if item[-2] == "outputs":
        return {key: f"set-aside-{item[-1]}.gif"}
    return {key: _STAND_INS[key]}


def _set_aside(data: Any, loc: tuple[Any, ...], kind: str) -> tuple[Any, ...] | None:
    """Remove the mapping key holding a bad value, or stand in for a required one; the path set aside.

    Never removes a list item: the positions of the items after it must not shift.
    """
    if kind == "missing":
        if len(loc) >= 3 and isinstance(loc[-2], int) and loc[-3] in _LIST_ITEMS and loc[-1] in _STAND_INS:
            item = _lookup(data, loc[:-1])
            if isinstance(item, dict):
                item[loc[-1]] = _stand_in(loc[:-1])[loc[-1]]
                return loc
            return None
        loc = loc[:-1]  # a mapping value lacking a required key (walk, grid): set the mapping aside
    if len(loc) >= 2 and isinstance(loc[-1], int) and loc[-2] in _LIST_ITEMS:
        # A list item that is not a mapping at all ('- a dog' for a keyframe): a stand-in item.
        items = _lookup(data, loc[:-1])
        if isinstance(items, list) and loc[-1] < len(items):
            items[loc[-1]] = _stand_in(loc)
            return loc
    # The deepest mapping key on the path whose parent is a mapping: its removal falls back to the
    # default. ('noise: travle' is checked as {kind: travle}: the key to remove is 'noise' itself.)
    for depth in range(len(loc), 0, -1):
        key = loc[depth - 1]
        if not isinstance(key, str):
            continue
        parent = _lookup(data, loc[: depth - 1])
        if isinstance(parent, dict) and key in parent:
            del parent[key]
            return loc[:depth]
    return None


def _lookup(data: Any, path: tuple[Any, ...]) -> Any:
    """The value at ``path`` in plain data, or None if there is none."""
    for step in path:
        try:
            data = data[step]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _clean_loc(loc: tuple[Any, ...], data: Any) -> tuple[Any, ...]:
    """A pydantic error location as a path into the scene's data.

    Union branches and validator wrappers add their names to loc ('list[PromptPart]', 'int',
    'function-before[...]'); those are dropped, unless the scene itself has a key of that name
    there (a user's key 'keyfr[ames' or 'int' is a place in the file, not a pydantic tag).
    """
    out: list[Any] = []
    for x in loc:
        if (isinstance(data, dict) and x in data) or (
            isinstance(data, list) and isinstance(x, int) and 0 <= x < len(data)
        ):
            data = data[x]
        elif isinstance(x, str) and (
            "[" in x or x in ("int", "str", "float", "function-before", "function-after")
        ):
            continue
        else:
            data = None  # a key the data lacks: a missing one, or a field of a shorthand value
        out.append(x)
    return tuple(out)


def _kind(name: str) -> str:
    return {"list": "list", "str": "single value", "int": "number", "float": "number", "bool": "boolean"}.get(
        name, name
    )


_TYPE_WORDS = {
    "string_type": "text",
    "int_type": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {shorten(str(value))}"
    if isinstance(value, str):
        return f"the text '{shorten(value)}'"
    if value is None:
        return "nothing (null)"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return repr(value)


def _where_words(loc: tuple[Any, ...]) -> str:
    """'keyframe 2 (frame list index 1)' style context for a pydantic loc."""
    parts: list[str] = []
    i = 0
    while i < len(loc):
        item = loc[i]
        if (
            item in ("keyframes", "outputs", "embeddings", "loras")
            and i + 1 < len(loc)
            and isinstance(loc[i + 1], int)
        ):
            parts.append(f"{item[:-1]} {loc[i + 1] + 1}")
            i += 2
            continue
        if (
            item in ("prompt", "prompts", "size", "seeds")
            and i + 1 < len(loc)
            and isinstance(loc[i + 1], int)
        ):
            parts.append(f"{item} item {loc[i + 1] + 1}")
            i += 2
            continue
        parts.append(str(item))
        i += 1
    return ", ".join(parts)


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that holds the value at ``loc`` (to list its allowed keys)."""
    model: type[BaseModel] = Scene
    for item in loc:
        if isinstance(item, int):
            continue
        field = model.model_fields.get(str(item))
        if field is None:
            return model
        found = _first_model(field.annotation)
        if found is None:
            return model
        model = found
    return model


def _first_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _first_model(arg)
        if found is not None:
            return found
    meta = getattr(annotation, "__origin__", None)
    if meta is not None and isinstance(meta, type) and issubclass(meta, BaseModel):
        return meta
    return None


# Top-level keys that belong in keyframes, with what users of other tools call them: Deforum's
# 'prompts'/'animation_prompts' and '<value>_schedule' strings, Parseq's per-frame rows.
_KEYFRAME_ONLY = {"prompt", "prompts", "animation_prompts", "frame", "hold", "lora"}


def _keyframe_key_hint(key: str) -> str | None:
    """Why a top-level ``key`` belongs in 'keyframes' (and how to write it there), or None."""
    if key in _KEYFRAME_ONLY:
        name = "prompt" if "prompt" in key else key
        example = {
            "prompt": "prompt: a dog",
            "frame": "prompt: a dog",
            "hold": "hold: true",
            "lora": "lora: {style: 0.8}",
        }[name]
        return f"'{name}' is set per keyframe, in 'keyframes': e.g. keyframes: [{{frame: 0, {example}}}]"
    return deforum_name_hint(key)


def _problem_from_pydantic(doc: YamlDoc, err: Any) -> Problem:
    kind = err["type"]
    value = err.get("input")
    clean = _clean_loc(tuple(err["loc"]), doc.data)
    where = _where_words(clean)
    if kind == "extra_forbidden":
        key = str(clean[-1])
        model = _model_at(clean[:-1])
        allowed = sorted(model.model_fields) if model else []
        context = _where_words(clean[:-1])
        inside = f" in {context}" if context else ""
        keyframe_hint = _keyframe_key_hint(key) if len(clean) == 1 else None
        if keyframe_hint is not None:
            return doc.problem(
                clean, f"unknown key '{shorten(key, 40)}' at the top level; {keyframe_hint}", key=True
            )
        if DEFORUM_SCHEDULE.match(key):
            # '{frame: 0, guidance: 0:(7.5), 30:(9)}' splits at the comma: '30:(9)' is read as a key.
            named = next(
                (k for k in reversed(list(_lookup(doc.data, clean[:-1]) or {})) if k in SCALARS), "guidance"
            )
            return doc.problem(
                clean, f"unknown key '{shorten(key, 40)}'{inside}; {deforum_hint(named)}", key=True
            )
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return doc.problem(
            clean, f"unknown key '{shorten(key, 40)}'{inside}; {hint}allowed: {', '.join(allowed)}", key=True
        )
    if kind == "missing":
        return doc.problem(
            clean[:-1], f"missing required key '{clean[-1]}' in {_where_words(clean[:-1]) or 'the scene'}"
        )
    if kind in _TYPE_WORDS:
        want = _TYPE_WORDS[kind]
        hint = ""
        if kind == "bool_type" and isinstance(value, str):
            hint = " (YAML 1.2: only true and false are booleans; yes/no/on/off are text)"
        elif kind in ("int_type", "float_type") and isinstance(value, str) and DEFORUM_SCHEDULE.match(value):
            hint = f"; {deforum_hint(str(clean[-1]), where='top' if len(clean) == 1 else 'keyframe')}"
        elif kind in ("int_type", "float_type") and isinstance(value, str) and ":" in value:
            hint = " (values like 1:30 are text, not minutes:seconds)"
        elif value is None:
            hint = " (give a value, or remove the key to use the default)"
        elif kind == "string_type" and not isinstance(value, (list, dict)):
            hint = " (put quotes around it to make it text)"
        return doc.problem(clean, f"{where}: expected {want}, got {_describe(value)}{hint}")
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return doc.problem(
            clean, f"{where}: {_describe(value)} is not allowed; allowed: {expected.replace(' or ', ', ')}"
        )
    if kind in ("too_short", "too_long"):
        ctx = err.get("ctx", {})
        return doc.problem(clean, f"{where}: {err['msg'].lower()} (got {ctx.get('actual_length')})")
    if kind in ("frame_ref", "duration", "pair", "corners", "prompt_type"):
        return doc.problem(clean, f"{where}: {err['msg']}")
    if kind == "finite_number":
        return doc.problem(clean, f"{where}: expected a finite number, got {_describe(value)}")
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return doc.problem(clean, f"{where}: {err['msg'].lower()}, got {_describe(value)}")
    return doc.problem(clean, f"{where}: {err['msg']}")


# ---------------------------------------------------------------------------------------------
# The scene rules


def _check_rules(
    scene: Scene,
    doc: YamlDoc,
    *,
    allow_outside_inputs: bool,
    removed: set[tuple[Any, ...]] = frozenset(),  # type: ignore[assignment]
) -> list[Problem]:
    problems: list[Problem] = []

    def gone(*names: str) -> bool:
        """Was a value of this name set aside as badly typed? Then rules about its absence keep quiet."""
        return any(path[0] in names or path[-1] in names for path in removed)

    add = problems.append
    fps = scene.fps
    # 0. The soundtrack first: keyframes on its beats become frame numbers here.
    problems += check_audio(scene, doc, gone, allow_outside_inputs=allow_outside_inputs, bounds=_bounds)

    # 1. Names: curves, scheduler, model.
    for path, spec in [(("curve",), scene.curve)] + [
        (("keyframes", i, "curve"), kf.curve) for i, kf in enumerate(scene.keyframes) if kf.curve is not None
    ]:
        if spec.strip() == AUDIO_CURVE:
            continue  # checked with the soundtrack
        try:
            curves.parse_curve(spec)
        except ValueError as exc:
            add(doc.problem(path, str(exc)))
    if scene.scheduler is not None and scene.scheduler not in scheduler_names():
        close = difflib.get_close_matches(scene.scheduler, scheduler_names(), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        add(
            doc.problem(
                ("scheduler",),
                f"unknown scheduler '{shorten(scene.scheduler, 40)}'; {hint}allowed: {', '.join(scheduler_names())}",
            )
        )
    for at, message in _check_model(scene):
        add(doc.problem(at, message))

    # 2. Size.
    for i, (axis, value) in enumerate(zip(("width", "height"), scene.size, strict=True)):
        if value % 8:
            add(
                doc.problem(
                    ("size", i),
                    f"size: {axis} {value} is not a multiple of 8 (the VAE works on 8x8 pixel blocks); "
                    f"use {value // 8 * 8 or 8} or {value // 8 * 8 + 8}",
                )
            )

    # 3. Frames: walk, grid or keyframes, and how long the scene is.
    sources = [name for name in ("walk", "grid") if getattr(scene, name) is not None]
    if len(sources) > 1:
        add(doc.problem(("grid",), "a scene is either a walk or a grid, not both"))
    if sources and scene.keyframes:
        add(
            doc.problem(
                ("keyframes",),
                f"a {sources[0]} scene takes no keyframes; its frames come from '{sources[0]}'",
                key=True,
            )
        )
    if not sources and not scene.keyframes and not gone("keyframes", "walk", "grid"):
        add(
            doc.problem(
                (),
                "the scene has no frames: give 'keyframes' (a list with 'frame' and 'prompt'), a 'walk' or a 'grid'",
            )
        )

    declared_total: int | None = scene.frames
    if scene.duration is not None:
        seconds = _parse_duration(scene.duration) or Decimal(0)  # its form was checked with the types
        if scene.frames is not None:
            add(doc.problem(("duration",), "give either 'frames' or 'duration', not both"))
        else:
            declared_total = max(1, seconds_to_frames(seconds, fps))
            if declared_total > MAX_FRAMES:
                add(
                    doc.problem(
                        ("duration",),
                        f"duration: {shorten(str(scene.duration), 30)} at {fps:g} fps is "
                        f"{shorten(str(declared_total), 30)} frames; at most {MAX_FRAMES} are allowed",
                    )
                )
                declared_total = None

    frames: list[int] = []
    previous: tuple[int, int] | None = None  # (frame, keyframe index)
    for i, kf in enumerate(scene.keyframes):
        at = ("keyframes", i, "frame")
        n = parse_frame_ref(kf.frame, fps)  # its form was checked with the types
        shown_n = shorten(str(n), 30)
        if n < 0:
            add(doc.problem(at, f"keyframe {i + 1}: frame {shown_n} is negative; frames count from 0"))
        elif declared_total is not None and n >= declared_total:
            add(
                doc.problem(
                    at,
                    f"keyframe {i + 1}: frame {shown_n} is beyond the end; the scene has {declared_total} frames (0 to {declared_total - 1})",
                )
            )
        elif previous is not None and n == previous[0]:
            line = doc.where(("keyframes", previous[1], "frame"))[0]
            add(
                doc.problem(
                    at,
                    f"keyframe {i + 1}: frame {shown_n} repeats the keyframe at line {line}; each frame may have one keyframe",
                )
            )
        elif previous is not None and n < previous[0]:
            add(
                doc.problem(
                    at,
                    f"keyframe {i + 1}: frame {shown_n} comes after frame {previous[0]}; keyframes must be in increasing frame order",
                )
            )
        frames.append(n)
        if n >= 0 and (previous is None or n > previous[0]):
            previous = (n, i)

    stood_in = any(len(path) == 2 and path[0] == "keyframes" for path in removed)
    if (
        scene.keyframes
        and not any(kf.prompt for kf in scene.keyframes)
        and not gone("prompt")
        and not stood_in
    ):
        add(doc.problem(("keyframes",), "no keyframe sets a 'prompt'; at least one must", key=True))
    for i, kf in enumerate(scene.keyframes):
        # Each weight is over 0, so only their sum can go wrong: 1e308 + 1e308 is inf, and every
        # weight divided by it is 0 (a frame conditioned on nothing).
        if kf.prompt and not math.isfinite(sum(part.weight for part in kf.prompt)):
            add(
                doc.problem(
                    ("keyframes", i, "prompt"),
                    f"keyframe {i + 1}: the prompt weights add up to more than the largest number; "
                    "only their ratios count, so write them like 1 and 3",
                )
            )

    if scene.walk is not None:
        total = scene.walk.frames
    elif scene.grid is not None:
        total = scene.grid.rows * scene.grid.cols
    else:
        # Schedule points count like keyframes: the scene lasts until the last of either.
        ends = frames + [p.frame for sched in scene._schedules.values() for p in sched.points]
        total = (
            declared_total
            if declared_total is not None
            else (max(ends) + 1 if ends and max(ends) >= 0 else 1)
        )
    if total > MAX_FRAMES:
        # Point at what made the scene that long: 'frames', or the keyframe furthest out.
        at_total: tuple[Any, ...] = ("frames",)
        if scene.walk is None and scene.grid is None and declared_total is None and frames:
            at_total = ("keyframes", frames.index(max(frames)), "frame")
        long_schedules = [sc for sc in scene._schedules.values() if sc.points[-1].frame + 1 == total]
        if declared_total is None and long_schedules and (not frames or max(frames) + 1 < total):
            sched = long_schedules[0]
            add(
                Problem(
                    doc.file,
                    *sched.at(sched.points[-1].frame_offset),
                    f"{sched.name}: frame {shorten(str(total - 1), 30)} makes the scene {shorten(str(total), 30)} "
                    f"frames long; at most {MAX_FRAMES} are allowed",
                )
            )
        else:
            add(
                doc.problem(
                    at_total,
                    f"the scene has {shorten(str(total), 30)} frames; at most {MAX_FRAMES} are allowed",
                )
            )

    if scene._schedules and total <= MAX_FRAMES:
        problems.extend(_check_schedules(scene, doc, declared_total, total))

    # 4. Noise (unless a bad one was set aside: rules about the default it fell back to would mislead).
    noise = scene.noise if not gone("noise", "kind") else Noise(kind="travel")
    if noise.kind == "circle":
        if (not noise.seeds or len(noise.seeds) != 2) and not gone("seeds"):
            add(doc.problem(("noise",), "noise: a circle walk needs 'seeds: [A, B]', exactly two seeds"))
    elif noise.seeds is not None:
        add(
            doc.problem(
                ("noise", "seeds"),
                f"noise: 'seeds' is only for kind circle (kind here is {noise.kind}); use 'seed'",
            )
        )
    if noise.endpoint and noise.kind != "circle":
        add(doc.problem(("noise", "endpoint"), "noise: 'endpoint' is only for kind circle"))
    if (
        noise.kind == "travel"
        and not any(kf.seed is not None for kf in scene.keyframes)
        and not gone("seed", "noise", "kind", "keyframes")
    ):
        add(
            doc.problem(
                ("noise",),
                "noise: kind travel slerps between the seeds of keyframes, but no keyframe sets 'seed'",
            )
        )
    if noise.kind != "travel":
        for i, kf in enumerate(scene.keyframes):
            if kf.seed is not None:
                add(
                    doc.problem(
                        ("keyframes", i, "seed"),
                        f"keyframe {i + 1}: a keyframe 'seed' needs 'noise: travel' (noise is {noise.kind})",
                        key=True,
                    )
                )

    # 5. Modes and their inputs; files exist; LoRA names.
    problems.extend(
        _check_modes_and_files(scene, doc, frames, gone, allow_outside_inputs=allow_outside_inputs)
    )
    # diffusers loads each LoRA as an adapter of its name and each learned embedding as a token:
    # a name or token given twice fails when the model loads, so it is a problem here.
    for field, names in (
        (
            "loras",
            [
                (("loras", i, "name" if lo.name else "path"), scene.lora_name(lo))
                for i, lo in enumerate(scene.loras)
            ],
        ),
        (
            "embeddings",
            [
                (("embeddings", i, "token" if e.token else "path"), token)
                for i, e in enumerate(scene.embeddings)
                if (token := embedding_token(scene, e))
            ],
        ),
    ):
        first: dict[str, tuple[Any, ...]] = {}
        for at, name in names:
            if name in first:
                what = "LoRA name" if field == "loras" else "token"
                add(
                    doc.problem(
                        at,
                        f"{field}: {what} '{shorten(name, 40)}' is also used at line {doc.where(first[name])[0]}; "
                        f"each {what} must be different",
                    )
                )
            first.setdefault(name, at)
    lora_names = {scene.lora_name(lo) for lo in scene.loras}
    for i, kf in enumerate(scene.keyframes):
        for name in kf.lora or {} if not gone("loras", "name") else {}:
            if name not in lora_names:
                allowed = ", ".join(sorted(lora_names)) or "none (the scene lists no 'loras')"
                add(
                    doc.problem(
                        ("keyframes", i, "lora", name),
                        f"keyframe {i + 1}: unknown LoRA '{shorten(name, 40)}'; allowed: {allowed}",
                        key=True,
                    )
                )

    # 6. Outputs.
    seen: dict[str, int] = {}
    for i, out in enumerate(scene.effective_outputs()):
        at = ("outputs", i)
        if output_kind(out) is None:
            add(
                doc.problem(
                    at,
                    f"output {i + 1}: cannot tell the kind of '{shorten(out.path)}'; use .mp4, .gif, .png (grid image), a folder ending in '/' (PNG frames), or set 'kind'",
                )
            )
        p = Path(out.path)
        if p.is_absolute() or ".." in p.parts or not p.parts or not out.path.strip():
            add(
                doc.problem(
                    at,
                    f"output {i + 1}: '{shorten(out.path)}' must be a relative path inside the scene's render folder (no absolute paths, no '..', not the folder itself)",
                )
            )
        norm = out.path.rstrip("/")
        if norm in seen:
            add(
                doc.problem(
                    at,
                    f"output {i + 1}: '{shorten(out.path)}' is also output {seen[norm] + 1}; each output needs its own path",
                )
            )
        seen.setdefault(norm, i)
        if out.rubber_band and output_kind(out) not in ("gif", "mp4", None):
            add(doc.problem(at, f"output {i + 1}: rubber_band applies to gif and mp4 outputs only"))

    if not problems:
        scene._keyframe_frames = frames
        scene._total_frames = total
    return problems


def _parse_duration(value: str | float) -> Decimal | None:
    """A duration in seconds (a number, or text like '10s'), exactly as written; None if it is not one."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Decimal(repr(value)) if value > 0 and math.isfinite(value) else None
    m = _SECONDS.match(str(value).strip())
    if m and Decimal(m.group(1)) > 0:
        return Decimal(m.group(1))
    return None


def _resolve(scene: Scene, relative: str) -> Path | str:
    """``scene.resolve(relative)``, or why the path cannot be resolved (too long, a symlink loop)."""
    try:
        return scene.resolve(relative)
    except (OSError, RuntimeError, ValueError) as exc:
        return f"'{shorten(relative)}' is not a usable path ({getattr(exc, 'strerror', None) or exc})"


def _check_model(scene: Scene) -> list[tuple[tuple[str, ...], str]]:
    """The scene's ``model:`` names a model (the check ``--model`` gets too, in ``pipeline.render.models``),
    a single-file model's configs are there and fit it (``config:``), and ``vae:`` names a VAE.
    Torch-free and without network: a checkpoint is judged by its header or its pickle's opcodes."""
    # torch-free; models imports nothing of scene
    from pipeline.render.models import check_model_spec
    from pipeline.render.singlefile import check_checkpoint_options, check_vae_spec

    problems: list[tuple[tuple[str, ...], str]] = []
    problem = check_model_spec(scene.model, scene.base_dir)
    if problem:
        problems.append((("model",), f"model: {problem}"))
    else:
        found = check_checkpoint_options(scene.model, scene.config, scene.base_dir, scene.base_dir)
        problems += [((name,), message) for name, message in found]
    if scene.vae is not None and (why := check_vae_spec(scene.vae, scene.base_dir)):
        problems.append((("vae",), f"vae: {why}"))
    return problems


def _check_modes_and_files(
    scene: Scene, doc: YamlDoc, frames: list[int], gone: Any, *, allow_outside_inputs: bool
) -> list[Problem]:
    """Every image a mode needs is given, exists, and stays inside the scene's folder."""
    problems: list[Problem] = []
    base = scene.base_dir.resolve()
    files: list[tuple[tuple[Any, ...], str]] = []
    for name in IMAGE_FIELDS:
        value = getattr(scene, name)
        if value is not None:
            files.append(((name,), value))
    for i, kf in enumerate(scene.keyframes):
        for name in IMAGE_FIELDS:
            value = getattr(kf, name)
            if value is not None:
                files.append((("keyframes", i, name), value))
    files += [(("embeddings", i, "path"), e.path) for i, e in enumerate(scene.embeddings)]
    files += [(("audio", "path"), scene.audio.path)] if scene.audio is not None else []
    sizes: dict[str, tuple[int, int]] = {}
    files += [(("loras", i, "path"), lo.path) for i, lo in enumerate(scene.loras)]
    for at, rel in files:
        full = _resolve(scene, rel)
        kind = "" if isinstance(full, str) else path_kind(full)
        if isinstance(full, str):
            problems.append(doc.problem(at, full))
        elif not allow_outside_inputs and not full.is_relative_to(base):
            problems.append(
                doc.problem(
                    at,
                    f"'{shorten(rel)}' is outside the scene's folder {base}; move it there or pass --allow-outside-inputs",
                )
            )
        elif kind.startswith("unusable: "):
            problems.append(
                doc.problem(at, f"'{shorten(rel)}' is not a usable path ({kind.removeprefix('unusable: ')})")
            )
        elif kind == "missing":
            problems.append(
                doc.problem(
                    at,
                    f"file not found: '{shorten(rel)}' (looked for {shorten(str(full), 120)}; paths are relative to the scene file)",
                )
            )
        elif kind != "file":
            what = "a folder" if kind == "folder" else kind
            problems.append(
                doc.problem(
                    at, f"'{shorten(rel)}' is {what}, not a regular file (at {shorten(str(full), 120)})"
                )
            )
        elif at[0] in ("embeddings", "loras"):
            what = "learned embeddings" if at[0] == "embeddings" else "LoRA weights"
            tensors = read_weights_header(full)
            if isinstance(tensors, str):
                problems.append(
                    doc.problem(
                        at,
                        f"'{shorten(rel)}': {tensors}; {what} must be a .safetensors file (or a PyTorch .bin/.pt file)",
                    )
                )
            elif (why := (embedding_problem if at[0] == "embeddings" else lora_problem)(tensors)) is not None:
                problems.append(doc.problem(at, f"'{shorten(rel)}': {why}"))
        elif at[-1] in IMAGE_FIELDS:
            size_or_problem = image_size(full)
            if isinstance(size_or_problem, str):
                problems.append(doc.problem(at, f"'{shorten(rel)}': {size_or_problem}"))
            else:
                sizes[rel] = size_or_problem
                if at[-1] == "depth_map" and is_flat(full):
                    # depth2img scales the map by its min and max: a flat map divides by zero.
                    problems.append(
                        doc.problem(
                            at, f"'{rel}': the depth map has one value everywhere; it needs near and far"
                        )
                    )

    # Walk the held values keyframe by keyframe, as the planner will, to check what each mode needs.
    # A problem is reported where the mode was set (a keyframe's 'mode', or the scene's).
    state = {name: getattr(scene, name) for name in HELD}
    origin: tuple[Any, ...] = ("mode",)
    segments = [(origin, state.copy())] if not scene.keyframes or frames[:1] != [0] else []
    for i, kf in enumerate(scene.keyframes):
        for name in HELD:
            value = getattr(kf, name)
            if value is not None:
                state[name] = value
        if kf.mode is not None:
            origin = ("keyframes", i, "mode")
        segments.append((origin, state.copy()))
    if gone(*IMAGE_FIELDS, "mode"):
        segments = []
    reported: set[tuple[Any, ...]] = set()
    for at, st in segments:
        mode = st["mode"]
        # One report per distinct state: a held mode would otherwise be reported at every keyframe.
        state_key = (at, mode, st["init_image"], st["mask"])
        if state_key in reported:
            continue
        reported.add(state_key)
        where = f"keyframe {at[1] + 1}" if at[0] == "keyframes" else "the scene"
        if mode in ("img2img", "inpaint", "depth2img") and not st["init_image"]:
            problems.append(doc.problem(at, f"{where}: mode {mode} needs an 'init_image'"))
        if mode == "inpaint" and not st["mask"]:
            problems.append(
                doc.problem(at, f"{where}: mode inpaint needs a 'mask' (white repaints, black keeps)")
            )
        image_size_, mask_size = sizes.get(st["init_image"] or ""), sizes.get(st["mask"] or "")
        if mode == "inpaint" and image_size_ and mask_size and image_size_ != mask_size:
            problems.append(
                doc.problem(
                    at,
                    f"{where}: the mask '{st['mask']}' is {mask_size[0]}x{mask_size[1]} but the init image "
                    f"'{st['init_image']}' is {image_size_[0]}x{image_size_[1]}; they must be the same size",
                )
            )
    if (
        scene.mode != "txt2img"
        and (scene.walk is not None or scene.grid is not None)
        and scene.mode == "feedback"
    ):
        problems.append(
            doc.problem(("mode",), "mode feedback chains frames in time; it does not apply to a grid or walk")
        )
    return problems


# ---------------------------------------------------------------------------------------------
# Rules that need the model (checked once it is resolved, still before anything loads)


def check_against_model(
    scene: Scene,
    *,
    pipeline_class: str,
    family: str,
    components: dict[str, Any],
    model: str | None = None,
    folder: Path | None = None,
) -> list[Problem]:
    """What the scene asks of its model that the model cannot do: modes, learned embeddings, T5.

    ``model`` is the ``--model`` that replaces the scene's ``model:``, if any: the messages name the
    model that is used and where it came from. ``folder`` is the model's local files (``ModelRef.folder``),
    if there are any: learned-embedding tokens and sizes are then checked against its tokenizer and
    text encoder, which diffusers would otherwise refuse only once the model has loaded.
    """
    from pipeline.render.models import modes_for

    doc = scene._doc or YamlDoc(str(scene.path), None)
    problems: list[Problem] = []
    named = f"--model '{model}'" if model is not None else f"model '{scene.model}'"
    allowed = modes_for(pipeline_class)
    written = scene.keyframes and scene.keyframe_frames[0] == 0 and scene.keyframes[0].mode is not None
    uses = [] if written else [(("mode",), scene.mode)]
    # A keyframe's place in the file: schedules may have added keyframes before it.
    written_at = scene._written_index or range(len(scene.keyframes))
    uses += [
        (("keyframes", i, "mode"), kf.mode)
        for i, kf in zip(written_at, scene.keyframes, strict=True)
        if kf.mode is not None
    ]
    for at, mode in uses:
        if mode not in allowed:
            # A mode nobody wrote is the default: say so, as the position is then only the scene's start.
            unset = at == ("mode",) and at not in doc.marks
            default = f"; the scene sets no 'mode', so it is {mode}, the default" if unset else ""
            # With no 'mode' line to point at, the line that chose the model is where to look.
            place = ("model",) if unset and model is None and ("model",) in doc.marks else at
            problems.append(
                doc.problem(
                    place,
                    f"mode {mode} is not possible with {named} ({pipeline_class}); "
                    f"it renders: {', '.join(allowed)}{default}",
                )
            )
    if scene.embeddings and family != "sd":
        problems.append(
            doc.problem(
                ("embeddings",),
                f"learned embeddings work with SD 1.x/2.x models; {named} is {family}",
                key=True,
            )
        )
    if scene.embeddings and family == "sd" and folder is not None:
        problems += _check_embeddings_against(scene, doc, folder, named)
    if scene.clip_skip and folder is not None:
        problems += _check_clip_skip(scene, doc, folder, family, named)
    if scene.t5 and (family != "sd3" or not (components.get("text_encoder_3") or [None])[0]):
        problems.append(
            doc.problem(
                ("t5",),
                f"t5: true needs an SD3 model with a T5 text encoder; {named} has none",
                key=True,
            )
        )
    return problems


def embedding_token(scene: Scene, emb: LearnedEmbedding) -> str | None:
    """The token a learned embedding adds: its 'token', else the name of the file's one tensor."""
    if emb.token:
        return emb.token
    try:
        tensors = read_weights_header(scene.resolve(emb.path))
    except (OSError, RuntimeError, ValueError):
        return None
    return next(iter(tensors)) if isinstance(tensors, dict) and len(tensors) == 1 else None


def _check_embeddings_against(scene: Scene, doc: YamlDoc, folder: Path, named: str) -> list[Problem]:
    """Learned embeddings against the model's tokenizer and text encoder, as diffusers will load them.

    diffusers refuses a token that the tokenizer already knows ('dog' is a word of CLIP's vocabulary,
    '<tom>' is not), and an embedding whose vectors are not the text encoder's width.
    """
    problems: list[Problem] = []
    try:
        vocab = set(json.loads((folder / "tokenizer" / "vocab.json").read_text(encoding="utf-8")))
        added = folder / "tokenizer" / "added_tokens.json"
        if added.is_file():
            vocab |= set(json.loads(added.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        vocab = set()
    try:
        config = json.loads((folder / "text_encoder" / "config.json").read_text(encoding="utf-8"))
        width = config.get("hidden_size") if isinstance(config, dict) else None
    except (OSError, ValueError):
        width = None
    for i, emb in enumerate(scene.embeddings):
        token = embedding_token(scene, emb)
        at = ("embeddings", i, "token" if emb.token else "path")
        if token is not None and (token in vocab or f"{token}_1" in vocab):
            problems.append(
                doc.problem(
                    at,
                    f"embedding {i + 1}: the token '{shorten(token, 40)}' is already a word of the tokenizer of "
                    f"{named}; choose a new one, e.g. '<{shorten(token, 30).strip('<>')}>'",
                )
            )
        try:
            tensors = read_weights_header(scene.resolve(emb.path))
        except (OSError, RuntimeError, ValueError):
            continue
        shape = next(iter(tensors.values())) if isinstance(tensors, dict) and len(tensors) == 1 else None
        if isinstance(width, int) and shape and shape[-1] != width:
            problems.append(
                doc.problem(
                    ("embeddings", i, "path"),
                    f"embedding {i + 1}: its vectors have {shape[-1]} values, the text encoder of {named} "
                    f"takes {width}; it was made for another model",
                )
            )
    return problems


def _check_clip_skip(scene: Scene, doc: YamlDoc, folder: Path, family: str, named: str) -> list[Problem]:
    """``clip_skip`` within the layers of the model's text encoders (an IndexError once loaded)."""
    # SD 1.x/2.x take the last layer's output for clip_skip 0; SDXL and SD3 the one before it.
    offset = 1 if family == "sd" else 2
    for name in ("text_encoder", "text_encoder_2"):
        try:
            layers = int(json.loads((folder / name / "config.json").read_text())["num_hidden_layers"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if scene.clip_skip + offset > layers + 1:
            return [
                doc.problem(
                    ("clip_skip",),
                    f"clip_skip {scene.clip_skip} skips more layers than {named}'s {name} has ({layers}); "
                    f"at most {layers + 1 - offset}",
                )
            ]
    return []
