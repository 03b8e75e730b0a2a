"""The rules about a scene's input files: each exists, stays inside the scene's folder and is what
it should be (an image, a depth map with depth in it, learned embeddings, LoRA weights), and every
mode has the images it needs, keyframe by keyframe::

    problems = check_modes_and_files(scene, doc, frames, gone, allow_outside_inputs=False)

What a file holds is read by ``pipeline.scene.inputfiles`` (a header, an image's size), never loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.modes import IMAGES, MODES
from pipeline.scene.inputfiles import (
    embedding_problem,
    image_size,
    is_flat,
    lora_problem,
    path_kind,
    read_weights_header,
)
from pipeline.scene.problems import Problem, shorten
from pipeline.scene.schema import HELD, IMAGE_FIELDS, LearnedEmbedding, SceneFields
from pipeline.scene.yamlio import YamlDoc


def _resolve(scene: SceneFields, relative: str) -> Path | str:
    """``scene.resolve(relative)``, or why the path cannot be resolved (too long, a symlink loop)."""
    try:
        return scene.resolve(relative)
    except (OSError, RuntimeError, ValueError) as exc:
        return f"'{shorten(relative)}' is not a usable path ({getattr(exc, 'strerror', None) or exc})"


def check_modes_and_files(
    scene: SceneFields, doc: YamlDoc, frames: list[int], gone: Any, *, allow_outside_inputs: bool
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
        mode = MODES[st["mode"]]
        # One report per distinct state: a held mode would otherwise be reported at every keyframe.
        state_key = (at, mode.name, st["init_image"], st["mask"])
        if state_key in reported:
            continue
        reported.add(state_key)
        where = f"keyframe {at[1] + 1}" if at[0] == "keyframes" else "the scene"
        for name in mode.needs:
            if not st[name]:
                problems.append(doc.problem(at, f"{where}: mode {mode.name} needs {IMAGES[name].needed}"))
        if mode.same_size:
            first, *others = mode.same_size
            size = sizes.get(st[first] or "")
            for other in others:
                other_size = sizes.get(st[other] or "")
                if size and other_size and size != other_size:
                    problems.append(
                        doc.problem(
                            at,
                            f"{where}: the {IMAGES[other].noun} '{st[other]}' is {other_size[0]}x{other_size[1]} "
                            f"but the {IMAGES[first].noun} '{st[first]}' is {size[0]}x{size[1]}; "
                            "they must be the same size",
                        )
                    )
    if MODES[scene.mode].chains and (scene.walk is not None or scene.grid is not None):
        problems.append(
            doc.problem(
                ("mode",), f"mode {scene.mode} chains frames in time; it does not apply to a grid or walk"
            )
        )
    return problems


def embedding_token(scene: SceneFields, emb: LearnedEmbedding) -> str | None:
    """The token a learned embedding adds: its 'token', else the name of the file's one tensor."""
    if emb.token:
        return emb.token
    try:
        tensors = read_weights_header(scene.resolve(emb.path))
    except (OSError, RuntimeError, ValueError):
        return None
    return next(iter(tensors)) if isinstance(tensors, dict) and len(tensors) == 1 else None
