"""The scene's audio shapes: ``audio: {path, start}``, a keyframe frame on a beat or onset, and a
value driven by the audio. Pydantic and the standard library only (the scene package imports it)::

    Audio.model_validate({"path": "song.wav", "start": "12.5s"}).start_seconds   # Decimal('12.5')
    audio_ref({"beat": 8})                                                       # ('beat', 8)
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

__all__ = [
    "BANDS",
    "FEATURES",
    "REF_KINDS",
    "Audio",
    "Drive",
    "audio_ref",
    "is_drive",
]

# A keyframe's frame may name the Nth beat or onset after the audio's start (counted from 1).
REF_KINDS: tuple[str, ...] = ("beat", "onset")
# Named frequency bands (Hz) a value may follow; `band: [lo, hi]` gives any other.
BANDS: dict[str, tuple[float, float]] = {
    "bass": (20.0, 250.0),
    "mid": (250.0, 4000.0),
    "treble": (4000.0, 11025.0),
}
# What a value may follow: loudness (RMS), onset strength, or a band's loudness.
FEATURES: tuple[str, ...] = ("rms", "onset", *BANDS)
_SECONDS = re.compile(r"^(\d+(?:\.\d+)?)s?$")
MAX_BAND_HZ = 11025.0  # half the analysis rate (22,050 Hz): nothing above it is heard


def _start(value: Any) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and _SECONDS.match(value.strip()):
        return value
    raise PydanticCustomError(
        "audio_start",
        "{got} is not a time in the song; write seconds from 0, like 12.5s or 12.5",
        {"got": repr(value)[:40]},
    )


class Audio(BaseModel):
    """The soundtrack: a file relative to the scene, and where in it frame 0 falls."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    path: str
    start: Annotated[str | float, BeforeValidator(_start)] = 0.0
    detector: Literal["librosa"] = "librosa"

    @property
    def start_seconds(self) -> Decimal:
        """``start`` as written, in exact decimal seconds."""
        if isinstance(self.start, str):
            m = _SECONDS.match(self.start.strip())
            assert m is not None  # checked by _start
            return Decimal(m.group(1))
        return Decimal(repr(float(self.start)))


def audio_ref(value: Any) -> tuple[str, int] | None:
    """``{beat: 8}`` as ('beat', 8); None when ``value`` is no beat or onset reference."""
    if isinstance(value, dict) and len(value) == 1:
        ((kind, n),) = value.items()
        if kind in REF_KINDS and isinstance(n, int) and not isinstance(n, bool):
            return kind, n
    return None


class Drive(BaseModel):
    """A value that follows the audio: ``min`` where the feature is 0 (silence), ``max`` at its loudest."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    audio: Literal["rms", "onset", "bass", "mid", "treble"] | None = None
    band: (
        Annotated[list[Annotated[float, Field(ge=0, le=MAX_BAND_HZ)]], Field(min_length=2, max_length=2)]
        | None
    ) = None
    min: float
    max: float

    @property
    def feature(self) -> str:
        """The feature's name in the analysis: 'rms', 'onset', or 'band:LO-HI' (Hz)."""
        hz = self.hz
        if hz is not None:
            return f"band:{hz[0]:g}-{hz[1]:g}"
        return "rms" if self.audio is None else self.audio

    @property
    def hz(self) -> tuple[float, float] | None:
        """The band this value follows, or None for rms and onset."""
        if self.band is not None:
            return (self.band[0], self.band[1])
        return BANDS.get(self.audio or "")


def is_drive(value: Any) -> bool:
    """Whether a top-level value is written as an audio-driven value (a mapping with 'audio' or 'band')."""
    return isinstance(value, dict) and ("audio" in value or "band" in value)


def extend_schema(schema: dict[str, Any]) -> None:
    """Add the audio shapes to the scene's JSON Schema (``pipeline.scene.editor_schema``)."""
    defs, props = schema["$defs"], schema["properties"]
    props["audio"]["description"] = (
        "The soundtrack: muxed into MP4 outputs (cut to the animation, from 'start'); its beats and "
        "onsets can place keyframes, and values can follow it (needs librosa: pip install 'sd-scenes[audio]')."
    )
    audio = defs["Audio"]
    audio.pop("title", None)
    for name, text in {
        "path": "The audio file (WAV, FLAC, OGG, MP3...), relative to the scene file.",
        "start": "Where in the song frame 0 falls: seconds like 12.5s (or a number).",
        "detector": "What finds the beats and onsets: librosa.",
    }.items():
        audio["properties"][name].pop("title", None)
        audio["properties"][name]["description"] = text
    audio["properties"]["start"].pop("anyOf", None)
    audio["properties"]["start"]["anyOf"] = [
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": r"^\s*\d+(\.\d+)?s?\s*$"},
    ]
    frame = defs["Keyframe"]["properties"]["frame"]
    frame["description"] += " Or {beat: N} / {onset: N}: the Nth beat or onset of the audio after its start."
    frame["anyOf"] = [c for c in frame["anyOf"] if c.get("type") != "object"] + [
        {
            "type": "object",
            "properties": {kind: {"type": "integer", "minimum": 1}},
            "required": [kind],
            "additionalProperties": False,
            "description": f"the Nth {kind} of the audio after its start",
        }
        for kind in REF_KINDS
    ]
    for holder in (props["curve"], defs["Keyframe"]["properties"]["curve"]):
        holder["description"] += " 'audio': the eased t follows the audio's onset strength."
        holder["anyOf"].insert(0, {"const": "audio", "description": "follows the audio's onset strength"})
    drive = {
        "type": "object",
        "description": "follows the audio: min where it is silent, max at its loudest",
        "properties": {
            "audio": {
                "enum": list(FEATURES),
                "description": "What to follow: loudness (rms), onset strength, or a band (bass, mid, treble).",
            },
            "band": {
                "type": "array",
                "items": {"type": "number", "minimum": 0, "maximum": MAX_BAND_HZ},
                "minItems": 2,
                "maxItems": 2,
                "description": "Instead of 'audio': the loudness of this band, [LO, HI] in Hz.",
            },
            "min": {"type": "number", "description": "The value where the audio is silent."},
            "max": {"type": "number", "description": "The value at the audio's loudest moment."},
        },
        "required": ["min", "max"],
        "additionalProperties": False,
    }
    defs["AudioDrive"] = drive
    for name in ("guidance", "strength", "zoom", "angle", "translate_x", "translate_y"):
        props[name]["anyOf"].append({"$ref": "#/$defs/AudioDrive"})
