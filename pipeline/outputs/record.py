"""The record a render leaves beside its outputs: what made them, frame by frame.

Everything here is read from the scene, the plan and the environment after planning, and nothing
here is ever fed back into the planner: a record cannot change a frame key::

    rows = frame_rows(plan)                      # one dict per frame: key, prompt mix, noise, scalars
    resolved_scene(scene)                        # the scene with every default filled in (a dict)
    write_record(out_dir, scene, env, ref, plan, targets, command="render.py scenes/dog_cat.yaml")

Files (``NAME`` is the scene's name): ``NAME.record.json`` (model fingerprint, library versions,
command, input hashes, outputs), ``NAME.scene.yaml`` (the resolved scene; load it back from the
scene's folder and it plans the same keys), ``NAME.frames.json`` and ``NAME.frames.csv`` (the
per-frame table) and, per MP4 output, an SRT of the same name with each frame's parameters as a
subtitle (Deforum's convention: one cue per frame, ``F#: 12; Seed: 42; ...``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import shlex
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from decimal import Decimal
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from pipeline.outputs import sequences
from pipeline.outputs.files import atomic_output
from pipeline.plan.planner import FrameJob, Plan
from pipeline.plan.recipe import Blend
from pipeline.scene.core import Scene
from pipeline.scene.rules import output_kind
from pipeline.scene.schema import SCALARS

RECORD_VERSION = 1
# Distributions whose versions a record lists (read from package metadata: nothing is imported).
LIBRARIES: tuple[str, ...] = (
    "sd-scenes",
    "torch",
    "diffusers",
    "transformers",
    "tokenizers",
    "safetensors",
    "numpy",
    "pillow",
    "imageio",
    "imageio-ffmpeg",
    "pydantic",
    "pyyaml",
)
# The fixed columns of the per-frame table; scalars (and LoRA scales, as lora:NAME) follow.
COLUMNS: tuple[str, ...] = (
    "frame",
    "key",
    "mode",
    "prompt",
    "prompt_t",
    "negative_prompt",
    "seed",
    "seed_to",
    "noise_t",
)


def record_names(scene: Scene) -> dict[str, str]:
    """The record's file names (in the output folder), by what they hold."""
    name = scene.name
    return {
        "record": f"{name}.record.json",
        "scene": f"{name}.scene.yaml",
        "frames_json": f"{name}.frames.json",
        "frames_csv": f"{name}.frames.csv",
    }


# --------------------------------------------------------------------------------------------
# Per-frame rows


def _mix(plan: Plan, parts: Blend) -> list[dict[str, Any]]:
    return [{"text": plan.text(key), "weight": weight} for key, weight in parts]


def describe_mix(mix: list[dict[str, Any]]) -> str:
    """A prompt blend in one line: ``a dog`` or ``a dog×2 + a wolf×1``."""
    if len(mix) == 1:
        return str(mix[0]["text"])
    return " + ".join(f"{p['text']}×{p['weight']:g}" for p in mix)


def frame_row(plan: Plan, job: FrameJob) -> dict[str, Any]:
    """One frame's parameters, as plain JSON: what its recipe says, with prompts as text.

    ``prompt`` is ``{"a": mix}``, ``{"a", "b", "t", "method"}`` between two keyframes,
    ``{"grid": [4 corners], "u", "v"}`` in a grid and ``{"a", "walk_offset"}`` in a walk; a mix is
    ``[{"text", "weight"}]``. ``noise`` is the recipe's (``seed``; ``seed``, ``to``, ``t`` for seed
    travel; ``circle``, ``s``). ``scalars`` are the values the frame's mode uses.
    """
    r = job.view
    cond = r.cond
    kind = cond.kind
    prompt: dict[str, Any]
    if kind == "grid":
        prompt = {"grid": [plan.text(k) for k in cond.corners], "u": cond.u, "v": cond.v}
    elif kind == "walk":
        prompt = {"a": _mix(plan, cond.a), "walk_offset": cond.walk_offset}
    elif kind == "morph":
        assert cond.b is not None
        prompt = {"a": _mix(plan, cond.a), "b": _mix(plan, cond.b), "t": cond.t, "method": cond.method}
    else:
        prompt = {"a": _mix(plan, cond.a)}
    row: dict[str, Any] = {
        "frame": job.frame,
        "key": job.key,
        "mode": r.mode.name,
        "prompt": prompt,
        "noise": dict(r.noise.raw),
        "scalars": dict(r.all_scalars),
    }
    neg = r.neg
    if neg is not None:  # absent where guidance <= 1: the negative prompt cannot count there
        row["negative_prompt"] = (
            {"a": _mix(plan, neg.a), "b": _mix(plan, neg.b), "t": neg.t}
            if neg.b is not None
            else {"a": _mix(plan, neg.a)}
        )
    return row


def frame_rows(plan: Plan) -> list[dict[str, Any]]:
    """:func:`frame_row` for every frame of the plan."""
    return [frame_row(plan, job) for job in plan]


def flat(row: dict[str, Any]) -> dict[str, Any]:
    """A row as one level of named values: the CSV's columns, the SRT's and the plot's values."""
    prompt, noise = row["prompt"], row["noise"]
    out: dict[str, Any] = {"frame": row["frame"], "key": row["key"], "mode": row["mode"]}
    if "grid" in prompt:
        out["prompt"] = f"grid u={prompt['u']:g} v={prompt['v']:g}"
        out["grid_u"], out["grid_v"] = prompt["u"], prompt["v"]
    elif "walk_offset" in prompt:
        out["prompt"] = describe_mix(prompt["a"])
        out["walk_offset"] = prompt["walk_offset"]
    elif "b" in prompt:
        out["prompt"] = f"{describe_mix(prompt['a'])} → {describe_mix(prompt['b'])}"
        out["prompt_t"] = prompt["t"]
    else:
        out["prompt"] = describe_mix(prompt["a"])
        out["prompt_t"] = 0.0
    neg = row.get("negative_prompt")
    if neg is not None:
        text = describe_mix(neg["a"])
        out["negative_prompt"] = f"{text} → {describe_mix(neg['b'])} @{neg['t']:g}" if "b" in neg else text
    if "circle" in noise:
        out["seed"], out["seed_to"] = noise["circle"]
        out["noise_t"] = noise["s"]
    else:
        out["seed"] = noise["seed"]
        if "to" in noise:
            out["seed_to"], out["noise_t"] = noise["to"], noise["t"]
        else:
            out["noise_t"] = 0.0
    for name, value in row["scalars"].items():
        if isinstance(value, dict):  # LoRA scales
            out.update((f"lora:{lora}", scale) for lora, scale in value.items())
        else:
            out[name] = value
    return out


def table_columns(flat_rows: Iterable[dict[str, Any]]) -> list[str]:
    """The columns of a table of flat rows: the fixed ones, then every other value in a stable order."""
    extra: dict[str, None] = {}
    for r in flat_rows:
        extra.update(dict.fromkeys(k for k in r if k not in COLUMNS))
    order = {name: i for i, name in enumerate((*SCALARS, "grid_u", "grid_v", "walk_offset"))}
    return [*COLUMNS, *sorted(extra, key=lambda k: (order.get(k, len(order)), k))]


def frames_csv(flat_rows: list[dict[str, Any]]) -> str:
    """The per-frame table as CSV (empty cells where a frame has no such value)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=table_columns(flat_rows), lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat_rows)
    return buffer.getvalue()


def parameters_line(values: dict[str, Any]) -> str:
    """A frame's parameters in one line, as Deforum writes them into its SRT: ``F#: 3; Seed: 7; ...``."""
    parts = [f"F#: {values['frame']}", f"Seed: {values['seed']}"]
    if "seed_to" in values:
        parts.append(f"Seed to: {values['seed_to']} @{values['noise_t']:g}")
    skip = {"frame", "key", "mode", "prompt", "prompt_t", "negative_prompt", "seed", "seed_to", "noise_t"}
    parts += [f"{k}: {v:g}" for k, v in values.items() if k not in skip]
    if values["mode"] != "txt2img":
        parts.append(f"Mode: {values['mode']}")
    prompt = values["prompt"]
    if values.get("prompt_t"):
        prompt = f"{prompt} @{values['prompt_t']:g}"
    parts.append(f"Prompt: {prompt}")
    if values.get("negative_prompt"):
        parts.append(f"Negative: {values['negative_prompt']}")
    return "; ".join(parts)


def _srt_time(seconds: Decimal) -> str:
    millis = int((seconds * 1000).to_integral_value())
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d},{millis:03d}"


def srt(lines: Sequence[str], fps: float) -> str:
    """One SubRip cue per frame, numbered from 1, each lasting one frame (times in exact decimals, so
    a long video does not drift)."""
    step = Decimal(1) / Decimal(repr(float(fps)))
    cues = [
        f"{i + 1}\n{_srt_time(step * i)} --> {_srt_time(step * (i + 1))}\n{line}\n"
        for i, line in enumerate(lines)
    ]
    return "\n".join(cues)


def png_texts(row: dict[str, Any], values: dict[str, Any]) -> dict[str, str]:
    """The PNG text chunks of one frame: ``parameters`` (the SRT's line) and ``sd-scenes`` (the row as JSON)."""
    return {
        "Software": "sd-scenes",
        "parameters": parameters_line(values),
        "sd-scenes": json.dumps(row, ensure_ascii=False, sort_keys=True),
    }


# --------------------------------------------------------------------------------------------
# The resolved scene


def resolved_scene(scene: Scene, *, model: str | None = None) -> dict[str, Any]:
    """The scene as rendered, with every default written out, as a plain dict.

    Loaded back from the scene's folder it plans the same keys (tests/test_record.py checks the
    examples). So a value the scene never writes at the top level while a keyframe sets it is left
    out: there the built-in default does not count (the first keyframe's value holds before it), and
    writing it would ease from it. Keyframe frames are numbers (``2.5s`` resolved), ``duration``
    becomes ``frames``, outputs are listed with their kind and fps, and ``model`` is the one used
    (``--model``, made absolute if it is a folder). Input paths stay as written: relative to the
    scene's folder.
    """
    data: dict[str, Any] = scene.model_dump(mode="json", exclude_none=True)
    written = scene.model_fields_set
    keyframes = scene.keyframes
    keyed = {name for kf in keyframes for name in kf.model_fields_set if getattr(kf, name) is not None}
    for name in ("negative_prompt", *SCALARS):
        if name in keyed and name not in written:
            data.pop(name, None)
    if scene.noise.kind == "travel" and "seed" not in written and scene.noise.seed is None:
        data.pop("seed", None)
    if model is not None:
        data["model"] = str(Path(model).resolve()) if Path(model).is_dir() else model
    data.pop("duration", None)
    if scene.walk is None and scene.grid is None:
        # Placed where it is in the README's table: after fps.
        data = {k: v for k, v in data.items() if k != "frames"}
        at = list(data).index("fps") + 1
        items = list(data.items())
        data = dict([*items[:at], ("frames", scene.total_frames), *items[at:]])
    lora_keyed = {name for kf in keyframes for name in (kf.lora or {})}
    data["loras"] = []
    for lora in scene.loras:
        entry = lora.model_dump(mode="json", exclude_none=True)
        entry["name"] = scene.lora_name(lora)
        if entry["name"] in lora_keyed and "scale" not in lora.model_fields_set:
            entry.pop("scale")
        data["loras"].append(entry)
    data["keyframes"] = [
        {
            **kf.model_dump(mode="json", exclude_none=True, exclude={"hold"} if not kf.hold else set()),
            "frame": frame,
        }
        for kf, frame in zip(keyframes, scene.keyframe_frames, strict=True)
    ]
    if not data["keyframes"]:
        del data["keyframes"]
    outputs = []
    for out in scene.effective_outputs():
        entry = out.model_dump(mode="json", exclude_none=True)
        entry["kind"] = output_kind(out)
        entry["fps"] = out.fps or scene.fps
        outputs.append(entry)
    data["outputs"] = outputs
    return data


def scene_yaml(scene: Scene, *, model: str | None = None) -> str:
    """The resolved scene as YAML text, with a header that says what it is."""
    header = (
        f"# {record_names(scene)['scene']}: {scene.path.name} as rendered, every default filled in.\n"
        f"# Paths are relative to the scene's folder ({scene.base_dir}): copy this file there to render it again.\n"
    )
    body = yaml.safe_dump(resolved_scene(scene, model=model), sort_keys=False, allow_unicode=True, width=100)
    return header + body


# --------------------------------------------------------------------------------------------
# Writing the record


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries in :data:`LIBRARIES` (and Python), without importing any."""
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def record_data(
    scene: Scene,
    env: Any,
    ref: Any,
    plan: Plan,
    outputs: dict[str, str],
    *,
    command: str | None,
    model: str | None = None,
) -> dict[str, Any]:
    """What ``NAME.record.json`` holds."""
    names = record_names(scene)
    scheduler = plan.base.get("scheduler", {})
    return {
        "record": RECORD_VERSION,
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command or shlex.join(sys.argv),  # the API's caller: the script that ran
        "scene": str(scene.path),
        "resolved_scene": names["scene"],
        "frames": len(plan),
        "frames_table": [names["frames_json"], names["frames_csv"]],
        "model": {
            "spec": ref.spec,
            "kind": ref.kind,
            "revision": ref.revision,
            "pipeline": env.pipeline_class,
            "family": env.family,
            "fingerprint": dict(env.fingerprint),
            "scheduler": scheduler.get("class"),
        },
        "device": env.device,
        "dtype": env.dtype,
        "libraries": {**library_versions(), **dict(env.libraries)},
        "inputs": dict(plan.files),
        "base_key": plan.base_key,
        "outputs": outputs,
        "overridden_model": model,
    }


def write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically (the record is never half written, like every output)."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_record(
    out_dir: Path,
    scene: Scene,
    env: Any,
    ref: Any,
    plan: Plan,
    targets: Sequence[Any],
    status: dict[str, str],
    *,
    command: str | None,
    model: str | None = None,
    keep: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Write the record files and one SRT per MP4 output; returns their paths.

    ``keep(path)`` is called before a file that exists is replaced (the caller keeps the previous
    run's record beside its previous outputs).
    """
    names = record_names(scene)
    rows = frame_rows(plan)
    flat_rows = [flat(r) for r in rows]
    outputs = {os.path.relpath(t.path, out_dir): status.get(str(t.path), "written") for t in targets}
    files: dict[Path, str] = {
        out_dir / names["record"]: json.dumps(
            record_data(scene, env, ref, plan, outputs, command=command, model=model), indent=2
        )
        + "\n",
        out_dir / names["scene"]: scene_yaml(scene, model=model),
        out_dir / names["frames_json"]: "[\n"
        + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
        + "\n]\n",
        out_dir / names["frames_csv"]: frames_csv(flat_rows),
    }
    lines = [parameters_line(v) for v in flat_rows]
    for target in targets:
        if target.kind == "mp4":
            order = output_order(len(lines), target.output.rubber_band)
            fps = target.output.fps or scene.fps
            files[target.path.with_suffix(".srt")] = srt([lines[i] for i in order], fps)
    for path, text in files.items():
        if keep is not None and path.exists():
            keep(path)
        write_text(path, text)
    return list(files)


def output_order(n: int, rubber_band: bool) -> list[int]:
    """The frame indices an output plays, in order (the rubber band's way back included)."""
    indices = list(range(n))
    return list(sequences.rubber_band(indices)) if rubber_band else indices
