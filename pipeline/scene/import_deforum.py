"""A Deforum settings file as a scene (``render.py import``, ``pipeline.scene.importer``).

A Deforum settings file holds ``prompts`` (or ``animation_prompts``: ``{"0": "...", "30": "..."}``),
schedule strings (``strength_schedule``, ``cfg_scale_schedule``, ``zoom``, ``angle``,
``translation_x``...), ``W``, ``H``, ``fps``, ``seed``, ``max_frames``. Deforum's ``strength`` is how
much of the previous frame is kept, so the scene's (how much a frame changes) is 1 minus it; prompts
switch at their frame, so each prompt keyframe holds::

    scene, notes = from_deforum(data, "settings.txt", raw)   # a scene as plain data, what it left out
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.scene.import_common import (
    ImportFailed,
    as_number,
    compact,
    prompt_keyframes,
    where,
)
from pipeline.scene.problems import Problem, shorten
from pipeline.scene.schedules import EvalError, ScheduleError, parse_schedule, schedule_values

# Deforum schedule -> the scene's value.
DEFORUM_SCHEDULES: dict[str, str] = {
    "cfg_scale_schedule": "guidance",
    "strength_schedule": "strength",
    "zoom": "zoom",
    "angle": "angle",
    "translation_x": "translate_x",
    "translation_y": "translate_y",
}
# Deforum's sampler names (the web UI's) -> the scene's scheduler.
SAMPLERS: dict[str, str] = {
    "euler": "euler",
    "euler a": "euler_ancestral",
    "euler_ancestral": "euler_ancestral",
    "heun": "heun",
    "lms": "lms",
    "ddim": "ddim",
    "plms": "pndm",
    "dpm++ 2m": "dpmpp_2m",
    "dpm++ 2m karras": "dpmpp_2m_karras",
    "unipc": "unipc",
}
# Deforum settings that change the pictures and that a scene cannot hold (noted when not neutral).
DEFORUM_NOT_CARRIED: dict[str, Any] = {
    "translation_z": None,
    "rotation_3d_x": None,
    "rotation_3d_y": None,
    "rotation_3d_z": None,
    "noise_schedule": None,
    "contrast_schedule": "0: (1.0)",
    "diffusion_cadence": 1,
    "color_coherence": "None",
    "perspective_flip_theta": None,
    "perspective_flip_phi": None,
    "perspective_flip_gamma": None,
    "steps_schedule": None,
    "sampler_schedule": None,
    "subseed_schedule": None,
    "use_init": False,
    "hybrid_composite": "None",
}


def from_deforum(data: dict[str, Any], shown: str, raw: bytes) -> tuple[dict[str, Any], list[str]]:
    notes: list[str] = []
    scene: dict[str, Any] = {}
    width, height = as_number(data.get("W")), as_number(data.get("H"))
    if width and height:
        size = [max(8, int(width) // 8 * 8), max(8, int(height) // 8 * 8)]
        if size != [int(width), int(height)]:
            notes.append(f"size {int(width)}x{int(height)} is rounded down to multiples of 8")
        scene["size"] = size
    steps = as_number(data.get("steps"))
    if steps and 1 <= steps <= 1000:
        scene["steps"] = int(steps)
    sampler = data.get("sampler")
    if isinstance(sampler, str):
        if sampler.lower() in SAMPLERS:
            scene["scheduler"] = SAMPLERS[sampler.lower()]
        else:
            notes.append(
                f"sampler '{shorten(sampler, 40)}' has no scheduler of that name here: the model's own is used"
            )
    fps = as_number(data.get("fps"))
    if fps and 0.01 <= fps <= 240:
        scene["fps"] = compact(fps)
    total = as_number(data.get("max_frames"))
    total = int(total) if total and 1 <= total <= 1_000_000 else None
    if total:
        scene["frames"] = total
    mode = data.get("animation_mode", "2D")
    scene["mode"] = "txt2img" if mode in ("None", "Interpolation") else "feedback"
    if mode not in ("2D", "3D", "None", "Interpolation"):
        notes.append(f"animation_mode '{shorten(str(mode), 30)}' is rendered as 2D feedback")
    elif mode == "3D":
        notes.append("animation_mode 3D is rendered as 2D feedback (zoom, angle, translation_x/y)")
    seed = as_number(data.get("seed"))
    behaviour = data.get("seed_behavior", "iter")
    if seed is not None:
        if seed < 0:
            notes.append("seed -1 (random) is seed 0 here: a scene's frames are reproducible")
        scene["seed"] = max(0, int(seed))
    if scene["mode"] == "feedback" or behaviour == "iter":
        if behaviour == "iter":
            scene["noise"] = "per_frame"
        elif behaviour != "fixed":
            notes.append(f"seed_behavior '{shorten(str(behaviour), 30)}' is a fixed seed here")
    # Values: Deforum schedules, or older single numbers ('scale', 'strength').
    for key, name in DEFORUM_SCHEDULES.items():
        value = data.get(key)
        if value is None and name == "guidance":
            value = data.get("scale")
        if value is None and name == "strength" and as_number(data.get("strength")) is not None:
            value = data.get("strength")
        if value is None:
            continue
        converted = _deforum_value(key, name, value, total, data, notes)
        if converted is not None:
            scene[name] = converted
    prompts = _deforum_prompts(data, shown, raw, total, notes)
    suffix = data.get("animation_prompts_positive")
    if isinstance(suffix, str) and suffix.strip():
        scene["prompt_suffix"] = suffix.strip()
    negative = data.get("animation_prompts_negative")
    keyframes, top_negative = prompt_keyframes(prompts, negative.strip() if isinstance(negative, str) else "")
    if top_negative:
        scene["negative_prompt"] = top_negative
    if any(isinstance(k["prompt"], list) for k in keyframes):
        notes.append("several prompts at once ('A AND B', composable diffusion) are blended as embeddings")
    scene["keyframes"] = keyframes
    for key, neutral in DEFORUM_NOT_CARRIED.items():
        value = data.get(key)
        if value is None or value == neutral:
            continue
        # Deforum itself ignores these unless they are switched on.
        if (key.startswith(("translation_z", "rotation_3d")) and mode != "3D") or (
            key == "steps_schedule" and not data.get("enable_steps_scheduling")
        ):
            continue
        if key.startswith("perspective_flip") and not data.get("enable_perspective_flip"):
            continue
        if isinstance(value, str) and _is_flat_zero(value):
            continue
        notes.append(f"{key}: {shorten(str(value), 40)}")
    for key in ("sd_model_name", "sd_model_checkpoint"):
        if isinstance(data.get(key), str) and data[key]:
            notes.append(f"the checkpoint '{shorten(data[key], 60)}': set model: to it (the scene uses tiny)")
            break
    return scene, notes


def _is_flat_zero(schedule: str) -> bool:
    """A schedule that is 0 everywhere ('0: (0)'): a value left at its neutral setting."""
    try:
        points = parse_schedule(schedule)
    except ScheduleError:
        return False
    return all(p.number == 0 for p in points)


def _deforum_value(
    key: str, name: str, value: Any, total: int | None, data: dict[str, Any], notes: list[str]
) -> float | int | str | None:
    """A Deforum schedule (or number) as the scene's value; None, with a note, if it cannot be."""
    if as_number(value) is not None:
        number = float(value)
        return compact(1 - number if name == "strength" else number)
    if not isinstance(value, str):
        notes.append(f"{key}: not a schedule, left out")
        return None
    try:
        points = parse_schedule(value)
    except ScheduleError as exc:
        notes.append(
            f"{key}: '{shorten(value, 40)}' is not a schedule this tool reads ({exc.message}), left out"
        )
        return None
    if total:
        dropped = [p.frame for p in points if p.frame >= total]
        points = [p for p in points if p.frame < total]
        if dropped:
            notes.append(f"{key}: points past max_frames ({', '.join(map(str, dropped[:5]))}) left out")
        if not points:
            return None
    parts = []
    for p in points:
        text = p.text.strip()
        if name == "strength":
            text = str(compact(1 - p.number)) if p.number is not None else f"1 - ({text})"
        elif p.number is not None:
            text = str(compact(p.number))
        parts.append(f"{p.frame}:({text})")
    result = ", ".join(parts)
    try:
        seed = as_number(data.get("seed")) or 0
        schedule_values(
            parse_schedule(result),
            total or points[-1].frame + 1,
            names={"max_f": (total or 1) - 1, "s": seed},
        )
    except (ScheduleError, EvalError) as exc:
        notes.append(f"{key}: '{shorten(value, 40)}' fails here ({exc.message}), left out")
        return None
    if len(points) == 1 and points[0].number is not None:
        return compact(float(parts[0].split(":(")[1][:-1]))
    return result


def _deforum_prompts(
    data: dict[str, Any], shown: str, raw: bytes, total: int | None, notes: list[str]
) -> list[tuple[int, str]]:
    prompts = data.get("prompts", data.get("animation_prompts"))
    if isinstance(prompts, str):
        try:
            prompts = json.loads(prompts)
        except json.JSONDecodeError:
            prompts = None
    if not isinstance(prompts, dict) or not prompts:
        line, col = where(raw, "prompts" if "prompts" in data else "animation_prompts")
        raise ImportFailed(
            Problem(
                shown, line, col, 'the prompts are not a mapping of frames to prompts, like {"0": "a dog"}'
            )
        )
    out: list[tuple[int, str]] = []
    for frame, text in prompts.items():
        try:
            n = int(str(frame).strip())
        except ValueError:
            notes.append(f"prompt at '{shorten(str(frame), 20)}': a frame written as a formula, left out")
            continue
        if not isinstance(text, str) or n < 0:
            continue
        if total is not None and n >= total:
            notes.append(f"the prompt at frame {n} is past max_frames, left out")
            continue
        out.append((n, text))
    if not out:
        line, col = where(raw, "prompts" if "prompts" in data else "animation_prompts")
        raise ImportFailed(Problem(shown, line, col, "no prompt at a frame of the animation"))
    return sorted(out)
