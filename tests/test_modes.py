"""Pipeline modes with the embedded models: exact incremental re-renders for img2img, feedback and LoRA,
2D motion, batch invariance, and a checkpoint saved to a folder rendering by path."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.plan.planner import plan
from pipeline.render.environment import resolve_env
from pipeline.render.models import load_pipeline, resolve_model
from pipeline.render.renderer import FrameRenderer, configure, motion
from pipeline.scene.load import load_scene
from pipeline.store.cache import CacheDir
from tests.conftest import run_render

ROOT = Path(__file__).resolve().parent.parent
INPUTS = ROOT / "scenes" / "inputs"


def scene_in(folder: Path, text: str, name: str = "scene.yaml") -> Path:
    (folder / "inputs").mkdir(parents=True, exist_ok=True)
    for f in INPUTS.iterdir():
        shutil.copy(f, folder / "inputs" / f.name)
    path = folder / name
    path.write_text(text)
    return path


IMG2IMG = """
model: tiny
size: [32, 32]
steps: 4
seed: 3
mode: img2img
init_image: inputs/landscape.png
keyframes:
  - {{frame: 0, prompt: a house, strength: {s0}}}
  - {{frame: 5, prompt: a house in snow, strength: 0.6}}
  - {{frame: 9, prompt: a house at night, strength: 0.8}}
outputs: [out.gif]
"""


def test_img2img_edit_of_init_image_content_with_same_mtime_rerenders(tmp_path: Path) -> None:
    scene = scene_in(tmp_path, IMG2IMG.format(s0=0.4))
    first = run_render(scene, tmp_path / "cache")
    assert first["rendered"] == 10
    init = tmp_path / "inputs" / "landscape.png"
    stat = init.stat()
    img = Image.open(init).convert("RGB")
    img.putpixel((5, 5), (0, 0, 0))
    img.save(init)
    os.utime(init, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same path, same mtime, new content
    assert init.stat().st_mtime_ns == stat.st_mtime_ns
    again = run_render(scene, tmp_path / "cache")
    assert again["rendered"] == 10


def test_img2img_strength_at_one_keyframe_rerenders_only_its_segments(tmp_path: Path) -> None:
    scene = scene_in(tmp_path, IMG2IMG.format(s0=0.4))
    run_render(scene, tmp_path / "cache")
    scene.write_text(IMG2IMG.format(s0=0.2))
    again = run_render(scene, tmp_path / "cache")
    # Keyframe 0's strength shapes frames 0..4 (frame 5 sits on the next keyframe); nothing else.
    assert (again["rendered"], again["cached"]) == (5, 5)


FEEDBACK = """
model: tiny
size: [32, 32]
steps: 3
seed: 1
noise: per_frame
mode: feedback
init_image: inputs/landscape.png
strength: 0.5
zoom: 1.05
keyframes:
  - {{frame: 0, prompt: a castle}}
  - {{frame: 6, prompt: "{mid}"}}
  - {{frame: 11, prompt: a castle in clouds}}
outputs: [out.mp4]
"""


def test_feedback_edit_at_frame_k_rerenders_k_and_after_only(tmp_path: Path) -> None:
    scene = scene_in(tmp_path, FEEDBACK.format(mid="a castle at dusk"))
    first = run_render(scene, tmp_path / "cache", "--batch-size", "4")
    assert first["rendered"] == 12
    scene.write_text(FEEDBACK.format(mid="a castle at dawn"))
    again = run_render(scene, tmp_path / "cache")
    # The mid prompt changes frames 1..11 directly; frame 0 (on keyframe 0) does not depend on it.
    assert (again["rendered"], again["cached"]) == (11, 1)
    # An edit that only changes frame 11's recipe (the last keyframe) re-renders just the chain's tail.
    scene.write_text(
        FEEDBACK.format(mid="a castle at dawn").replace("a castle in clouds", "a castle in rain")
    )
    tail = run_render(scene, tmp_path / "cache")
    assert (tail["rendered"], tail["cached"]) == (5, 7)


def test_feedback_frames_equal_a_one_by_one_render(tmp_path: Path) -> None:
    """A chain renders in waves; batching across waves must not change what a frame starts from."""
    scene = scene_in(tmp_path, FEEDBACK.format(mid="a castle at dusk"))
    run_render(scene, tmp_path / "c1", "--batch-size", "8")
    run_render(scene, tmp_path / "c2", "--batch-size", "1")
    parsed = load_scene(scene)
    jobs = plan(parsed, resolve_env(parsed, device="cpu"))
    with CacheDir(tmp_path / "c1") as a, CacheDir(tmp_path / "c2") as b:
        for job in jobs:
            pa = np.asarray(Image.open(io.BytesIO(a.frames.get(job.key))), dtype=int)
            pb = np.asarray(Image.open(io.BytesIO(b.frames.get(job.key))), dtype=int)
            assert np.abs(pa - pb).max() <= 2, job.frame


LORA = """
model: tiny
size: [32, 32]
steps: 2
seed: 9
loras:
  - {{path: inputs/style_tiny.safetensors, name: style, scale: 0.0}}
keyframes:
  - {{frame: 0, prompt: a knight}}
  - {{frame: 4, lora: {{style: {mid}}}}}
  - {{frame: 7, lora: {{style: 0.0}}}}
outputs: [out.gif]
"""


def test_lora_scale_keyframe_rerenders_only_frames_it_reaches(tmp_path: Path) -> None:
    scene = scene_in(tmp_path, LORA.format(mid=1.0))
    first = run_render(scene, tmp_path / "cache")
    assert first["rendered"] == 8
    scene.write_text(LORA.format(mid=0.6))  # 0.5 would reuse frames: 0.25 and 0.5 were rendered already
    again = run_render(scene, tmp_path / "cache")
    # Frames 1..6 lie between the keyframes around frame 4; frames 0 and 7 keep scale 0.
    assert (again["rendered"], again["cached"]) == (6, 2)


def test_lora_changes_pixels(tmp_path: Path) -> None:
    scene = scene_in(tmp_path, LORA.format(mid=1.0))
    run_render(scene, tmp_path / "cache")
    parsed = load_scene(scene)
    jobs = plan(parsed, resolve_env(parsed, device="cpu"))
    with CacheDir(tmp_path / "cache") as cache:
        f0 = np.asarray(Image.open(io.BytesIO(cache.frames.get(jobs[0].key))), dtype=int)
        f4 = np.asarray(Image.open(io.BytesIO(cache.frames.get(jobs[4].key))), dtype=int)
    assert np.abs(f0 - f4).max() > 10


def test_motion_zoom_rotate_translate() -> None:
    img = Image.new("RGB", (32, 32), (0, 0, 0))
    img.putpixel((16, 16), (255, 255, 255))
    assert motion(img, 1.0, 0.0, 0.0, 0.0) is img
    moved = np.asarray(motion(img, 1.0, 0.0, 4.0, 0.0))[..., 0]
    assert np.unravel_index(moved.argmax(), moved.shape) == (16, 20)  # content moves right by 4 px
    down = np.asarray(motion(img, 1.0, 0.0, 0.0, 3.0))[..., 0]
    assert np.unravel_index(down.argmax(), down.shape) == (19, 16)
    zoomed = np.asarray(motion(img, 2.0, 0.0, 0.0, 0.0))[..., 0]
    assert (zoomed > 60).sum() > (np.asarray(img)[..., 0] > 60).sum()  # a dot grows when zoomed in
    bar = Image.new("RGB", (32, 32), (0, 0, 0))
    for x in range(16, 28):
        bar.putpixel((x, 16), (255, 255, 255))
    turned = np.asarray(motion(bar, 1.0, 90.0, 0.0, 0.0))[..., 0]
    ys, xs = np.nonzero(turned > 128)
    assert np.ptp(ys) > np.ptp(xs)  # a horizontal bar turned by 90 degrees stands upright


def dot_at(img: Image.Image) -> tuple[int, int]:
    arr = np.asarray(img)[..., 0]
    y, x = np.unravel_index(arr.argmax(), arr.shape)
    return int(y), int(x)


def test_motion_shifts_first_then_zooms_and_rotates_about_the_centre() -> None:
    # Deforum's order, as the README says: the shift (pixels) comes first, so the zoom scales it too.
    img = Image.new("RGB", (32, 32), (0, 0, 0))
    img.putpixel((16, 16), (255, 255, 255))  # just right of and below the centre (16.0, 16.0)
    assert dot_at(motion(img, 1.0, 0.0, 4.0, 0.0)) == (16, 20)  # 4 px right
    # Shift then zoom: (16.5 + 4 - 16) * 2 + 16 = 25 -> pixel 24, i.e. 8 px right. Zoom first, then
    # shift, would give (16.5 - 16) * 2 + 16 + 4 = 21 -> pixel 20.
    assert dot_at(motion(img, 2.0, 0.0, 4.0, 0.0)) == (16, 24)
    # A positive angle turns the picture counter-clockwise on screen: right of the centre goes up.
    right = Image.new("RGB", (32, 32), (0, 0, 0))
    right.putpixel((22, 16), (255, 255, 255))
    assert dot_at(motion(right, 1.0, 90.0, 0.0, 0.0)) == (9, 16)
    # zoom > 1 zooms in: content moves away from the centre.
    far = Image.new("RGB", (32, 32), (0, 0, 0))
    far.putpixel((20, 16), (255, 255, 255))
    assert dot_at(motion(far, 2.0, 0.0, 0.0, 0.0)) == (16, 24)


def test_feedback_frame_0_is_made_from_the_moved_init_image(tmp_path: Path) -> None:
    """Frame 0 of a feedback chain with an init image is img2img of the init image moved once."""
    scene_in(tmp_path, "")
    init = Image.open(tmp_path / "inputs" / "landscape.png").convert("RGB").resize((32, 32), Image.LANCZOS)
    init.save(tmp_path / "inputs" / "small.png")
    motion(init, 1.3, 20.0, 3.0, -2.0).save(tmp_path / "inputs" / "moved.png")
    common = (
        "model: tiny\nsize: [32, 32]\nsteps: 3\nseed: 5\nstrength: 0.5\n"
        "keyframes:\n  - {frame: 0, prompt: a castle}\noutputs: [f/]\n"
    )
    feedback = scene_in(
        tmp_path,
        "mode: feedback\ninit_image: inputs/small.png\nzoom: 1.3\nangle: 20\ntranslate_x: 3\n"
        "translate_y: -2\n" + common,
        "feedback.yaml",
    )
    img2img = scene_in(tmp_path, "mode: img2img\ninit_image: inputs/moved.png\n" + common, "moved.yaml")
    unmoved = scene_in(tmp_path, "mode: img2img\ninit_image: inputs/small.png\n" + common, "unmoved.yaml")
    frames = {}
    for scene in (feedback, img2img, unmoved):
        run_render(scene, tmp_path / "cache")
        png = tmp_path / "renders" / scene.stem / "f" / "frame_00000.png"
        frames[scene.stem] = np.asarray(Image.open(png).convert("RGB"), dtype=int)
    assert np.array_equal(frames["feedback"], frames["moved"])
    assert np.abs(frames["feedback"] - frames["unmoved"]).max() > 10


@pytest.mark.parametrize("mode", ["img2img", "feedback"])
def test_mode_frames_do_not_depend_on_the_batch(tmp_path: Path, mode: str) -> None:
    text = IMG2IMG.format(s0=0.5) if mode == "img2img" else FEEDBACK.format(mid="x")
    scene = scene_in(tmp_path, text)
    parsed = load_scene(scene)
    env = resolve_env(parsed, device="cpu")
    jobs = plan(parsed, env)
    pipe = configure(load_pipeline(resolve_model("tiny", tmp_path), device="cpu", dtype="float32"), parsed)
    with CacheDir(tmp_path / "cache") as cache:
        renderer = FrameRenderer(pipe, parsed, jobs, cache, device="cpu", dtype="float32")
        renderer.encode_prompts(jobs.embeddings)
        picks = [jobs[0], jobs[1], jobs[2]] if mode == "img2img" else [jobs[0]]
        together = renderer.denoise(picks, renderer.prepare_latents(picks))
        alone = [renderer.denoise([j], renderer.prepare_latents([j]))[0] for j in picks]
    for a, b in zip(together, alone, strict=True):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 2


def test_checkpoint_saved_to_a_folder_renders_by_path(tmp_path: Path) -> None:
    """A user's local download loads by the same code path: save_pretrained, then model: <folder>."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        ROOT / "pipeline" / "embedded" / "tiny", torch_dtype=torch.float32
    )
    pipe.save_pretrained(tmp_path / "models" / "my-sd15")
    scene = scene_in(
        tmp_path,
        "model: models/my-sd15\nsize: [32, 32]\nsteps: 2\nkeyframes:\n  - {frame: 0, prompt: a dog}\n  - {frame: 3, prompt: a cat}\noutputs: [out.gif]\n",
    )
    report = run_render(scene, tmp_path / "cache")
    assert report["rendered"] == 4
    ref = resolve_model("models/my-sd15", tmp_path)
    assert ref.kind == "local" and set(ref.fingerprint) >= {"unet", "vae", "text_encoder", "tokenizer"}


def test_feedback_without_init_image_starts_from_a_txt2img_frame(tmp_path: Path) -> None:
    text = FEEDBACK.format(mid="a castle at dusk").replace("init_image: inputs/landscape.png\n", "")
    scene = scene_in(tmp_path, text)
    report = run_render(scene, tmp_path / "cache", "--batch-size", "8")
    assert report["rendered"] == 12


def test_flat_depth_map_is_refused_before_loading(tmp_path: Path) -> None:
    from pipeline.scene.load import load_scene as load
    from pipeline.scene.problems import SceneError

    scene = scene_in(
        tmp_path,
        "model: tiny-depth\nmode: depth2img\ninit_image: inputs/landscape.png\ndepth_map: inputs/flat.png\n"
        "keyframes:\n  - {frame: 0, prompt: a village}\n",
    )
    Image.new("L", (32, 32), 128).save(tmp_path / "inputs" / "flat.png")
    with pytest.raises(SceneError) as exc:
        load(scene)
    (problem,) = exc.value.problems
    assert (problem.line, problem.col) == (4, 12)
    assert "one value everywhere" in problem.message


@pytest.mark.parametrize("scheduler", ["ddim", "euler_ancestral"])
def test_a_strength_that_leaves_no_denoising_step_keeps_the_start_image(
    tmp_path: Path, scheduler: str
) -> None:
    # steps 2 x strength 0.35 < 1: diffusers slices no timestep out of the schedule and fails with a
    # RuntimeError traceback. Such a frame is its start image as it is. (PNDM repeats its last
    # timestep, so diffusers still runs one step there, and so do we: see the img2img example's pins.)
    import pipeline

    shutil.copy(INPUTS / "landscape.png", tmp_path / "in.png")
    common = {"size": [32, 32], "steps": 2, "strength": 0.35, "scheduler": scheduler, "outputs": []}
    keyframes = [{"frame": 0, "prompt": "a house"}, {"frame": 2, "prompt": "a tower"}]
    init = Image.open(tmp_path / "in.png").convert("RGB").resize((32, 32), Image.LANCZOS)
    img2img = pipeline.open(
        {**common, "mode": "img2img", "init_image": "in.png", "keyframes": keyframes},
        base_dir=tmp_path,
        cache_dir=tmp_path / "cache",
        device="cpu",
        name="i2i",
    )
    assert img2img.render().rendered == 3
    assert all(np.array_equal(np.asarray(f), np.asarray(init)) for f in img2img.frames())
    feedback = pipeline.open(
        {**common, "mode": "feedback", "zoom": 1.5, "keyframes": keyframes},
        base_dir=tmp_path,
        cache_dir=tmp_path / "cache",
        device="cpu",
        name="fb",
    )
    assert feedback.render().rendered == 3
    frames = feedback.frames()
    moved = motion(frames[0], 1.5, 0.0, 0.0, 0.0)
    assert np.array_equal(np.asarray(frames[1]), np.asarray(moved.convert("RGB")))


# The mode table (pipeline/modes.py): what the scene rules, the planner and the renderer read.


def test_the_mode_table_holds_each_modes_facts() -> None:
    from typing import get_args

    from pipeline import modes

    assert modes.MODE_NAMES == ("txt2img", "img2img", "inpaint", "depth2img", "feedback")
    assert get_args(modes.ModeName) == modes.MODE_NAMES
    # The order of the scalars indexes the planner's value columns: keys depend on it.
    assert modes.SCALARS == ("guidance", "strength", "zoom", "angle", "translate_x", "translate_y")
    assert modes.IMAGE_FIELDS == ("init_image", "mask", "depth_map")
    assert {name: m.scalars for name, m in modes.MODES.items()} == {
        "txt2img": ("guidance",),
        "img2img": ("guidance", "strength"),
        "inpaint": ("guidance", "strength"),
        "depth2img": ("guidance", "strength"),
        "feedback": ("guidance", "strength", "zoom", "angle", "translate_x", "translate_y"),
    }
    assert {name: (m.needs, m.optional) for name, m in modes.MODES.items()} == {
        "txt2img": ((), ()),
        "img2img": (("init_image",), ()),
        "inpaint": (("init_image", "mask"), ()),
        "depth2img": (("init_image",), ("depth_map",)),
        "feedback": ((), ("init_image",)),
    }
    assert [name for name, m in modes.MODES.items() if m.chains] == ["feedback"]
    every = ("txt2img", "img2img", "inpaint", "feedback")
    for cls, allowed in {
        "StableDiffusionPipeline": every,
        "StableDiffusionXLPipeline": every,
        "StableDiffusion3Pipeline": every,
        "StableDiffusionInpaintPipeline": ("inpaint",),
        "StableDiffusionXLInpaintPipeline": ("inpaint",),
        "StableDiffusionDepth2ImgPipeline": ("depth2img",),
    }.items():
        assert modes.modes_for(cls) == allowed, cls
    assert modes.pipeline_class("sdxl", "feedback") == "StableDiffusionXLImg2ImgPipeline"
    assert modes.pipeline_class("sd", "depth2img") == "StableDiffusionDepth2ImgPipeline"


def test_every_pipeline_class_in_the_mode_table_is_in_diffusers() -> None:
    import diffusers

    from pipeline.modes import MODES

    for mode in MODES.values():
        for family, name in mode.pipelines.items():
            assert hasattr(diffusers, name), (mode.name, family, name)


def test_a_frames_mode_recipe_holds_the_inputs_its_mode_uses() -> None:
    from pipeline.modes import mode_recipe

    files = {"i.png": "I", "m.png": "M", "d.png": "D"}
    every = {"init_image": "i.png", "mask": "m.png", "depth_map": "d.png"}
    none = {"init_image": None, "mask": None, "depth_map": None}
    assert mode_recipe("txt2img", every, files) == {"mode": "txt2img"}
    assert mode_recipe("img2img", every, files) == {"mode": "img2img", "init": "I"}
    assert mode_recipe("inpaint", every, files) == {"mode": "inpaint", "init": "I", "mask": "M"}
    assert mode_recipe("depth2img", every, files) == {"mode": "depth2img", "init": "I", "depth": "D"}
    assert mode_recipe("depth2img", {**every, "depth_map": None}, files) == {
        "mode": "depth2img",
        "init": "I",
        "depth": "estimated",
    }
    assert mode_recipe("feedback", every, files) == {"mode": "feedback", "init": "I"}
    assert mode_recipe("feedback", none, files) == {"mode": "feedback"}


def test_every_mode_in_the_table_has_its_branch_in_the_renderer(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import modes
    from pipeline.plan.planner import FrameJob

    renderer = FrameRenderer.__new__(FrameRenderer)  # no model: only the mode branches run
    image = Image.new("RGB", (8, 8))
    monkeypatch.setattr(renderer, "_image", lambda digest, mode="RGB": image.convert(mode), raising=False)
    monkeypatch.setattr(renderer, "_previous", lambda job: image, raising=False)
    motion_of = {"zoom": 1.0, "angle": 0.0, "translate_x": 0.0, "translate_y": 0.0}
    expected = {
        "txt2img": set(),
        "img2img": {"image"},
        "inpaint": {"image", "mask_image"},
        "depth2img": {"image", "depth_map"},
        "feedback": {"image"},
    }
    for name in modes.MODES:
        recipe = {"mode": {"mode": name, "init": "I", "mask": "M", "depth": "D"}, "scalars": motion_of}
        got, inputs = renderer._mode_inputs([FrameJob(0, "k", recipe)])
        assert (got, set(inputs)) == (name, expected[name])
    # A mode added to the table without its branch fails loudly, not as some other mode.
    extra = modes.Mode("sketch", scalars=("guidance",), needs=(), optional=(), pipelines={})
    monkeypatch.setitem(modes.MODES, "sketch", extra)
    with pytest.raises(NotImplementedError, match=r"mode sketch is in pipeline\.modes but has no branch"):
        renderer._mode_inputs([FrameJob(0, "k", {"mode": {"mode": "sketch"}, "scalars": {}})])
