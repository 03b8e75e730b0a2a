"""End-to-end renders with the embedded tiny model: exact incremental re-renders, outputs, and caches.

Every test here runs the real path: real CLIP tokenizer, real diffusers pipeline, real diskcache,
real ffmpeg. Scenes are 32x32 pixels with 2 steps so each render takes a second or two.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cli import main
from pipeline.plan.planner import plan
from pipeline.render.environment import RenderEnv, resolve_env
from pipeline.render.interpolate import noise_for
from pipeline.scene.load import load_scene, parse_scene
from pipeline.store.cache import CacheDir
from tests.conftest import run_render as render

ROOT = Path(__file__).resolve().parent.parent

THREE_KEYFRAMES = """
model: tiny
size: [32, 32]
steps: 2
guidance: 7.0
fps: {fps}
seed: 42
keyframes:
  - frame: 0
    prompt: "a dog in a field"
  - frame: 6
    prompt: "a fox in a field"
  - frame: 11
    prompt: "{last}"
outputs:
  - out.mp4
  - {{path: out.gif, rubber_band: {rubber}}}
"""


def write_scene(
    folder: Path, *, last: str = "a cat in a field", fps: int = 12, rubber: str = "true", steps: int = 2
) -> Path:
    text = THREE_KEYFRAMES.format(last=last, fps=fps, rubber=rubber).replace("steps: 2", f"steps: {steps}")
    path = folder / "scene.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def scene_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "scenes"
    folder.mkdir()
    return folder


def test_first_run_renders_everything_then_nothing(scene_dir: Path, tmp_path: Path) -> None:
    scene = write_scene(scene_dir)
    first = render(scene, tmp_path / "cache")
    assert (first["frames"], first["rendered"], first["cached"]) == (12, 12, 0)
    out = scene_dir / "renders" / "scene"
    record = ["out.srt", "scene.frames.csv", "scene.frames.json", "scene.record.json", "scene.scene.yaml"]
    page = ["index.html", "page"]  # the render page and its pictures (tests/test_page.py)
    assert sorted(p.name for p in out.iterdir()) == sorted(["out.gif", "out.mp4", *record, *page])
    second = render(scene, tmp_path / "cache")
    assert (second["rendered"], second["cached"]) == (0, 12)
    assert set(second["output_status"].values()) == {"up to date"}


def test_output_frame_counts(scene_dir: Path, tmp_path: Path) -> None:
    import imageio.v2 as iio

    scene = write_scene(scene_dir)
    render(scene, tmp_path / "cache")
    out = scene_dir / "renders" / "scene"
    assert Image.open(out / "out.gif").n_frames == 12 + 12 - 3  # rubber band: frames + frames[2:-1][::-1]
    assert iio.get_reader(out / "out.mp4").count_frames() == 12


def test_editing_last_keyframe_rerenders_only_the_last_segment(scene_dir: Path, tmp_path: Path) -> None:
    scene = write_scene(scene_dir)
    render(scene, tmp_path / "cache")
    write_scene(scene_dir, last="a cow in a field")
    again = render(scene, tmp_path / "cache")
    # Frames 7..11 lie after the middle keyframe (frame 6); frames 0..6 do not depend on the last prompt.
    assert again["rendered"] == 5
    assert again["cached"] == 7


def test_fps_and_rubber_band_render_nothing_but_rewrite_outputs(scene_dir: Path, tmp_path: Path) -> None:
    scene = write_scene(scene_dir)
    render(scene, tmp_path / "cache")
    gif = scene_dir / "renders" / "scene" / "out.gif"
    write_scene(scene_dir, fps=24)
    faster = render(scene, tmp_path / "cache")
    assert faster["rendered"] == 0
    assert set(faster["output_status"].values()) == {"written"}
    write_scene(scene_dir, fps=24, rubber="false")
    plain = render(scene, tmp_path / "cache")
    assert plain["rendered"] == 0
    assert plain["output_status"][str(gif)] == "written"
    assert Image.open(gif).n_frames == 12


def test_changing_steps_rerenders_every_frame(scene_dir: Path, tmp_path: Path) -> None:
    scene = write_scene(scene_dir)
    render(scene, tmp_path / "cache")
    again = render(write_scene(scene_dir, steps=3), tmp_path / "cache")
    assert (again["rendered"], again["cached"]) == (12, 0)


def test_same_prompt_in_another_scene_reuses_its_embedding(scene_dir: Path, tmp_path: Path) -> None:
    first = render(write_scene(scene_dir), tmp_path / "cache")
    assert first["embeddings_encoded"] == 4  # three prompts and the empty negative prompt
    other = tmp_path / "other"
    other.mkdir()
    # Same prompts, different noise: every frame renders, no prompt is encoded again.
    text = write_scene(scene_dir).read_text().replace("seed: 42", "seed: 7")
    (other / "second.yaml").write_text(text)
    second = render(other / "second.yaml", tmp_path / "cache")
    assert second["rendered"] == 12
    assert second["embeddings_encoded"] == 0


def test_noop_rerun_does_not_import_torch(scene_dir: Path, tmp_path: Path) -> None:
    scene = write_scene(scene_dir)
    render(scene, tmp_path / "cache")
    code = (
        "import sys; from pipeline.cli import main\n"
        "try:\n"
        f"    main([{str(scene)!r}, '--cache-dir', {str(tmp_path / 'cache')!r}, '-q'])\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "0 rendered, 12 cached" in out.stdout
    assert out.stdout.strip().endswith("NO-TORCH")


def test_failed_output_write_keeps_previous_file(
    scene_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scene = write_scene(scene_dir)
    render(scene, tmp_path / "cache")
    gif = scene_dir / "renders" / "scene" / "out.gif"
    before = gif.read_bytes()
    write_scene(scene_dir, fps=6)  # outputs must be rewritten

    import pipeline.outputs.gif as gif_writer

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gif_writer, "_quantize", broken)
    with pytest.raises(SystemExit) as exc:
        main([str(scene), "--cache-dir", str(tmp_path / "cache"), "-q"])
    assert exc.value.code == 1
    assert gif.read_bytes() == before
    assert not [p for p in gif.parent.iterdir() if ".partial-" in p.name]


def _env() -> RenderEnv:
    return RenderEnv(
        model="tiny",
        pipeline_class="StableDiffusionPipeline",
        family="sd",
        fingerprint={"unet": "u", "vae": "v", "text_encoder": "t", "tokenizer": "k"},
        scheduler_config={},
    )


@pytest.mark.parametrize("noise", ["fixed", "per_frame", "{kind: circle, seeds: [1, 2]}"])
def test_initial_latents_do_not_depend_on_the_batch(noise: str) -> None:
    text = f"size: [64, 64]\nframes: 10\nnoise: {noise}\nkeyframes:\n  - {{frame: 0, prompt: a}}\n  - {{frame: 9, prompt: b}}\n"
    scene = parse_scene(text, "n.yaml")
    jobs = plan(scene, _env())
    shape = (4, 8, 8)
    alone = [noise_for(j.recipe["noise"], shape) for j in jobs]
    together = torch.stack([noise_for(j.recipe["noise"], shape) for j in reversed(jobs.jobs)]).flip(0)
    for i, latent in enumerate(alone):
        assert torch.equal(latent, together[i])


def test_circle_walk_closes_the_loop() -> None:
    scene = parse_scene(
        "frames: 8\nnoise: {kind: circle, seeds: [3, 4]}\nkeyframes:\n  - {frame: 0, prompt: cows}\n",
        "c.yaml",
    )
    jobs = plan(scene, _env())
    shape = (4, 8, 8)
    first = noise_for(jobs[0].recipe["noise"], shape)
    # The step after the last frame lands on the first frame again.
    after_last = noise_for({"circle": [3, 4], "s": 8 / 8}, shape)
    torch.testing.assert_close(after_last, first, atol=1e-6, rtol=0)
    assert not torch.allclose(noise_for(jobs[7].recipe["noise"], shape), first)
    closed = parse_scene(
        "frames: 8\nnoise: {kind: circle, seeds: [3, 4], endpoint: true}\nkeyframes:\n  - {frame: 0, prompt: cows}\n",
        "c.yaml",
    )
    cjobs = plan(closed, _env())
    torch.testing.assert_close(
        noise_for(cjobs[7].recipe["noise"], shape),
        noise_for(cjobs[0].recipe["noise"], shape),
        atol=1e-6,
        rtol=0,
    )


def test_pinned_pixels_of_tiny_at_two_steps(scene_dir: Path, tmp_path: Path) -> None:
    scene = write_scene(scene_dir)
    render(scene, tmp_path / "cache", "--device", "cpu")
    parsed = load_scene(scene)
    jobs = plan(parsed, resolve_env(parsed, device="cpu"))
    with CacheDir(tmp_path / "cache") as cache:
        frame0 = np.asarray(Image.open(io.BytesIO(cache.frames.get(jobs[0].key))))
        frame6 = np.asarray(Image.open(io.BytesIO(cache.frames.get(jobs[6].key))))
    assert frame0.shape == (32, 32, 3)
    # Pinned from a CPU float32 render; +-2 levels absorbs BLAS differences between machines.
    got = np.array([frame0[0, 0], frame0[16, 16], frame6[16, 16]], dtype=int)
    expected = np.array([[109, 151, 147], [130, 0, 22], [127, 0, 18]])
    assert np.abs(got - expected).max() <= 2, got.tolist()
