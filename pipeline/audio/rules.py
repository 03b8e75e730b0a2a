"""The scene's audio, checked and resolved when the scene loads (before any model): the file plays,
keyframes on beats become frame numbers, and audio-driven values become per-frame values::

    drives, problems = take_drives(doc, SCALARS)     # before validation, like schedule strings
    problems += check_audio(scene, doc, gone, allow_outside_inputs=False, bounds=_bounds)
    drive_values(scene)                              # {'zoom': [(0, 1.0), (1, 1.013), ...]}

Every problem is located (``FILE:LINE:COL``). A keyframe whose beat cannot be placed gets frame -1,
the loader's stand-in for a frame already reported (the one-problem-per-place rule drops the rest).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

from pydantic import ValidationError

from pipeline.audio.analysis import AudioReadError, LibrosaMissing, settings
from pipeline.audio.model import Drive, audio_ref, is_drive
from pipeline.audio.mux import probe
from pipeline.audio.store import cached_analysis
from pipeline.audio.timeline import AUDIO_CURVE, AudioTimeline
from pipeline.scene.inputfiles import path_kind
from pipeline.scene.problems import Problem, shorten
from pipeline.scene.yamlio import YamlDoc
from pipeline.store.records import audio_analysis_key

__all__ = ["check_audio", "drive_place", "drive_values", "take_drives"]

Bounds = Callable[[str], tuple[float | None, float | None, bool]]
_ADD_AUDIO = "add 'audio: {path: song.wav}' to the scene"


def drive_place(name: str) -> tuple[tuple[Any, ...], int | None]:
    """Where an audio-driven value is in the file, and the index of its LoRA: a top-level scalar
    (``zoom``) or a LoRA's scale (named ``loras 2, scale`` in messages, as schedules name it)."""
    if name.startswith("loras ") and name.endswith(", scale"):
        i = int(name[len("loras ") : -len(", scale")]) - 1
        return ("loras", i, "scale"), i
    return (name,), None


def take_drives(doc: YamlDoc, names: Sequence[str]) -> tuple[dict[str, Drive], list[Problem]]:
    """Take the audio-driven values (``zoom: {audio: rms, min: 1, max: 1.05}``, and a LoRA's
    ``scale:`` written so) out of the data before validation; they become per-frame keyframes once
    the scene's length is known."""
    drives: dict[str, Drive] = {}
    problems: list[Problem] = []
    if not isinstance(doc.data, dict):
        return drives, problems
    places: list[tuple[dict[str, Any], str, str]] = [(doc.data, name, name) for name in names]
    loras = doc.data.get("loras")
    for i, item in enumerate(loras if isinstance(loras, list) else []):
        if isinstance(item, dict):
            places.append((item, "scale", f"loras {i + 1}, scale"))
    for holder, key, name in places:
        value = holder.get(key)
        if not is_drive(value):
            continue
        del holder[key]
        at = drive_place(name)[0]
        try:
            drive = Drive.model_validate(value)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            problems.append(
                doc.problem(
                    (*at, *err["loc"][:1]),
                    f"{name}: {where + ': ' if where else ''}{err['msg']}; an audio-driven value is "
                    "{audio: rms|onset|bass|mid|treble, min: A, max: B} or {band: [LO, HI], min: A, max: B} (Hz)",
                )
            )
            continue
        if (drive.audio is None) == (drive.band is None):
            problems.append(
                doc.problem(
                    at,
                    f"{name}: give either 'audio' (rms, onset, bass, mid, treble) or 'band: [LO, HI]'",
                )
            )
        elif drive.band is not None and drive.band[0] >= drive.band[1]:
            problems.append(
                doc.problem(
                    (*at, "band"),
                    f"{name}: band [{drive.band[0]:g}, {drive.band[1]:g}] is empty; write [LO, HI] with LO < HI (Hz)",
                )
            )
        else:
            drives[name] = drive
    return drives, problems


def _sha256(path: Any) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_audio(
    scene: Any, doc: YamlDoc, gone: Callable[..., bool], *, allow_outside_inputs: bool, bounds: Bounds
) -> list[Problem]:
    """Check the soundtrack and everything that uses it; place keyframes on beats and onsets.

    Sets ``scene._audio`` (an :class:`AudioTimeline`) when the scene has a usable ``audio``.
    """
    problems: list[Problem] = []
    add = problems.append
    scene._audio = None
    refs = [(i, ref) for i, kf in enumerate(scene.keyframes) if (ref := audio_ref(kf.frame)) is not None]
    curves_at: list[tuple[Any, ...]] = [("curve",)] if scene.curve.strip() == AUDIO_CURVE else []
    curves_at += [
        ("keyframes", i, "curve")
        for i, kf in enumerate(scene.keyframes)
        if kf.curve is not None and kf.curve.strip() == AUDIO_CURVE
    ]
    drives: dict[str, Drive] = scene._audio_drives

    def unplaced(why: str) -> None:
        for i, (kind, n) in refs:
            add(doc.problem(("keyframes", i, "frame"), f"keyframe {i + 1}: {kind} {n} {why}"))
            scene.keyframes[i].frame = -1

    # 1. Uses of the audio without one.
    if scene.audio is None:
        if gone("audio"):
            unplaced("cannot be placed: the scene's audio is not usable (see above)")
            return problems
        unplaced(f"needs a soundtrack to find it in; {_ADD_AUDIO}")
        for at in curves_at:
            add(
                doc.problem(
                    at, f"curve audio follows the soundtrack's onsets, and the scene has none; {_ADD_AUDIO}"
                )
            )
        for name in drives:
            add(
                doc.problem(
                    drive_place(name)[0], f"{name} follows the audio, and the scene has none; {_ADD_AUDIO}"
                )
            )
        return problems

    # 2. The file (missing, outside the folder, not a file: reported with the other input files).
    rel = scene.audio.path
    full = scene.resolve(rel)
    line = doc.where(("audio", "path"))[0]
    if path_kind(full) != "file" or (
        not allow_outside_inputs and not full.is_relative_to(scene.base_dir.resolve())
    ):
        unplaced(f"cannot be placed: the audio file has a problem (line {line})")
        return problems
    seconds = probe(full)
    if isinstance(seconds, str):
        add(doc.problem(("audio", "path"), f"'{shorten(rel)}': {seconds}"))
        unplaced(f"cannot be placed: the audio file has a problem (line {line})")
        return problems
    start = float(scene.audio.start_seconds)
    if start >= seconds:
        add(
            doc.problem(
                ("audio", "start"),
                f"audio: start {start:g}s is past the end of '{shorten(rel)}', which lasts {seconds:g}s",
            )
        )
        unplaced(f"cannot be placed: the audio starts past its end (line {doc.where(('audio', 'start'))[0]})")
        return problems
    timeline = AudioTimeline(file=rel, sha256=_sha256(full), start=start, fps=scene.fps, duration=seconds)

    # 3. The analysis, when something uses it (muxing alone needs none, and no librosa).
    if refs or curves_at or drives:
        try:
            config = settings([h for d in drives.values() if (h := d.hz) is not None])
            timeline.analysis = cached_analysis(full, timeline.sha256, config)
            timeline.key = audio_analysis_key(timeline.sha256, config)
        except LibrosaMissing as exc:
            what = (
                "keyframes on beats or onsets"
                if refs
                else "curve: audio"
                if curves_at
                else "audio-driven values"
            )
            add(
                doc.problem(
                    ("audio",), f"the scene uses {what}, which need the audio's analysis: {exc}", key=True
                )
            )
            unplaced("cannot be placed without librosa")
            return problems
        except AudioReadError as exc:
            add(doc.problem(("audio", "path"), f"'{shorten(rel)}': {exc}"))
            unplaced(f"cannot be placed: the audio file has a problem (line {line})")
            return problems

    # 4. Keyframes on beats and onsets.
    found: dict[str, list[int]] = {}
    for i, (kind, n) in refs:
        frames = found.setdefault(kind, timeline.ref_frames(kind))
        at = ("keyframes", i, "frame")
        if n < 1:
            add(
                doc.problem(
                    at,
                    f"keyframe {i + 1}: {kind} {n}: {kind}s count from 1 (the first after the audio's start)",
                )
            )
            scene.keyframes[i].frame = -1
        elif n > len(frames):
            add(
                doc.problem(
                    at,
                    f"keyframe {i + 1}: {kind} {n} is past the end: '{shorten(rel)}' has {len(frames)} {kind}s "
                    f"from {start:g}s on",
                )
            )
            scene.keyframes[i].frame = -1
        else:
            scene.keyframes[i].frame = frames[n - 1]

    # 5. Audio-driven values: within the value's bounds, and set in one place.
    for name, drive in drives.items():
        at, lora = drive_place(name)
        low, high, above = bounds(name)
        for edge in ("min", "max"):
            v = getattr(drive, edge)
            if (low is not None and (v < low or (above and v == low))) or (high is not None and v > high):
                allowed = " ".join(
                    part
                    for part in (
                        f"{'over' if above else 'from'} {low:g}" if low is not None else "",
                        f"to {high:g}" if high is not None else "",
                    )
                    if part
                )
                add(doc.problem((*at, edge), f"{name}: {edge} {v:g} is out of bounds; allowed: {allowed}"))
        if scene.walk is not None or scene.grid is not None:
            add(
                doc.problem(
                    at, f"{name}: an audio-driven value sets keyframes, and a walk or grid takes none"
                )
            )
        lora_name = (
            scene.lora_name(scene.loras[lora]) if lora is not None and lora < len(scene.loras) else None
        )
        for i, kf in enumerate(scene.keyframes):
            given = (kf.lora or {}).get(lora_name) if lora_name is not None else getattr(kf, name, None)
            if given is not None:
                add(
                    doc.problem(
                        ("keyframes", i, "lora", lora_name)
                        if lora_name is not None
                        else ("keyframes", i, name),
                        f"keyframe {i + 1}: {name} follows the audio (line {doc.where(at)[0]}); set it in one place",
                    )
                )
    scene._audio = timeline
    return problems


def drive_values(scene: Any) -> dict[str, list[tuple[int, float]]]:
    """Each audio-driven value at every frame: ``min + (max - min) * feature``."""
    timeline: AudioTimeline | None = scene._audio
    out: dict[str, list[tuple[int, float]]] = {}
    if timeline is None or timeline.analysis is None:
        return out
    for name, drive in scene._audio_drives.items():
        feature = timeline.feature_frames(drive.feature, scene.total_frames)
        lo, hi = Decimal(repr(drive.min)), Decimal(repr(drive.max))
        out[name] = [(f, float(lo + (hi - lo) * Decimal(f"{x:.6g}"))) for f, x in enumerate(feature)]
    return out
