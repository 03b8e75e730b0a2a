"""``render.py import FILE``: a Parseq JSON export or a Deforum settings file as a scene YAML.

Both tools write JSON. A Parseq export holds ``rendered_frames`` (every frame's values: ``scale``,
``strength``, ``zoom``, ``angle``, ``translation_x``... and ``deforum_prompt``, ``"positive --neg
negative"``) and ``options`` (``output_fps``). A Deforum settings file holds ``prompts`` (or
``animation_prompts``: ``{"0": "...", "30": "..."}``), schedule strings (``strength_schedule``,
``cfg_scale_schedule``, ``zoom``, ``angle``, ``translation_x``...), ``W``, ``H``, ``fps``, ``seed``,
``max_frames``::

    scene_text, notes = convert(Path("settings.txt"))     # ImportFailed(problem) if it is neither

The values a scene holds are translated; what it cannot hold (3D motion, cadence, colour coherence,
a checkpoint named by the web UI...) is listed in ``notes``. Two conversions are not one to one:
Deforum's ``strength`` is how much of the previous frame is kept, so the scene's (how much a frame
changes) is 1 minus it; and prompts switch at their frame, so each prompt keyframe holds. A Parseq
value given at every frame is written as a schedule of the frames where it bends (linear between).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.scene.inputfiles import read_scene_bytes
from pipeline.scene.problems import Problem, shorten
from pipeline.scene.schedules import EvalError, ScheduleError, parse_schedule, schedule_values

FORMATS = "a Parseq JSON export (with 'rendered_frames') or a Deforum settings file (with 'prompts')"

# Parseq field or Deforum schedule -> the scene's value.
PARSEQ_FIELDS: dict[str, str] = {
    "scale": "guidance",
    "strength": "strength",
    "zoom": "zoom",
    "angle": "angle",
    "translation_x": "translate_x",
    "translation_y": "translate_y",
}
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
# Parseq fields that are bookkeeping, not values.
_PARSEQ_BOOKKEEPING = {"frame", "deforum_prompt", "subseed", "subseed_strength"}


class ImportFailed(Exception):
    """The file is not one of the formats: carries the located problem."""

    def __init__(self, problem: Problem):
        super().__init__(str(problem))
        self.problem = problem


def convert(path: Path, shown: str | None = None) -> tuple[str, list[str]]:
    """The scene YAML for a Parseq export or Deforum settings file, and what it could not carry over."""
    shown = shown or str(path)
    if not path.is_file():
        what = "not found" if not path.exists() else "not a regular file"
        raise ImportFailed(Problem(shown, 1, 1, f"{what}; expected {FORMATS}"))
    raw = read_scene_bytes(path, shown)  # at most 64 MiB, read once
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise ImportFailed(Problem(shown, 1, 1, f"the file is not UTF-8 text; expected {FORMATS}")) from None
    except json.JSONDecodeError as exc:
        raise ImportFailed(
            Problem(shown, exc.lineno, exc.colno, f"not JSON ({exc.msg}); expected {FORMATS}")
        ) from None
    except RecursionError:
        raise ImportFailed(
            Problem(shown, 1, 1, f"the JSON is nested too deeply; expected {FORMATS}")
        ) from None
    if isinstance(data, dict) and isinstance(data.get("rendered_frames"), list):
        scene, notes = _from_parseq(data, shown, raw)
        source = "Parseq export"
    elif isinstance(data, dict) and any(k in data for k in ("prompts", "animation_prompts", "max_frames")):
        scene, notes = _from_deforum(data, shown, raw)
        source = "Deforum settings"
    else:
        what = "a JSON object" if isinstance(data, dict) else f"JSON {type(data).__name__}"
        raise ImportFailed(
            Problem(
                shown,
                1,
                1,
                f"{what} with neither 'rendered_frames' nor 'prompts'; expected {FORMATS}",
            )
        )
    header = [
        f"# Imported from the {source} {Path(shown).name} by render.py import.",
        "# Not carried over:" + ("" if notes else " nothing."),
        *[f"#  - {note}" for note in notes],
    ]
    body = yaml.safe_dump(scene, sort_keys=False, allow_unicode=True, width=1000)
    return "\n".join(header) + "\n" + body, notes


def _where(raw: bytes, key: str) -> tuple[int, int]:
    """Line and column of the first ``"key"`` in the file (JSON keeps no positions): for messages."""
    at = raw.find(json.dumps(key).encode())
    if at < 0:
        return (1, 1)
    return (raw.count(b"\n", 0, at) + 1, at - (raw.rfind(b"\n", 0, at) + 1) + 1)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _compact(value: float) -> float | int:
    """A value as short as it can be written (7.0 -> 7)."""
    rounded = round(value, 10)
    return int(rounded) if rounded == int(rounded) and abs(rounded) < 2**53 else rounded


def _bends(values: Sequence[float]) -> list[int]:
    """The frames of a per-frame series where its slope changes (and the first and last): linear
    interpolation between them gives the series back."""
    keep = [0]
    for n in range(1, len(values) - 1):
        before, after = values[n] - values[n - 1], values[n + 1] - values[n]
        if abs(after - before) > 1e-9 * max(1.0, abs(values[n])):
            keep.append(n)
    if len(values) > 1:
        keep.append(len(values) - 1)
    return keep


def _series_value(values: Sequence[float]) -> float | int | str:
    """A per-frame series as one number, or a schedule string of the frames where it bends."""
    if all(v == values[0] for v in values):
        return _compact(values[0])
    return ", ".join(f"{n}:({_compact(values[n])})" for n in _bends(values))


def _split_prompt(text: str) -> tuple[list[dict[str, Any]] | str, str]:
    """Deforum's prompt ``"a dog: 1 AND a cat: 0.5 --neg blurry"``: (prompt or blend, negative)."""
    positive, _, negative = text.partition("--neg")
    parts = [p.strip() for p in positive.split(" AND ")]
    blend: list[dict[str, Any]] = []
    for part in parts:
        body, sep, weight = part.rpartition(":")
        w = None
        if sep:
            try:
                w = float(weight)
            except ValueError:
                w = None
        if w is None:
            blend.append({"text": part, "weight": 1.0})
        elif w > 0 and math.isfinite(w):
            blend.append({"text": body.strip(), "weight": _compact(w)})
    negative = negative.strip()
    if len(blend) == 1 and blend[0]["weight"] == 1.0:
        return blend[0]["text"], negative
    return blend or parts[0], negative


def _prompt_keyframes(prompts: list[tuple[int, str]], negative_top: str) -> tuple[list[dict[str, Any]], str]:
    """Keyframes for prompts that switch at their frames (each holds until the next)."""
    split = [(frame, *_split_prompt(text)) for frame, text in prompts]
    negatives = {neg for _, _, neg in split}
    common = negatives.pop() if len(negatives) == 1 else None
    top = " ".join(x for x in (common or "", negative_top) if x)
    keyframes: list[dict[str, Any]] = []
    last: tuple[Any, Any] | None = None
    for frame, prompt, neg in split:
        if last == (prompt, neg):
            continue
        kf: dict[str, Any] = {"frame": frame, "prompt": prompt}
        if common is None:
            kf["negative_prompt"] = " ".join(x for x in (neg, negative_top) if x)
        kf["hold"] = True
        keyframes.append(kf)
        last = (prompt, neg)
    if keyframes:
        keyframes[-1].pop("hold")
    return keyframes, top


# ---------------------------------------------------------------------------------------------
# Parseq


def _from_parseq(data: dict[str, Any], shown: str, raw: bytes) -> tuple[dict[str, Any], list[str]]:
    frames = [f for f in data["rendered_frames"] if isinstance(f, dict)]
    rows: dict[int, dict[str, Any]] = {}
    for row in frames:
        n = row.get("frame")
        if isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 1_000_000:
            rows[n] = row
    if not rows:
        line, col = _where(raw, "rendered_frames")
        raise ImportFailed(
            Problem(
                shown,
                line,
                col,
                "rendered_frames holds no frames with a 'frame' number; export again from Parseq",
            )
        )
    total = max(rows) + 1
    ordered: list[dict[str, Any]] = []
    for n in range(total):
        ordered.append(rows.get(n) or (ordered[-1] if ordered else rows[min(rows)]))
    notes: list[str] = []
    if len(rows) != total:
        notes.append(f"frames missing from rendered_frames ({total - len(rows)}) take the frame before them")
    options = data.get("options") if isinstance(data.get("options"), dict) else {}
    scene: dict[str, Any] = {}
    fps = _number(options.get("output_fps"))
    if fps and 0.01 <= fps <= 240:
        scene["fps"] = _compact(fps)
    scene["frames"] = total
    scene["mode"] = "feedback"
    notes.append(
        "size is not in a Parseq export: the scene uses 512x512 (set size: to the size you rendered)"
    )
    carried: set[str] = set(_PARSEQ_BOOKKEEPING)
    for field, name in PARSEQ_FIELDS.items():
        # Deforum uses Parseq's per-frame deltas for motion by default (parseq_use_deltas): the
        # scene's zoom, angle and translation are per frame too.
        key = f"{field}_delta" if name in ("zoom", "angle", "translate_x", "translate_y") else field
        if key not in ordered[0]:
            key = field
        values = [_number(r.get(key)) for r in ordered]
        carried |= {field, f"{field}_delta", f"{field}_pc"}
        if any(v is None for v in values):
            if any(v is not None for v in values):
                notes.append(f"{field}: not a number at every frame, left out")
            continue
        numbers = [v for v in values if v is not None]
        if name == "strength":
            numbers = [1 - v for v in numbers]
        scene[name] = _series_value(numbers)
    seeds = [_number(r.get("seed")) for r in ordered]
    carried |= {"seed", "seed_delta", "seed_pc"}
    if all(s is not None for s in seeds):
        _seeds(scene, [s for s in seeds if s is not None], notes)
    prompts = [
        (n, r["deforum_prompt"]) for n, r in enumerate(ordered) if isinstance(r.get("deforum_prompt"), str)
    ]
    keyframes, negative = _prompt_keyframes(prompts, "")
    if negative:
        scene["negative_prompt"] = negative
    if not keyframes:
        keyframes = [{"frame": 0, "prompt": ""}]
        notes.append("no deforum_prompt in rendered_frames: the prompt is empty")
    if any(isinstance(k["prompt"], list) for k in keyframes):
        notes.append("several prompts at once ('A AND B', composable diffusion) are blended as embeddings")
    scene["keyframes"] = keyframes
    others = sorted(
        k
        for k in ordered[0]
        if k not in carried
        and not k.endswith(("_delta", "_pc"))
        and len({repr(r.get(k)) for r in ordered}) > 1
    )
    if others:
        notes.append(f"values that change and that a scene has no place for: {', '.join(others)}")
    return scene, notes


def _seeds(scene: dict[str, Any], seeds: list[float], notes: list[str]) -> None:
    first = int(seeds[0])
    if first < 0:
        notes.append("seed -1 (random) is seed 0 here: a scene's frames are reproducible")
        first = 0
    if all(s == seeds[0] for s in seeds):
        scene["seed"] = first
    elif all(s == seeds[0] + n for n, s in enumerate(seeds)):
        scene["seed"] = first
        scene["noise"] = "per_frame"
    else:
        scene["seed"] = first
        notes.append("the seed changes in other ways than +1 a frame: the scene keeps one seed")


# ---------------------------------------------------------------------------------------------
# Deforum


def _from_deforum(data: dict[str, Any], shown: str, raw: bytes) -> tuple[dict[str, Any], list[str]]:
    notes: list[str] = []
    scene: dict[str, Any] = {}
    width, height = _number(data.get("W")), _number(data.get("H"))
    if width and height:
        size = [max(8, int(width) // 8 * 8), max(8, int(height) // 8 * 8)]
        if size != [int(width), int(height)]:
            notes.append(f"size {int(width)}x{int(height)} is rounded down to multiples of 8")
        scene["size"] = size
    steps = _number(data.get("steps"))
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
    fps = _number(data.get("fps"))
    if fps and 0.01 <= fps <= 240:
        scene["fps"] = _compact(fps)
    total = _number(data.get("max_frames"))
    total = int(total) if total and 1 <= total <= 1_000_000 else None
    if total:
        scene["frames"] = total
    mode = data.get("animation_mode", "2D")
    scene["mode"] = "txt2img" if mode in ("None", "Interpolation") else "feedback"
    if mode not in ("2D", "3D", "None", "Interpolation"):
        notes.append(f"animation_mode '{shorten(str(mode), 30)}' is rendered as 2D feedback")
    elif mode == "3D":
        notes.append("animation_mode 3D is rendered as 2D feedback (zoom, angle, translation_x/y)")
    seed = _number(data.get("seed"))
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
        if value is None and name == "strength" and _number(data.get("strength")) is not None:
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
    keyframes, top_negative = _prompt_keyframes(
        prompts, negative.strip() if isinstance(negative, str) else ""
    )
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
    if _number(value) is not None:
        number = float(value)
        return _compact(1 - number if name == "strength" else number)
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
            text = str(_compact(1 - p.number)) if p.number is not None else f"1 - ({text})"
        elif p.number is not None:
            text = str(_compact(p.number))
        parts.append(f"{p.frame}:({text})")
    result = ", ".join(parts)
    try:
        seed = _number(data.get("seed")) or 0
        schedule_values(
            parse_schedule(result),
            total or points[-1].frame + 1,
            names={"max_f": (total or 1) - 1, "s": seed},
        )
    except (ScheduleError, EvalError) as exc:
        notes.append(f"{key}: '{shorten(value, 40)}' fails here ({exc.message}), left out")
        return None
    if len(points) == 1 and points[0].number is not None:
        return _compact(float(parts[0].split(":(")[1][:-1]))
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
        line, col = _where(raw, "prompts" if "prompts" in data else "animation_prompts")
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
        line, col = _where(raw, "prompts" if "prompts" in data else "animation_prompts")
        raise ImportFailed(Problem(shown, line, col, "no prompt at a frame of the animation"))
    return sorted(out)
