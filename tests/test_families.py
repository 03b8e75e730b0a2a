"""Model families and schedulers with the embedded models: every scheduler by name, batch invariance in
every mode and family, checkpoints saved to a folder rendering by path, and what a model cannot do."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.plan.planner import plan
from pipeline.render.environment import resolve_env
from pipeline.render.models import load_pipeline, resolve_model
from pipeline.render.renderer import FrameRenderer, configure
from pipeline.scene.load import load_scene
from pipeline.schedulers import SCHEDULERS, scheduler_names
from pipeline.store.cache import CacheDir
from tests.conftest import run_render

ROOT = Path(__file__).resolve().parent.parent
INPUTS = ROOT / "scenes" / "inputs"

MODE_SCENES = {
    "txt2img-sd": ("tiny", ""),
    "img2img-sd": ("tiny", "mode: img2img\ninit_image: inputs/landscape.png\nstrength: 0.6\n"),
    "inpaint-sd-legacy": (
        "tiny",
        "mode: inpaint\ninit_image: inputs/landscape.png\nmask: inputs/house_mask.png\nstrength: 0.8\n",
    ),
    "inpaint-inpainting-checkpoint": (
        "tiny-inpaint",
        "mode: inpaint\ninit_image: inputs/landscape.png\nmask: inputs/house_mask.png\n",
    ),
    "depth2img-estimated": (
        "tiny-depth",
        "mode: depth2img\ninit_image: inputs/landscape.png\nstrength: 0.7\n",
    ),
    "depth2img-given": (
        "tiny-depth",
        "mode: depth2img\ninit_image: inputs/landscape.png\ndepth_map: inputs/landscape_depth.png\n",
    ),
    "feedback-sd": ("tiny", "mode: feedback\ninit_image: inputs/landscape.png\nstrength: 0.5\nzoom: 1.1\n"),
    "txt2img-sdxl": ("tiny-sdxl", ""),
    "img2img-sdxl": ("tiny-sdxl", "mode: img2img\ninit_image: inputs/landscape.png\nstrength: 0.6\n"),
    "txt2img-sd3": ("tiny-sd3", ""),
    "img2img-sd3": ("tiny-sd3", "mode: img2img\ninit_image: inputs/landscape.png\nstrength: 0.6\n"),
}


def make_scene(folder: Path, model: str, extra: str, *, noise: str = "per_frame", frames: int = 4) -> Path:
    shutil.copytree(INPUTS, folder / "inputs", dirs_exist_ok=True)
    path = folder / "scene.yaml"
    path.write_text(
        f"model: {model}\nsize: [32, 32]\nsteps: 3\nnoise: {noise}\n{extra}"
        f"keyframes:\n  - {{frame: 0, prompt: a house}}\n  - {{frame: {frames - 1}, prompt: a tower}}\n"
        "outputs: [out.gif]\n"
    )
    return path


def _renderer(scene_path: Path, cache: CacheDir) -> tuple[FrameRenderer, list]:
    scene = load_scene(scene_path)
    ref = resolve_model(scene.model, scene.base_dir)
    jobs = plan(scene, resolve_env(scene, device="cpu", ref=ref))
    pipe = configure(load_pipeline(ref, device="cpu", dtype="float32"), scene)
    return FrameRenderer(pipe, scene, jobs, cache, device="cpu", dtype="float32"), jobs


@pytest.mark.parametrize("case", sorted(MODE_SCENES))
def test_frames_do_not_depend_on_the_batch(case: str, tmp_path: Path) -> None:
    model, extra = MODE_SCENES[case]
    with CacheDir(tmp_path / "cache") as cache:
        renderer, jobs = _renderer(make_scene(tmp_path, model, extra), cache)
        renderer.encode_prompts(jobs.embeddings)
        # A feedback chain's first frame starts from the init image; later ones need their previous frame.
        picks = [jobs[0]] if "feedback" in case else list(jobs)[:3]
        latents = renderer.prepare_latents(picks)
        assert torch.equal(latents[-1:], renderer.prepare_latents(picks[-1:]))  # initial latents
        together = renderer.denoise(picks, latents)
        alone = [renderer.denoise([j], renderer.prepare_latents([j]))[0] for j in picks]
    for a, b in zip(together, alone, strict=True):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 2


@pytest.mark.parametrize("name", scheduler_names())
def test_every_scheduler_renders_by_name(name: str, tmp_path: Path) -> None:
    model = "tiny-sd3" if name == "flow_match_euler" else "tiny"
    scene = make_scene(tmp_path, model, f"scheduler: {name}\n", noise="fixed", frames=2)
    report = run_render(scene, tmp_path / "cache")
    assert report["rendered"] == 2
    parsed = load_scene(scene)
    with CacheDir(tmp_path / "cache") as cache:
        renderer, _jobs = _renderer(scene, cache)
        assert type(renderer.pipe.scheduler).__name__ == SCHEDULERS[name][0]
    assert parsed.scheduler == name


def test_ancestral_sampler_noise_comes_from_the_frame(tmp_path: Path) -> None:
    scene = make_scene(tmp_path, "tiny", "scheduler: euler_ancestral\n", noise="fixed", frames=4)
    with CacheDir(tmp_path / "cache") as cache:
        renderer, jobs = _renderer(scene, cache)
        renderer.encode_prompts(jobs.embeddings)
        picks = list(jobs)
        together = renderer.denoise(picks, renderer.prepare_latents(picks))
        alone = renderer.denoise(picks[2:3], renderer.prepare_latents(picks[2:3]))[0]
        again = renderer.denoise(picks[2:3], renderer.prepare_latents(picks[2:3]))[0]
    assert np.abs(np.asarray(together[2], dtype=int) - np.asarray(alone, dtype=int)).max() <= 2
    assert np.array_equal(np.asarray(alone), np.asarray(again))


@pytest.mark.parametrize(
    ("embedded", "pipeline_class"),
    [
        ("tiny", "StableDiffusionPipeline"),
        ("tiny-sdxl", "StableDiffusionXLPipeline"),
        ("tiny-sd3", "StableDiffusion3Pipeline"),
    ],
)
def test_checkpoint_of_each_family_saved_to_a_folder_renders_by_path(
    embedded: str, pipeline_class: str, tmp_path: Path
) -> None:
    """A user's local download loads by the same code path: save_pretrained, then ``model: <folder>``."""
    ref = resolve_model(embedded, tmp_path)
    pipe = load_pipeline(ref, device="cpu", dtype="float32")
    pipe.save_pretrained(tmp_path / "models" / "local")
    local = resolve_model("models/local", tmp_path)
    assert (local.kind, local.pipeline_class, local.family) == ("local", pipeline_class, ref.family)
    report = run_render(make_scene(tmp_path, "models/local", "", frames=3), tmp_path / "cache")
    assert report["rendered"] == 3


@pytest.mark.parametrize(
    ("model", "extra", "message"),
    [
        (
            "tiny-depth",
            "mode: img2img\ninit_image: inputs/landscape.png\n",
            "mode img2img is not possible with model 'tiny-depth'",
        ),
        ("tiny-inpaint", "", "mode txt2img is not possible with model 'tiny-inpaint'"),
        (
            "tiny-sdxl",
            "embeddings: [{path: inputs/tom_tiny.safetensors, token: '<tom>'}]\n",
            "learned embeddings work with SD 1.x/2.x models",
        ),
        ("tiny-sd3", "t5: true\n", "t5: true needs an SD3 model with a T5 text encoder"),
        ("tiny", "t5: true\n", "t5: true needs an SD3 model"),
    ],
)
def test_what_a_model_cannot_do_is_an_error_before_loading(
    model: str, extra: str, message: str, tmp_path: Path
) -> None:
    scene = make_scene(tmp_path, model, extra)
    code = (
        "import sys\nfrom pipeline.cli import main\n"
        f"try:\n    main([{str(scene)!r}, '--cache-dir', {str(tmp_path / 'c')!r}])\n"
        "except SystemExit as e:\n    print('EXIT', e.code, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert "EXIT 2 False" in out.stdout, out.stdout + out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr


# -- clip_skip: rendered in every family, computed as plain transformers computes it -------------


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl", "tiny-sd3"])
def test_clip_skip_renders_in_every_family(model: str, tmp_path: Path) -> None:
    # With transformers 5, diffusers' own SD 1.x/2.x clip_skip path raised AttributeError
    # ('CLIPTextModel' object has no attribute 'text_model') at render time.
    scene = make_scene(tmp_path, model, "clip_skip: 1\nnegative_prompt: blurry\n", noise="fixed", frames=2)
    report = run_render(scene, tmp_path / "cache")
    assert (report["rendered"], report["embeddings_encoded"]) == (2, 3)


def _plain_clip_layer(pipe: object, text: str, skip: int) -> torch.Tensor:
    """The reference: transformers alone, as AUTOMATIC1111 and diffusers define clip skip for SD 1.x/2.x:
    the hidden state ``skip`` layers before the last, through the text model's final layer norm."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder  # type: ignore[attr-defined]
    ids = tokenizer(
        text,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        out = encoder(ids, output_hidden_states=True)
        assert len(out.hidden_states) == encoder.config.num_hidden_layers + 1
        # Sanity of the indexing: the last hidden state through the norm is the model's own output.
        assert torch.equal(encoder.final_layer_norm(out.hidden_states[-1]), out.last_hidden_state)
        return encoder.final_layer_norm(out.hidden_states[-(skip + 1)])


def test_clip_skip_is_the_plain_transformers_layer_for_prompt_and_negative(tmp_path: Path) -> None:
    scene = make_scene(tmp_path, "tiny", "clip_skip: 1\nnegative_prompt: blurry\n", noise="fixed", frames=2)
    with CacheDir(tmp_path / "cache") as cache:
        renderer, jobs = _renderer(scene, cache)
        renderer.encode_prompts(jobs.embeddings)
        pipe = renderer.pipe
        for job in jobs:
            for part in ("cond", "neg"):  # clip_skip applies to the negative prompt too
                ((key, _weight),) = job.recipe[part]["a"]
                assert jobs.embeddings[key]["clip_skip"] == 1
                text = jobs.text(key)
                got = renderer.embeddings[key]["prompt_embeds"]
                expected = _plain_clip_layer(pipe, text, 1)
                assert torch.allclose(got, expected, atol=1e-6, rtol=0), (part, text)
                # ...and it is another layer than the last: clip_skip changes the conditioning.
                assert (got - _plain_clip_layer(pipe, text, 0)).abs().max() > 1e-2
        # clip_skip 0 is diffusers' own encode_prompt: the last layer, bit for bit as before.
        renderer.scene = renderer.scene.model_copy(update={"clip_skip": 0})
        assert torch.allclose(
            renderer._encode("a house")["prompt_embeds"], _plain_clip_layer(pipe, "a house", 0)
        )


def test_depth2img_in_float32_says_nothing_about_autocast(tmp_path: Path) -> None:
    # diffusers runs the depth estimator under torch.autocast(dtype=float32), which torch answers on a
    # CPU with "UserWarning: In CPU autocast, but the target dtype is not supported": `-q` printed it.
    scene = make_scene(tmp_path, "tiny-depth", MODE_SCENES["depth2img-estimated"][1], noise="fixed", frames=2)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        report = run_render(scene, tmp_path / "cache")
    assert report["rendered"] == 2
    assert [str(w.message) for w in seen if "autocast" in str(w.message)] == []


@pytest.mark.parametrize(("model", "too_many"), [("tiny", 3), ("tiny-sdxl", 2)])
def test_clip_skip_past_the_first_layer_is_bad_input(
    model: str, too_many: int, tmp_path: Path, capsys
) -> None:
    # The embedded encoders have 2 layers: SD 1.x/2.x read hidden_states[-(n + 1)], SDXL [-(n + 2)].
    # One more was an IndexError traceback from inside the encoder.
    from pipeline.cli import main

    scene = make_scene(tmp_path, model, f"clip_skip: {too_many}\n", noise="fixed", frames=2)
    with pytest.raises(SystemExit) as exc:
        main([str(scene), "--cache-dir", str(tmp_path / "cache"), "-q"])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    # Checked against the model's text encoder config before it loads: located, and nothing written.
    assert "scene.yaml:" in err and f"clip_skip {too_many} skips more layers than" in err, err
    assert "text_encoder has (2)" in err
    assert "Traceback" not in err
    assert not (tmp_path / "cache").exists()
