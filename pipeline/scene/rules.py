"""The scene rules: what pydantic's types cannot say about a scene, each a located problem.

Names (curves, scheduler, model), the size, the timeline (``pipeline.scene.timeline``) and its
schedules, the noise, modes and input files (``pipeline.scene.inputrules``), LoRA names and tokens,
and the outputs. All run on a typed scene, every problem is reported, and when none is found the
scene gets its timeline::

    problems = check_rules(scene, doc, allow_outside_inputs=False)   # [] and scene.total_frames set

A :class:`~pipeline.scene.core.Scene` runs them when it is built, in code or by the loader (which
gives them the file's positions). Nothing here imports torch or loads a model.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from pipeline.audio.rules import check_audio
from pipeline.audio.timeline import AUDIO_CURVE
from pipeline.outputs.kinds import kind_for_path
from pipeline.plan import curves
from pipeline.scene.inputrules import check_modes_and_files, embedding_token
from pipeline.scene.modelrules import check_model
from pipeline.scene.problems import Problem, shorten
from pipeline.scene.scheduled import bounds, check_schedules
from pipeline.scene.schema import Noise, Output, SceneFields
from pipeline.scene.timeline import MAX_FRAMES, check_timeline
from pipeline.scene.yamlio import YamlDoc
from pipeline.schedulers import scheduler_names


def check_rules(
    scene: SceneFields,
    doc: YamlDoc,
    *,
    allow_outside_inputs: bool,
    removed: set[tuple[Any, ...]] = frozenset(),  # type: ignore[assignment]
) -> list[Problem]:
    """Every scene rule, in file order of concern; sets the scene's timeline when none is broken.

    ``doc`` places the problems; ``removed`` holds the paths of values the loader set aside as badly
    typed (already reported): rules about their absence keep quiet.
    """
    problems: list[Problem] = []

    def gone(*names: str) -> bool:
        """Was a value of this name set aside as badly typed? Then rules about its absence keep quiet."""
        return any(path[0] in names or path[-1] in names for path in removed)

    add = problems.append
    # 0. The soundtrack first: keyframes on its beats become frame numbers here.
    problems += check_audio(scene, doc, gone, allow_outside_inputs=allow_outside_inputs, bounds=bounds)

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
    for at, message in check_model(scene):
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

    # 3. Frames: walk, grid or keyframes, and how long the scene is (pipeline.scene.timeline).
    found, (frames, declared_total, total) = check_timeline(scene, doc, gone=gone, removed=removed)
    problems += found

    if scene._schedules and total <= MAX_FRAMES:
        problems.extend(check_schedules(scene, doc, declared_total, total))

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
        check_modes_and_files(scene, doc, frames, gone, allow_outside_inputs=allow_outside_inputs)
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


def output_kind(out: Output) -> str | None:
    """The kind of an output: given, or from its path (see ``assemble.kind_for_path``); None if unknown."""
    if out.kind:
        return out.kind
    try:
        return kind_for_path(out.path)
    except ValueError:
        return None
