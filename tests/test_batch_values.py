"""Full batches with keyframed values, and the writer thread that stores frames while the next batch renders.

Eased guidance, negative prompts that change per frame, and strengths that leave the same number of
denoising steps share one pipeline call; each frame stays the frame a one-frame plain diffusers call
makes from the same inputs. Renders use the embedded tiny models at 32x32 with a few steps.
"""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline
from pipeline.plan.planner import denoised_steps, plan
from pipeline.render.denoise import PerFrameGuidance, denoiser
from pipeline.render.environment import resolve_env
from pipeline.render.interpolate import conditioning
from pipeline.render.models import load_pipeline, resolve_model
from pipeline.render.noise import injected_noise
from pipeline.render.renderer import FrameRenderer, configure
from pipeline.scene.load import load_scene
from pipeline.store.cache import CacheDir

ROOT = Path(__file__).resolve().parent.parent
INPUTS = ROOT / "scenes" / "inputs"
MODELS = {"sd": "tiny", "sdxl": "tiny-sdxl", "sd3": "tiny-sd3"}
# Strengths eased over the frames that leave one count of denoising steps at 4 steps in each family
# (SD and SDXL truncate 4 * strength, SD3 truncates the steps it skips).
STRENGTHS = {"sd": (0.5, 0.7), "sdxl": (0.5, 0.7), "sd3": (0.55, 0.7)}


def eased_scene(
    folder: Path, model: str, mode: str = "", strengths: tuple[float, float] = (0.5, 0.5)
) -> Path:
    """Four frames: guidance eased from 3 to 9, a negative prompt per keyframe, a seed per frame."""
    shutil.copytree(INPUTS, folder / "inputs", dirs_exist_ok=True)
    lines = [f"model: {model}", "size: [32, 32]", "steps: 4", "noise: per_frame", "curve: ease_in_out_sine"]
    if mode:
        lines += [f"mode: {mode}", "init_image: inputs/landscape.png"]
    if mode == "inpaint":
        lines += ["mask: inputs/house_mask.png"]
    lines += [
        "keyframes:",
        f"  - {{frame: 0, prompt: a house, negative_prompt: blurry, guidance: 3.0, strength: {strengths[0]}}}",
        f"  - {{frame: 3, prompt: a tower, negative_prompt: dark, guidance: 9.0, strength: {strengths[1]}}}",
        "outputs: [out.gif]",
    ]
    path = folder / "scene.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _renderer(scene_path: Path, cache: CacheDir) -> tuple[FrameRenderer, Any]:
    scene = load_scene(scene_path)
    ref = resolve_model(scene.model, scene.base_dir)
    jobs = plan(scene, resolve_env(scene, device="cpu", ref=ref))
    pipe = configure(load_pipeline(ref, device="cpu", dtype="float32"), scene)
    return FrameRenderer(pipe, scene, jobs, cache, device="cpu", dtype="float32"), jobs


def plain_diffusers(renderer: FrameRenderer, job: Any) -> Image.Image:
    """The frame as one plain diffusers call makes it: a float guidance scale, the frame's own
    strength, its embeddings, noise and generator."""
    recipe = job.recipe
    mode = recipe["mode"]["mode"]
    pipe = renderer._mode_pipe(mode)
    kwargs: dict[str, Any] = {
        "num_inference_steps": renderer.scene.steps,
        "guidance_scale": float(recipe["scalars"]["guidance"]),
        "generator": renderer._generators([job]),
        "output_type": "pil",
    }
    for name, value in conditioning(recipe["cond"], renderer.embeddings, {}).items():
        kwargs[name] = value
    for name, value in renderer._negative(job).items():
        kwargs[f"negative_{name}"] = value
    if "height" in inspect.signature(pipe.__call__).parameters:
        kwargs.update(height=32, width=32)
    noise = renderer.prepare_latents([job])
    if mode == "txt2img":
        return pipe(latents=noise, **kwargs).images[0]
    kwargs.update(
        image=[renderer._image(recipe["mode"]["init"])], strength=float(recipe["scalars"]["strength"])
    )
    if mode == "inpaint":
        kwargs["mask_image"] = [renderer._image(recipe["mode"]["mask"], "L")]
    with injected_noise(pipe, noise):
        return pipe(**kwargs).images[0]


CASES = [(family, mode) for family in sorted(MODELS) for mode in ("txt2img", "img2img")]
# The SD modes with pipelines of their own: legacy inpainting with the plain model, depth2img with its own.
CASES += [("sd", "inpaint"), ("sd", "depth2img")]


@pytest.mark.parametrize(("family", "mode"), CASES)
def test_eased_values_share_one_call_and_equal_plain_diffusers(
    family: str, mode: str, tmp_path: Path
) -> None:
    model = "tiny-depth" if mode == "depth2img" else MODELS[family]
    path = eased_scene(tmp_path, model, "" if mode == "txt2img" else mode, STRENGTHS[family])
    with CacheDir(tmp_path / "cache") as cache:
        renderer, jobs = _renderer(path, cache)
        guidance = [j.recipe["scalars"]["guidance"] for j in jobs]
        assert len(set(guidance)) == 4 and guidance[0] == 3.0 and guidance[3] == 9.0
        assert len({str(j.recipe["neg"]) for j in jobs}) == 4  # a negative prompt of its own per frame
        if mode != "txt2img":
            assert len({j.recipe["scalars"]["strength"] for j in jobs}) == 4
        assert len({j.batch_group(4, family) for j in jobs}) == 1
        calls: list[int] = []
        hook = denoiser(renderer.pipe).register_forward_pre_hook(lambda *_: calls.append(1))
        together = renderer.render_batch(list(jobs))
        batched = len(calls)
        alone = [plain_diffusers(renderer, j) for j in jobs]
        hook.remove()
    # One pipeline call: as many denoiser passes for the four frames as a one-frame call makes.
    assert batched * 5 == len(calls) and batched >= 2
    for i, (a, b) in enumerate(zip(together, alone, strict=True)):
        diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max()
        assert diff <= 1, f"frame {i}: {diff} levels from a one-frame diffusers call"
    # Guidance is not ignored inside the batch: frames 0 and 3 with each other's scale differ.
    assert np.abs(np.asarray(together[0], dtype=int) - np.asarray(together[3], dtype=int)).max() > 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_per_frame_guidance_rounds_as_a_float_scale_does(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 5).to(dtype)
    scales = [3.0, 7.37, 12.123456789]
    got = PerFrameGuidance(scales) * x
    assert got.dtype == dtype
    for i, scale in enumerate(scales):
        assert torch.equal(got[i], (scale * x[i : i + 1])[0])  # bit for bit
    g = PerFrameGuidance(scales)
    assert (g > 1, float(g), g.used) == (True, 3.0, 0)
    with pytest.raises(RuntimeError, match="3 frames met a tensor of shape"):
        g * torch.zeros(6, 4)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_denoised_steps_are_those_diffusers_runs(family: str, tmp_path: Path) -> None:
    with CacheDir(tmp_path / "cache") as cache:
        renderer, _ = _renderer(eased_scene(tmp_path, MODELS[family], "img2img"), cache)
        pipe = renderer._mode_pipe("img2img")
    strengths = sorted({i / 40 for i in range(41)} | {0.3085066163, 0.52, 0.97, 0.999, 1 / 3, 2 / 3})
    for steps in (*range(1, 13), 25, 30, 50):
        pipe.scheduler.set_timesteps(steps)
        by_count: dict[int, list[float]] = {}
        for strength in strengths:
            timesteps, count = pipe.get_timesteps(steps, strength, "cpu")
            assert denoised_steps(steps, strength, family) == count, (steps, strength)
            # Equal counts, equal timesteps: the frames of one group run the very same schedule.
            assert by_count.setdefault(count, timesteps.tolist()) == timesteps.tolist(), (steps, strength)


def test_what_shares_a_batch_group(tmp_path: Path, plan_text: Any) -> None:
    shutil.copytree(INPUTS, tmp_path / "inputs")
    scene = (
        "model: tiny\nsize: [64, 64]\nsteps: 10\nframes: 24\nnoise: travel\nmode: img2img\n"
        "init_image: inputs/landscape.png\nkeyframes:\n"
        "  - {frame: 0, prompt: a, negative_prompt: x, guidance: 3, strength: 0.3, seed: 1}\n"
        "  - {frame: 23, prompt: b, negative_prompt: y, guidance: 9, strength: 0.8, seed: 9, curve: ease_in_quad}\n"
    )
    jobs = pipeline.open(scene, base_dir=tmp_path, cache_dir=tmp_path / "cache").plan()
    groups = [j.batch_group(10, "sd") for j in jobs]
    counts = [denoised_steps(10, j.recipe["scalars"]["strength"], "sd") for j in jobs]
    # Frames group exactly by the denoising steps their strength leaves (3 to 8 of 10 here).
    assert [groups.index(g) for g in groups] == [counts.index(c) for c in counts]
    assert sorted(set(counts)) == [3, 4, 5, 6, 7, 8]
    # Guidance at or below 1 runs no negative branch: a group of its own.
    unguided, guided = plan_text(
        "guidance: 1.0\nkeyframes:\n  - {frame: 0, prompt: a}\n  - {frame: 3, prompt: b, guidance: 4, hold: true}\n"
    )[:2]
    assert "neg" in guided.recipe and "neg" not in unguided.recipe
    assert guided.batch_group(10, "sd") != unguided.batch_group(10, "sd")


def test_eased_img2img_scene_renders_in_full_batches(tmp_path: Path) -> None:
    """scenes/img2img.yaml eases strength from 0.3 to 0.8 over 24 frames at 10 steps, and one call made
    one frame before; now a call holds every frame whose strength leaves the same steps."""
    shutil.copytree(ROOT / "scenes" / "inputs", tmp_path / "inputs")
    shutil.copy(ROOT / "scenes" / "img2img.yaml", tmp_path / "img2img.yaml")
    sizes: list[int] = []

    class Flat:
        encoded = 0

        def render_batch(self, jobs: list[Any]) -> list[Any]:
            sizes.append(len(jobs))
            return [np.zeros((64, 64, 3), np.uint8)] * len(jobs)

    session = pipeline.open(
        tmp_path / "img2img.yaml", cache_dir=tmp_path / "cache", device="cpu", batch_size=4
    )
    session.render(renderer=Flat())
    counts = [denoised_steps(10, j.recipe["scalars"]["strength"], "sd") for j in session.plan()]
    per_count = [counts.count(c) for c in sorted(set(counts))]
    assert per_count == [11, 4, 3, 3, 2, 1]
    assert sorted(sizes) == [1, 2, 3, 3, 3, 4, 4, 4]  # 8 calls; 24 before


def test_eased_guidance_scene_renders_in_full_batches(tmp_path: Path) -> None:
    sizes: list[int] = []

    class Flat:
        encoded = 0

        def render_batch(self, jobs: list[Any]) -> list[Any]:
            sizes.append(len(jobs))
            return [Image.new("RGB", (32, 32), (1, 2, 3))] * len(jobs)

    scene = {
        "model": "tiny",
        "size": [32, 32],
        "steps": 2,
        "frames": 10,
        "noise": "travel",
        "keyframes": [
            {"frame": 0, "prompt": "a", "negative_prompt": "x", "guidance": 2.0, "seed": 1},
            {"frame": 9, "prompt": "b", "negative_prompt": "y", "guidance": 12.0, "seed": 5},
        ],
        "outputs": ["out.gif"],
    }
    session = pipeline.open(
        scene, base_dir=tmp_path, cache_dir=tmp_path / "cache", device="cpu", batch_size=4
    )
    session.render(renderer=Flat())
    assert sizes == [4, 4, 2]


def test_writer_stores_images_arrays_and_bytes_and_tells_each_frame_once(tmp_path: Path) -> None:
    import io

    png = io.BytesIO()
    Image.new("RGB", (32, 32), (7, 8, 9)).save(png, format="PNG")
    kinds = [
        lambda: Image.new("RGB", (32, 32), (7, 8, 9)),
        lambda: np.full((32, 32, 3), (7, 8, 9), np.uint8),
        png.getvalue,
    ]
    told: list[str] = []
    unstored_at_call: list[int] = []
    returned: list[str] = []

    class Kinds:
        encoded = 0

        def render_batch(self, jobs: list[Any]) -> list[Any]:
            # The writer holds at most the batch before: two batches of images at most, ever.
            unstored_at_call.append(len(returned) - len(told))
            returned.extend(j.key for j in jobs)
            return [kinds[j.frame % 3]() for j in jobs]

    def progress(event: Any) -> None:
        told.extend(event.keys)

    scene = {
        "model": "tiny",
        "size": [32, 32],
        "steps": 2,
        "frames": 11,
        "keyframes": [{"frame": 0, "prompt": "a"}, {"frame": 10, "prompt": "b"}],
        "outputs": ["out.gif"],
    }
    session = pipeline.open(
        scene, base_dir=tmp_path, cache_dir=tmp_path / "cache", device="cpu", batch_size=2
    )
    report = session.render(renderer=Kinds(), progress=progress)
    assert report.rendered == 11
    assert sorted(told) == sorted(j.key for j in session.plan())  # each frame told once, when stored
    assert max(unstored_at_call) <= 2 and len(unstored_at_call) == 6
    assert {f.getpixel((3, 3)) for f in session.frames()} == {(7, 8, 9)}


def test_a_frame_that_cannot_be_stored_fails_the_render_and_keeps_the_frames_before(tmp_path: Path) -> None:
    class Broken:
        encoded = 0

        def render_batch(self, jobs: list[Any]) -> list[Any]:
            return [np.zeros((32, 32, 3), np.uint8) if j.frame < 4 else "not an image" for j in jobs]

    scene = {
        "model": "tiny",
        "size": [32, 32],
        "steps": 2,
        "frames": 8,
        "keyframes": [{"frame": 0, "prompt": "a"}, {"frame": 7, "prompt": "b"}],
        "outputs": ["out.gif"],
    }
    session = pipeline.open(
        scene, base_dir=tmp_path, cache_dir=tmp_path / "cache", device="cpu", batch_size=2
    )
    with pytest.raises(Exception, match="returned a str for a frame; expected a PIL image"):
        session.render(renderer=Broken())
    status = [f.cached for f in session.status()]
    assert status == [True] * 4 + [False] * 4


def test_the_writer_keeps_what_it_stored_pending_until_the_driver_collects_it() -> None:
    """The driver waits on the writer while it holds anything to report: a batch it finished before the
    driver looked again must still be collected (else the driver polls for ever; this hung two
    processes sharing a cache)."""
    import threading
    import time
    from types import SimpleNamespace

    from pipeline.render.batches import _Writer

    stored = threading.Event()
    writer = _Writer(lambda job, png: stored.set())
    try:
        writer.put([(SimpleNamespace(key="k1"), b"png")])
        assert stored.wait(10)
        while writer._batch is not None:  # the batch is done: only the keys stored wait to be collected
            time.sleep(0.001)
        assert writer.pending
        assert writer.wait() == ["k1"]
        assert not writer.pending
    finally:
        writer.close()
