"""The scene format as pydantic models: every key of a scene file, its type and its range.

Pydantic only: the types and ranges a value must have, and the shorthands (``prompt: a dog``,
``noise: travel``, ``outputs: [dog.gif]``). The rules between values (keyframe order, files,
names) are in ``pipeline.scene.rules``; the :class:`~pipeline.scene.core.Scene` that checks them
when it is built is in ``pipeline.scene.core``::

    Keyframe.model_validate({"frame": "2.5s", "prompt": "a dog"}).prompt   # [PromptPart(text='a dog', weight=1.0)]
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr
from pydantic_core import PydanticCustomError

from pipeline.audio.model import Audio, audio_ref
from pipeline.modes import IMAGE_FIELDS, SCALARS  # noqa: F401 - SCALARS: the scene's keyframable scalars
from pipeline.modes import ModeName as Mode
from pipeline.scene.problems import Problem, describe
from pipeline.scene.timeline import MAX_FRAMES, SECONDS, parse_duration
from pipeline.scene.yamlio import YamlDoc

# Values that hold from the keyframe that sets them until the next one that does. (The scalars a
# keyframe may set and interpolate with its curve, SCALARS, and the input images are the modes':
# pipeline.modes.)
HELD: tuple[str, ...] = ("mode", *IMAGE_FIELDS)
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
            {"got": describe(value)},
        )
    return value


def _frame_ref(value: Any) -> Any:
    """A keyframe's frame: a whole number, or seconds like '2.5s'; one clear message otherwise."""
    if (
        (isinstance(value, int) and not isinstance(value, bool))
        or (isinstance(value, str) and SECONDS.match(value.strip()))
        or audio_ref(value) is not None
    ):
        return value
    raise PydanticCustomError(
        "frame_ref",
        "{got} is not a frame; write a whole number like 24 or seconds like 2.5s (or {ref} of the scene's audio)",
        {"got": describe(value), "ref": "{beat: 8} or {onset: 3}"},
    )


def _duration(value: Any) -> Any:
    if value is None or parse_duration(value) is not None:
        return value
    raise PydanticCustomError(
        "duration",
        "{got} is not a duration; write seconds greater than 0 like 10s or 10",
        {"got": describe(value)},
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


class SceneFields(_Strict):
    """A whole scene file's fields. Top-level scalars are the values at frame 0 unless a keyframe there sets them.

    Build a :class:`pipeline.scene.core.Scene`, which adds its timeline and checks its rules; these
    are the fields alone, which the rules read.
    """

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

    # Filled in when the scene is built (``Scene``) or loaded (``load_scene``), after the rules pass:
    # where the file is and what its frame refs mean.
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
