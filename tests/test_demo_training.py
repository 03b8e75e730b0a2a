"""``tools/train_demo_model.py``: its data, its score, and a few steps of training that resume.

The training runs at the ``test`` preset (16x16 images, a few thousand parameters) on 4 atlas
images for 2 + 2 steps: it checks the plumbing (checkpoint, resume, the saved pipeline folder
loading with ``from_pretrained`` offline), not that the model learns.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import yaml

from tools import train_demo_model as demo

REPO = Path(__file__).resolve().parent.parent


def test_atlas_has_the_curated_set_in_order() -> None:
    atlas, entries = demo.load_atlas()
    assert atlas.shape == (64, 3, 32, 32)
    assert atlas.min().item() >= -1.0 and atlas.max().item() <= 1.0
    assert [e["name"] for e in entries] == [name for name, *_ in demo.CURATED]
    assert entries[0]["emoji"] == "\U0001f436" and entries[0]["noun"] == "dog"
    assert (REPO / "tools" / "demo_data" / "ATTRIBUTION.md").is_file()
    # Each atlas image is its own nearest neighbour: the score's distance tells all 64 apart.
    assert demo.nearest(atlas, atlas).tolist() == list(range(64))


def test_captions_include_the_example_scenes_prompts() -> None:
    _, entries = demo.load_atlas()
    by_noun = {e["noun"]: set(demo.captions_for(e)) for e in entries}
    dog_cat = yaml.safe_load((REPO / "scenes" / "dog_cat.yaml").read_text(encoding="utf-8"))
    first, last = (k["prompt"] for k in dog_cat["keyframes"])
    assert first in by_noun["dog"] and last in by_noun["cat"]
    cows = yaml.safe_load((REPO / "scenes" / "cows_circle.yaml").read_text(encoding="utf-8"))
    assert cows["keyframes"][0]["prompt"] in by_noun["cow"]
    walk = yaml.safe_load((REPO / "scenes" / "walk.yaml").read_text(encoding="utf-8"))
    assert walk["walk"]["prompt"] in by_noun["dog"]
    assert "A watercolor painting of a golden retriever at the beach" in by_noun["dog"]


def _train(workdir: Path, unet_steps: int) -> None:
    args = ["--workdir", str(workdir), "--preset", "test", "--limit", "4", "--batch", "4", "--vae-steps", "2"]
    steps = ["--unet-steps", str(unet_steps), "--eval-every", "2", "--eval-steps", "2", "--save-every", "1"]
    demo.main(["train", *args, *steps, "--log-every", "1", "--stop-after", "0"])


def test_training_checkpoints_resumes_and_saves_a_loadable_pipeline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    _train(tmp_path, unet_steps=2)
    first = torch.load(tmp_path / "state.pt", weights_only=False)
    assert (first["state"]["phase"], first["state"]["vae_step"], first["state"]["unet_step"]) == (
        "unet",
        2,
        2,
    )
    capsys.readouterr()

    _train(tmp_path, unet_steps=4)
    log = capsys.readouterr().out
    assert "resumed in" in log and "vae step 2, unet step 2" in log
    assert "unet step 3 " in log and "unet step 1 " not in log  # continues, does not start over
    second = torch.load(tmp_path / "state.pt", weights_only=False)
    assert (second["state"]["vae_step"], second["state"]["unet_step"]) == (2, 4)
    # The VAE was frozen after its phase: the resumed run left it alone.
    for name, value in first["vae"].items():
        assert torch.equal(value, second["vae"][name]), name

    scores = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [s["step"] for s in scores] == [2, 4]
    assert scores[0]["chance"] == 0.25 and 0 <= scores[-1]["scene"] <= 1
    assert (tmp_path / "samples_000004.png").is_file()

    with warnings.catch_warnings():  # diffusers >= 0.42 prefers dtype=, which older ones lack
        warnings.filterwarnings("ignore", message=".*torch_dtype.* is deprecated", category=FutureWarning)
        pipe = StableDiffusionPipeline.from_pretrained(
            tmp_path / "pipeline", torch_dtype=torch.float32, local_files_only=True
        )
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.vae.config.scaling_factor == pytest.approx(second["vae_scaling_factor"])
    # The saved UNet is the EMA one, in float16.
    name, value = next(iter(second["ema_unet"].items()))
    assert torch.equal(pipe.unet.state_dict()[name], value.half().float())
    assert len(pipe.tokenizer) == 49408
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a dog",
        height=16,
        width=16,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, 16, 16, 3)


DEMO = REPO / "pipeline" / "embedded" / "demo"


@pytest.mark.slow
@pytest.mark.skipif(not DEMO.is_dir(), reason="the trained demo model is not embedded yet (issue 16)")
def test_embedded_demo_model_draws_its_prompts() -> None:
    """Issue 16's semantic score: 2 seeds per class, the render's nearest atlas image is its own class's
    in at least 60% of cases (chance 1/64); the dog/cat morph's ends are nearer the dog and the cat."""
    import torch
    from diffusers import StableDiffusionPipeline

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.* is deprecated", category=FutureWarning)
        pipe = StableDiffusionPipeline.from_pretrained(DEMO, torch_dtype=torch.float32, local_files_only=True)
    atlas, entries = demo.load_atlas()
    result, _ = demo.evaluate(pipe, atlas, entries, 32, kinds=("scene",))
    assert result["scene"] >= 0.6, result
    assert result["morph"], result
