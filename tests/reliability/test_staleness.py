"""The staleness matrix: each input change invalidates exactly the frames it can change.

For every change the scene is planned before and after (``resolve_env`` then ``plan``, as the CLI does)
and the SET of frame indices whose key changed must equal the expected set. For a subset the edited
scene is also rendered incrementally (from the cache of the unedited scene) and compared with a cold
render of the edited scene in a fresh cache. Edits that cannot change pixels (whitespace, comments,
key order, quoting, fps with frame-number keyframes, output settings) must leave every key alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.reliability._helpers_inputs import (
    INPUTS,
    cached_frames,
    copy_model,
    max_diff,
    plan_of,
    render_ok,
    scene_in,
)

# A: txt2img with seed travel, a learned embedding, a LoRA and a keyframed negative prompt. Keyframes at
# 0, 4, 8, 11; 12 frames. Guidance and LoRA scale are not keyframed, so every frame shares one batch
# group and renders stay quick; edits add keyframed values.
SCENE_A = """\
model: tiny
size: [32, 32]
steps: 2
guidance: 7.5
negative_prompt: blurry
noise: travel
embeddings:
  - {path: inputs/tom_tiny.safetensors, token: "<tom>"}
loras:
  - {path: inputs/style_tiny.safetensors, name: style, scale: 0.5}
keyframes:
  - {frame: 0, prompt: "a cartoon of <tom>", seed: 1}
  - {frame: 4, prompt: a red barn, seed: 2}
  - {frame: 8, prompt: a blue lake, seed: 3, negative_prompt: dark}
  - {frame: 11, prompt: a green hill, seed: 4}
outputs: [out.gif]
"""

# B: img2img with keyframed strength. Keyframes at 0, 5, 9; 10 frames.
SCENE_B = """\
model: tiny
size: [32, 32]
steps: 2
seed: 3
mode: img2img
init_image: inputs/landscape.png
keyframes:
  - {frame: 0, prompt: a house, strength: 0.4}
  - {frame: 5, prompt: a house in snow, strength: 0.6}
  - {frame: 9, prompt: a house at night, strength: 0.8}
outputs: [out.gif]
"""

# C: inpainting on the inpainting checkpoint; the mask switches at frame 5. 10 frames.
SCENE_C = """\
model: tiny-inpaint
size: [32, 32]
steps: 2
seed: 4
mode: inpaint
init_image: inputs/landscape.png
mask: inputs/house_mask.png
strength: 1.0
keyframes:
  - {frame: 0, prompt: a red barn in a meadow}
  - {frame: 5, mask: inputs/mask2.png}
  - {frame: 9, prompt: a stone tower in a meadow}
outputs: [out.gif]
"""

# D: scene A on a local copy of the tiny model (same files, so the same keys as A).
SCENE_D = SCENE_A.replace("model: tiny\n", "model: models/tiny\n")

# E: SDXL on a local copy of tiny-sdxl, with the default (empty) negative prompt. 4 frames.
SCENE_E = """\
model: models/sdxl
size: [32, 32]
steps: 2
keyframes:
  - {frame: 0, prompt: a dog}
  - {frame: 3, prompt: a cat}
outputs: [out.gif]
"""

BASES = {"A": SCENE_A, "B": SCENE_B, "C": SCENE_C, "D": SCENE_D, "E": SCENE_E}
FRAMES = {"A": 12, "B": 10, "C": 10, "D": 12, "E": 4}


def make_base(folder: Path, base: str) -> Path:
    scene = scene_in(folder, BASES[base])
    if base == "C":
        mask = Image.open(INPUTS / "house_mask.png").convert("L")
        mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "inputs" / "mask2.png")
    if base == "D":
        copy_model(folder / "models" / "tiny")
    if base == "E":
        copy_model(folder / "models" / "sdxl", "tiny-sdxl")
    return scene


# -- edits -----------------------------------------------------------------------------------


def replace_once(scene: Path, old: str, new: str) -> None:
    text = scene.read_text()
    assert text.count(old) == 1, f"{old!r} is not in the scene exactly once"
    scene.write_text(text.replace(old, new))


def text_edit(old: str, new: str) -> Callable[[Path, pytest.MonkeyPatch], dict[str, Any]]:
    def apply(scene: Path, mp: pytest.MonkeyPatch) -> dict[str, Any]:
        replace_once(scene, old, new)
        return {}

    return apply


def edit_image_in_place(path: Path) -> None:
    """Change some pixels and save over the same file, then put its old mtime back."""
    st = path.stat()
    img = Image.open(path)
    img.load()
    mode = img.mode
    arr = np.asarray(img).copy()
    arr[: arr.shape[0] // 3, : arr.shape[1] // 3] = 255 - arr[: arr.shape[0] // 3, : arr.shape[1] // 3]
    Image.fromarray(arr, mode=mode).save(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns


def image_in_place(rel: str) -> Callable[[Path, pytest.MonkeyPatch], dict[str, Any]]:
    def apply(scene: Path, mp: pytest.MonkeyPatch) -> dict[str, Any]:
        edit_image_in_place(scene.parent / rel)
        return {}

    return apply


def replace_tensors(rel: str) -> Callable[[Path, pytest.MonkeyPatch], dict[str, Any]]:
    """Replace a safetensors file (learned embedding, LoRA) by one with the same names and other values."""

    def apply(scene: Path, mp: pytest.MonkeyPatch) -> dict[str, Any]:
        from safetensors.numpy import load_file, save_file

        path = scene.parent / rel
        tensors = {k: (v * 1.5 + 0.05).astype(v.dtype) for k, v in load_file(str(path)).items()}
        path.unlink()
        save_file(tensors, str(path))
        return {}

    return apply


def scheduler_beta_end(scene: Path, mp: pytest.MonkeyPatch) -> dict[str, Any]:
    path = scene.parent / "models" / "tiny" / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    assert config["beta_end"] == 0.012
    config["beta_end"] = 0.014
    st = path.stat()
    path.write_text(json.dumps(config, indent=2))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the file-hash memo must not be fooled
    return {}


def weight_byte(scene: Path, mp: pytest.MonkeyPatch) -> dict[str, Any]:
    """One byte of the UNet's weights: the lowest mantissa byte of its last float32."""
    path = scene.parent / "models" / "tiny" / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-4] ^= 0x01
    st = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only the content differs
    return {}


def library_version(scene: Path, mp: pytest.MonkeyPatch) -> dict[str, Any]:
    import pipeline.render.environment

    versions = {**pipeline.render.environment.library_versions(), "diffusers": "0.99.0"}
    mp.setattr(pipeline.render.environment, "library_versions", lambda: dict(versions))
    return {}


def model_index(
    folder: str, change: Callable[[dict[str, Any]], None]
) -> Callable[[Path, pytest.MonkeyPatch], dict[str, Any]]:
    """Edit a local model folder's model_index.json (what from_pretrained builds the pipeline from)."""

    def apply(scene: Path, mp: pytest.MonkeyPatch) -> dict[str, Any]:
        path = scene.parent / "models" / folder / "model_index.json"
        index = json.loads(path.read_text())
        change(index)
        path.write_text(json.dumps(index, indent=2))
        return {}

    return apply


def _ddim(index: dict[str, Any]) -> None:
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]
    index["scheduler"] = ["diffusers", "DDIMScheduler"]  # from_pretrained now loads a DDIM scheduler


def _no_zeros(index: dict[str, Any]) -> None:
    assert index["force_zeros_for_empty_prompt"] is True
    index["force_zeros_for_empty_prompt"] = False  # the empty negative prompt is now encoded, not zeros


def device_cuda(scene: Path, mp: pytest.MonkeyPatch) -> dict[str, Any]:
    return {"device": "cuda"}


@dataclass
class Edit:
    base: str
    apply: Callable[[Path, pytest.MonkeyPatch], dict[str, Any]]
    expected: set[int] | None  # None: every frame
    render: bool = False
    marks: list[Any] = field(default_factory=list)


R = range
EDITS: dict[str, Edit] = {
    # keyframe 2 (frame 4) reaches the frames between its neighbours at 0 and 8
    "prompt_at_one_keyframe": Edit(
        "A", text_edit("prompt: a red barn", "prompt: a red house"), set(R(1, 8)), render=True
    ),
    # the top-level negative prompt holds at frame 0 and blends into keyframe 3's (frame 8)
    "negative_prompt": Edit("A", text_edit("negative_prompt: blurry", "negative_prompt: ugly"), set(R(0, 8))),
    # seed travel: keyframe 3's seed (frame 8) reaches frames 5..10
    "seed_travel": Edit("A", text_edit("seed: 3,", "seed: 30,"), set(R(5, 11))),
    "steps": Edit("A", text_edit("steps: 2", "steps: 3"), None),
    # guidance set at frame 4 blends in from frame 0 and holds to the end
    "guidance_at_one_keyframe": Edit("A", text_edit("seed: 2}", "seed: 2, guidance: 5}"), set(R(1, 12))),
    "size": Edit("A", text_edit("size: [32, 32]", "size: [40, 32]"), None),
    # the curve into frame 8 eases every track keyframe 3 sets: prompt and seed from frame 4, the negative
    # prompt from frame 0
    "curve_of_one_keyframe": Edit(
        "A", text_edit("{frame: 8, prompt", "{frame: 8, curve: ease_in_quad, prompt"), set(R(1, 8))
    ),
    # only frames that blend two prompts use the method: the prompt blends 1..3, 5..7, 9..10 and the
    # negative prompt 1..7
    "interpolation": Edit(
        "A", text_edit("noise: travel", "noise: travel\ninterpolation: lerp"), {1, 2, 3, 4, 5, 6, 7, 9, 10}
    ),
    # a LoRA scale set at frame 8 blends in from the top-level scale at frame 0 and holds to the end
    "lora_scale_at_one_keyframe": Edit(
        "A", text_edit("negative_prompt: dark}", "negative_prompt: dark, lora: {style: 1.0}}"), set(R(1, 12))
    ),
    "lora_scale_top_level": Edit("A", text_edit("scale: 0.5", "scale: 0.25"), None),
    "clip_skip": Edit("A", text_edit("steps: 2", "steps: 2\nclip_skip: 1"), None),
    "dtype": Edit("A", text_edit("steps: 2", "steps: 2\ndtype: float16"), None),
    "learned_embedding_file_replaced": Edit(
        "A", replace_tensors("inputs/tom_tiny.safetensors"), None, render=True
    ),
    "lora_file_replaced": Edit("A", replace_tensors("inputs/style_tiny.safetensors"), None, render=True),
    "library_version": Edit("A", library_version, None, render=True),
    "device_class": Edit("A", device_cuda, None),
    "scheduler_config": Edit("D", scheduler_beta_end, None, render=True),
    "model_weight_byte": Edit("D", weight_byte, None, render=True),
    "strength_at_first_keyframe": Edit(
        "B", text_edit("strength: 0.4", "strength: 0.3"), set(R(0, 5)), render=True
    ),
    "strength_at_last_keyframe": Edit("B", text_edit("strength: 0.8", "strength: 0.7"), set(R(6, 10))),
    "init_image_in_place_same_mtime": Edit("B", image_in_place("inputs/landscape.png"), None, render=True),
    # the mask switched to at frame 5 holds to the end; the first mask covers frames 0..4
    "second_mask_content": Edit("C", image_in_place("inputs/mask2.png"), set(R(5, 10)), render=True),
    "first_mask_content": Edit("C", image_in_place("inputs/house_mask.png"), set(R(0, 5))),
    # model_index.json decides which classes from_pretrained builds and some pipeline settings; a render
    # of each edited scene differs from the unedited one (by 34 and 99 levels at 32x32), yet no key moves.
    "model_index_scheduler_class": Edit("D", model_index("tiny", _ddim), None),
    "model_index_force_zeros_for_empty_prompt": Edit("E", model_index("sdxl", _no_zeros), None),
}


def _keys(scene: Path, env_changes: dict[str, Any]) -> list[str]:
    return [job.key for job in plan_of(scene, **env_changes)]


def test_matrix_is_big_enough() -> None:
    assert sum(not e.marks for e in EDITS.values()) >= 15
    assert sum(e.render for e in EDITS.values()) >= 6


@pytest.mark.parametrize("name", [pytest.param(n, marks=e.marks) for n, e in EDITS.items()])
def test_edit_changes_exactly_the_expected_frame_keys(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    edit = EDITS[name]
    scene = make_base(tmp_path, edit.base)
    before = _keys(scene, {})
    assert len(before) == FRAMES[edit.base]
    env_changes = edit.apply(scene, monkeypatch)
    after = _keys(scene, env_changes)
    assert len(after) == len(before)
    changed = {i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b}
    expected = set(range(len(before))) if edit.expected is None else edit.expected
    assert changed == expected, f"changed {sorted(changed)}, expected {sorted(expected)}"


# -- edits that cannot change pixels -----------------------------------------------------------

NO_CHANGE: dict[str, str] = {
    "whitespace": SCENE_A.replace("\n", "  \n\n")
    .replace("keyframes:\n", "keyframes:\n\n")
    .replace("- {frame: 4, prompt: a red barn", "-   {frame: 4,   prompt:  a red barn")
    .replace("size: [32, 32]", "size:    [ 32 ,32 ]"),
    "comments": "# a scene\n"
    + SCENE_A.replace("steps: 2\n", "steps: 2   # quick\n# a comment line\n").replace(
        "keyframes:\n", "keyframes:  # the keys\n"
    ),
    "key_order": """\
keyframes:
  - {seed: 1, prompt: "a cartoon of <tom>", frame: 0}
  - {frame: 4, seed: 2, prompt: a red barn}
  - {negative_prompt: dark, seed: 3, prompt: a blue lake, frame: 8}
  - {seed: 4, prompt: a green hill, frame: 11}
outputs: [out.gif]
loras:
  - {scale: 0.5, name: style, path: inputs/style_tiny.safetensors}
embeddings:
  - {token: "<tom>", path: inputs/tom_tiny.safetensors}
noise: travel
negative_prompt: blurry
guidance: 7.5
steps: 2
size: [32, 32]
model: tiny
""",
    "quoting_and_block_style": """\
"model": 'tiny'
size:
  - 32
  - 32
steps: 2
guidance: 7.50
negative_prompt: "blurry"
noise: {kind: travel}
embeddings:
  - path: 'inputs/tom_tiny.safetensors'
    token: '<tom>'
loras:
  - path: "inputs/style_tiny.safetensors"
    name: 'style'
    scale: 0.50
keyframes:
  - frame: 0
    prompt: 'a cartoon of <tom>'
    seed: 1
  - frame: 4
    prompt: "a red barn"
    seed: 2
  - frame: 8
    prompt: >-
      a blue lake
    seed: 3
    negative_prompt: 'dark'
  - frame: 11
    prompt: |-
      a green hill
    seed: 4
outputs:
  - 'out.gif'
""",
    "fps_with_frame_number_keyframes": SCENE_A.replace("steps: 2\n", "steps: 2\nfps: 24\n"),
    "output_paths": SCENE_A.replace("outputs: [out.gif]", "outputs: [elsewhere/movie.gif]"),
    "rubber_band": SCENE_A.replace(
        "outputs: [out.gif]", "outputs: [{path: out.gif, rubber_band: true, loop: 2}]"
    ),
    "adding_an_output": SCENE_A.replace(
        "outputs: [out.gif]", "outputs: [out.gif, out.mp4, frames/, {path: sheet.png, cols: 4}]"
    ),
    "no_outputs_key": SCENE_A.replace("outputs: [out.gif]\n", ""),
}


@pytest.mark.parametrize("name", list(NO_CHANGE))
def test_edit_that_cannot_change_pixels_keeps_every_key(name: str, tmp_path: Path) -> None:
    scene = make_base(tmp_path, "A")
    before = _keys(scene, {})
    assert NO_CHANGE[name] != SCENE_A
    scene.write_text(NO_CHANGE[name])
    assert _keys(scene, {}) == before


def test_identical_local_copy_of_a_model_keeps_every_key(tmp_path: Path) -> None:
    """Keys hold the model's content fingerprint, not its name: a byte-identical copy reuses every frame."""
    a = _keys(make_base(tmp_path / "a", "A"), {})
    d = _keys(make_base(tmp_path / "d", "D"), {})
    assert a == d


# -- incremental renders against cold renders ----------------------------------------------------


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A cache holding every frame of each unedited base scene (D shares A's keys, so A's cache)."""
    caches = {}
    for base in ("A", "B", "C"):
        folder = tmp_path_factory.mktemp(f"warm{base}")
        report = render_ok(make_base(folder, base), folder / "cache")
        assert report["rendered"] == FRAMES[base]
        caches[base] = folder / "cache"
    caches["D"] = caches["A"]
    return caches


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, e in EDITS.items() if e.render])
def test_incremental_render_equals_cold_render(
    name: str, warm: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    edit = EDITS[name]
    scene = make_base(tmp_path / "scene", edit.base)
    before = _keys(scene, {})
    cache = tmp_path / "incremental"
    shutil.copytree(warm[edit.base], cache)
    # A no-op run first: everything is cached, and the CLI's file-hash memo now knows these files.
    assert render_ok(scene, cache)["rendered"] == 0
    env_changes = edit.apply(scene, monkeypatch)
    assert not env_changes  # renders run through the CLI: the edit must be in the files
    after = _keys(scene, {})
    expected = set(range(len(before))) if edit.expected is None else edit.expected
    assert {i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b} == expected

    incremental = render_ok(scene, cache)
    assert (incremental["rendered"], incremental["cached"]) == (len(expected), len(before) - len(expected))
    cold = render_ok(scene, tmp_path / "cold")
    assert cold["rendered"] == len(before)
    diff = max_diff(cached_frames(cache, after), cached_frames(tmp_path / "cold", after))
    assert diff <= 2, f"incremental and cold renders differ by {diff} levels"


def test_env_edit_helpers_change_only_what_they_say(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The library-version simulation reaches resolve_env (the plan) and nothing else in the env."""
    from pipeline.render.environment import resolve_env
    from pipeline.scene.load import load_scene

    scene = make_base(tmp_path, "A")
    parsed = load_scene(scene)
    env = resolve_env(parsed, device="cpu")
    library_version(scene, monkeypatch)
    patched = resolve_env(parsed, device="cpu")
    assert patched.libraries["diffusers"] == "0.99.0"
    assert dataclasses.replace(patched, libraries=env.libraries) == env
