"""The JSON Schema of the scene format, for editors (``render.py schema``, ``scenes/scene.schema.json``).

Made from the pydantic models of ``pipeline.scene.schema`` (``Scene.model_json_schema()``), then completed
here: a description for every key, the allowed names where the models take any text (schedulers,
curves), and the shorthands the loader accepts before the models see them (``prompt: "a dog"``,
``noise: travel``, ``outputs: [a.gif]``, ``frame: 2.5s``)::

    from pipeline.scene.editor_schema import scene_schema, schema_text
    scene_schema()["properties"]["scheduler"]["anyOf"][0]["enum"]    # ['ddim', 'ddpm', ...]
    Path("scenes/scene.schema.json").write_text(schema_text())

A scene file points an editor at it with its second line (the first says what the scene shows)::

    # yaml-language-server: $schema=scene.schema.json

tests/test_schema.py checks that the file in the repository is the one these models make.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from pipeline.audio.model import extend_schema
from pipeline.plan.curves import CURVES
from pipeline.render.models import embedded_models
from pipeline.scene.core import Scene
from pipeline.scene.scheduled import SCHEDULABLE
from pipeline.schedulers import SCHEDULERS

SCHEMA_FILE = "scene.schema.json"
MODELINE = f"# yaml-language-server: $schema={SCHEMA_FILE}"

_SECONDS_PATTERN = r"^\s*\d+(\.\d+)?s\s*$"
_BEZIER_PATTERN = r"^\s*cubic_bezier\s*\(.*\)\s*$"
_SCHEDULE_PATTERN = r"^\s*\d+\s*:"

_MOTION = "Feedback motion per frame"
_KEYFRAMABLE = " Keyframable: keyframes set it and it is eased between them."
_SCHEDULE = " Or a Deforum schedule string, '0:(7.5), 30:(9 + sin(t))' (linear between points)."

# What each key means, by model (the README's "Scene format" table, in a sentence each).
DESCRIPTIONS: dict[str, dict[str, str]] = {
    "Scene": {
        "model": "Embedded model name (tiny, tiny-inpaint, tiny-depth, tiny-sdxl, tiny-sd3), a Hugging Face id "
        "(owner/name), a local diffusers folder, or a single-file checkpoint (.safetensors or .ckpt of SD 1.x, "
        "2.x, SDXL or SD3), relative to the scene.",
        "revision": "A Hugging Face branch, tag or commit of the model.",
        "config": "For a single-file model: the diffusers folder (or embedded name, or Hugging Face id in the "
        "local cache) whose component configs, tokenizers and scheduler it loads with; default: the "
        "standard model of its family from the Hugging Face cache.",
        "vae": "A VAE replacing the model's: a diffusers VAE folder, a weights file (.safetensors/.ckpt), or "
        "a Hugging Face id. In the frame keys, not in the embedding keys.",
        "scheduler": "The sampler, built from the model's own scheduler config; default: the model's own.",
        "dtype": "auto: float16 on CUDA, float32 elsewhere.",
        "size": "[width, height] in pixels, multiples of 8.",
        "steps": "Denoising steps per frame.",
        "guidance": "Classifier-free guidance scale at frame 0." + _KEYFRAMABLE + _SCHEDULE,
        "fps": "Frames per second of the outputs, and of keyframes written in seconds (2.5s).",
        "frames": "Total frames; default: the last keyframe + 1. Give frames or duration, not both.",
        "duration": "Total length in seconds (10s or 10), rounded to whole frames at fps.",
        "seed": "The noise seed.",
        "negative_prompt": "What the image should not show, at frame 0." + _KEYFRAMABLE,
        "prompt_prefix": "Text put before every prompt, joined with one space (none before punctuation); "
        "a keyframe may change it.",
        "prompt_suffix": "Text put after every prompt, joined with one space (none before punctuation, "
        "as in ', film grain'); a keyframe may change it.",
        "interpolation": "How prompt embeddings blend between keyframes: slerp or lerp.",
        "curve": "The default easing into each keyframe (easings.net names, step/hold, or cubic_bezier(x1, y1, x2, y2)).",
        "noise": "Where each frame's initial noise comes from: fixed, per_frame, travel, or "
        "{kind: circle, seeds: [A, B]}.",
        "clip_skip": "Skip the last N CLIP layers, for the prompts and the negative prompts alike.",
        "prompt_format": "weighted reads (word:1.3), (word) and [word] as AUTOMATIC1111 does "
        "(\\( for a literal bracket); plain passes the text as it is.",
        "long_prompts": "chunk encodes a prompt past 75 CLIP tokens in 75-token chunks; truncate cuts it there, with "
        "a warning (SD3's T5 takes 255 tokens either way).",
        "t5": "SD3 only: use the T5 text encoder too.",
        "mode": "txt2img, img2img, inpaint, depth2img or feedback; a keyframe may switch it (it holds, never blends).",
        "init_image": "The input image of img2img, inpaint, depth2img and feedback, relative to the scene file.",
        "mask": "Inpaint mask, relative to the scene file: white repaints, black keeps.",
        "depth_map": "depth2img: a depth map instead of the model's estimate, relative to the scene file.",
        "strength": "How much img2img, inpaint, depth2img and feedback change the image (0 keeps it, 1 ignores it)."
        + _KEYFRAMABLE
        + _SCHEDULE,
        "zoom": f"{_MOTION}: above 1 zooms in." + _KEYFRAMABLE + _SCHEDULE,
        "angle": f"{_MOTION}: degrees, counter-clockwise." + _KEYFRAMABLE + _SCHEDULE,
        "translate_x": f"{_MOTION}: pixels to the right." + _KEYFRAMABLE + _SCHEDULE,
        "translate_y": f"{_MOTION}: pixels down." + _KEYFRAMABLE + _SCHEDULE,
        "embeddings": "Textual inversion files: {path, token}.",
        "loras": "LoRA files: {path, name, scale}; keyframes set scales with lora: {name: scale}.",
        "keyframes": "Values set at given frames; each value is eased between the keyframes that set it.",
        "walk": "A walk around one prompt's embeddings, instead of keyframes.",
        "grid": "A grid between four corner prompts, instead of keyframes.",
        "outputs": "Files to write, relative to renders/<scene name>/: .mp4, .gif, .png/.jpg (a contact "
        "sheet) or a folder ending in / (one PNG per frame). Default: <name>.mp4 and <name>.gif.",
    },
    "Keyframe": {
        "frame": "The frame: a whole number from 0, or seconds at the scene's fps like 2.5s.",
        "prompt": "The prompt, or a weighted blend [{text: ..., weight: ...}].",
        "negative_prompt": "The negative prompt from here on (blended like the prompt).",
        "prompt_prefix": "The prompt prefix from this keyframe on (restates the prompt in force).",
        "prompt_suffix": "The prompt suffix from this keyframe on (restates the prompt in force).",
        "seed": "With noise: travel, the seed this keyframe's noise comes from.",
        "curve": "The easing into this keyframe (default: the scene's curve).",
        "hold": "Keep this keyframe's values until the next keyframe, which takes over at its frame.",
        "guidance": "Classifier-free guidance scale.",
        "strength": "How much the input image is changed (0 to 1).",
        "zoom": f"{_MOTION}: above 1 zooms in.",
        "angle": f"{_MOTION}: degrees, counter-clockwise.",
        "translate_x": f"{_MOTION}: pixels to the right.",
        "translate_y": f"{_MOTION}: pixels down.",
        "mode": "Switch the mode from this frame on (it holds until another keyframe sets one).",
        "init_image": "The input image from this frame on, relative to the scene file.",
        "mask": "The inpaint mask from this frame on, relative to the scene file.",
        "depth_map": "The depth map from this frame on, relative to the scene file.",
        "lora": "LoRA scales by name, {style: 0.8}.",
    },
    "PromptPart": {
        "text": "A prompt.",
        "weight": "Its weight in the blend (only the ratios of the weights count).",
    },
    "Noise": {
        "kind": "fixed: one noise for every frame; per_frame: seed + frame number; travel: the keyframes' "
        "seeds, slerped; circle: a loop between two seeds' noises.",
        "seed": "The seed (default: the scene's seed).",
        "seeds": "circle: the two seeds [A, B].",
        "endpoint": "circle: true repeats the first frame at the end (as the Keras example does).",
    },
    "Walk": {
        "prompt": "The prompt walked around.",
        "frames": "How many frames.",
        "step_size": "What is added to the embeddings per frame, times the direction.",
        "direction": "ones (as the Keras example) or a seeded random direction.",
        "direction_seed": "The seed of the random direction.",
    },
    "Grid": {
        "prompts": "The four corners: top-left, top-right, bottom-left, bottom-right.",
        "rows": "Rows of the grid.",
        "cols": "Columns of the grid.",
        "method": "rows: the Keras example's formula (whole rows slerped with one angle); cells: per cell.",
    },
    "Output": {
        "path": "Relative to the output folder; the kind comes from the extension (a folder ends in /).",
        "kind": "mp4, gif, frames or grid, when the extension does not say it.",
        "fps": "Frames per second of this output (default: the scene's).",
        "rubber_band": "Play forward, then back (A→B→A), as the Keras example does.",
        "loop": "GIF: 0 loops forever, N plays N more times.",
        "cols": "Grid image: columns (default: the grid's, or as square as the frames allow).",
    },
    "LearnedEmbedding": {
        "path": "A .safetensors or .bin textual-inversion file, relative to the scene file.",
        "token": "The token that stands for it in prompts, like <tom> (default: the file's own).",
    },
    "Lora": {
        "path": "A LoRA .safetensors file, relative to the scene file.",
        "name": "The name keyframes use in lora: {name: scale} (default: the file name without suffix).",
        "scale": "The LoRA's scale at frame 0 (keyframable), or a Deforum schedule string '0:(0), 24:(1)'.",
    },
}


def _describe(schema: dict[str, Any], descriptions: dict[str, str]) -> None:
    for name, prop in schema.get("properties", {}).items():
        if name in descriptions:
            prop["description"] = descriptions[name]
        prop.pop("title", None)  # "Negative Prompt": says nothing the key does not


def _optional(prop: dict[str, Any], *choices: dict[str, Any]) -> None:
    """Replace what a property accepts with ``choices`` (and null where the model allows None)."""
    nullable = any(c.get("type") == "null" for c in prop.get("anyOf", []))
    for key in ("anyOf", "type", "items", "$ref", "minItems", "maxItems", "enum"):
        prop.pop(key, None)
    prop["anyOf"] = [*choices, {"type": "null"}] if nullable else list(choices)


def scene_schema() -> dict[str, Any]:
    """The scene format as a JSON Schema (draft 2020-12), descriptions and allowed values included."""
    schema = copy.deepcopy(Scene.model_json_schema())
    defs = schema["$defs"]
    _describe(schema, DESCRIPTIONS["Scene"])
    for name, model in defs.items():
        _describe(model, DESCRIPTIONS.get(name, {}))
    props, keyframe = schema["properties"], defs["Keyframe"]["properties"]

    # Names the models take as text, checked by the loader against a list.
    curve = {
        "anyOf": [
            {"type": "string", "enum": sorted(CURVES)},
            {"type": "string", "pattern": _BEZIER_PATTERN, "description": "cubic_bezier(x1, y1, x2, y2)"},
        ]
    }
    _optional(props["curve"], *curve["anyOf"])
    _optional(keyframe["curve"], *curve["anyOf"])
    _optional(props["scheduler"], {"type": "string", "enum": sorted(SCHEDULERS)})
    props["model"]["examples"] = [*embedded_models(), "stable-diffusion-v1-5/stable-diffusion-v1-5"]

    # Shorthands the loader expands before validation.
    parts = {"type": "array", "items": {"$ref": "#/$defs/PromptPart"}, "minItems": 1}
    _optional(keyframe["prompt"], {"type": "string"}, parts)
    _optional(
        keyframe["frame"],
        {"type": "integer", "minimum": 0},
        {"type": "string", "pattern": _SECONDS_PATTERN, "description": "seconds, like 2.5s"},
    )
    _optional(
        props["duration"],
        {"type": "number", "exclusiveMinimum": 0},
        {"type": "string", "pattern": _SECONDS_PATTERN},
    )
    _optional(
        props["noise"],
        {"type": "string", "enum": ["fixed", "per_frame", "travel"]},
        {"$ref": "#/$defs/Noise"},
    )
    _optional(
        props["outputs"],
        {"type": "array", "items": {"anyOf": [{"type": "string"}, {"$ref": "#/$defs/Output"}]}},
    )
    # A value with a schedule: a Deforum schedule string, made into keyframes when the scene loads.
    for name in SCHEDULABLE:
        number = {k: props[name].pop(k) for k in list(props[name]) if k not in ("description", "default")}
        props[name]["anyOf"] = [
            number,
            {
                "type": "string",
                "pattern": _SCHEDULE_PATTERN,
                "description": "a Deforum schedule: 0:(7.5), 30:(9)",
            },
        ]
    scale = defs["Lora"]["properties"]["scale"]
    number = {k: scale.pop(k) for k in list(scale) if k not in ("description", "default")}
    scale["anyOf"] = [
        number,
        {"type": "string", "pattern": _SCHEDULE_PATTERN, "description": "a Deforum schedule: 0:(0), 24:(1)"},
    ]
    extend_schema(schema)  # the soundtrack: audio, {beat: N} frames, curve audio, audio-driven values
    props["size"].update(minItems=2, maxItems=2)
    defs["Grid"]["properties"]["prompts"].update(minItems=4, maxItems=4)
    defs["Noise"]["properties"]["seeds"]["anyOf"][0].update(minItems=2, maxItems=2)

    schema.pop("title", None)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_FILE,
        "title": "sd-scenes scene",
        "description": "A scene file of sd-scenes: a Stable Diffusion animation described in YAML "
        "(see the README's 'Scene format').",
        **{k: v for k, v in schema.items() if k != "description"},
    }


def schema_text() -> str:
    """:func:`scene_schema` as the text of ``scenes/scene.schema.json``."""
    return json.dumps(scene_schema(), indent=2, ensure_ascii=False) + "\n"
