"""The embedded offline model ``pipeline/embedded/tiny`` loads and renders like a real checkpoint.

The model is made by ``tools/make_tiny_models.py``; its weights are random, so the pinned
pixel values below only change when that script (or the library versions) change.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

TINY = Path(__file__).resolve().parents[1] / "pipeline" / "embedded" / "tiny"
PROMPT = "A painting of a flooble"
# The real CLIP (SD 1.x) ids: <|startoftext|> a</w> painting</w> of</w> a</w> floo ble</w> <|endoftext|>
PROMPT_IDS = [49406, 320, 3086, 539, 320, 4062, 1059, 49407]
# Pixels of the 2-step 64x64 render with seed 0 (computed once with torch 2.13 CPU, diffusers 0.42.1).
PINNED_PIXELS = {
    (0, 0): [0.460187, 0.596074, 0.552609],
    (32, 32): [0.702877, 0.583723, 0.702285],
    (63, 63): [0.436940, 0.515458, 0.465977],
    (10, 50): [0.587859, 0.461100, 0.314696],
}


@pytest.fixture(scope="module")
def pipe() -> Iterator[object]:
    from diffusers import StableDiffusionPipeline

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        with warnings.catch_warnings():  # diffusers >= 0.42 prefers dtype=, which older ones lack
            warnings.filterwarnings("ignore", message=".*torch_dtype.* is deprecated", category=FutureWarning)
            pipeline = StableDiffusionPipeline.from_pretrained(
                TINY, torch_dtype=torch.float32, local_files_only=True
            )
        pipeline.set_progress_bar_config(disable=True)
        yield pipeline


def test_tokenizer_is_real_clip(pipe) -> None:
    tokenizer = pipe.tokenizer
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)
    assert tokenizer(PROMPT).input_ids == PROMPT_IDS
    padded = tokenizer(PROMPT, padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert padded == PROMPT_IDS + [49407] * (77 - len(PROMPT_IDS))


def test_components(pipe) -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.scheduler, PNDMScheduler)
    assert pipe.safety_checker is None
    assert pipe.feature_extractor is None
    assert pipe.text_encoder.config.vocab_size == 49408
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 8
    assert pipe.vae.config.latent_channels == pipe.unet.config.in_channels == 4
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    for model in (pipe.text_encoder, pipe.unet, pipe.vae):
        assert next(model.parameters()).dtype == torch.float32
    config = pipe.scheduler.config
    assert (config.beta_start, config.beta_end, config.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (config.skip_prk_steps, config.steps_offset, config.set_alpha_to_one) == (True, 1, False)


def test_render_is_pinned(pipe) -> None:
    image = pipe(
        PROMPT,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all()
    for (y, x), rgb in PINNED_PIXELS.items():
        np.testing.assert_allclose(image[0, y, x, :], rgb, atol=1e-3, err_msg=f"pixel {(y, x)}")


def test_text_encoder_weights_use_legacy_names() -> None:
    """transformers 4 only loads the ``text_model.``-prefixed names of SD checkpoints."""
    from safetensors import safe_open

    with safe_open(TINY / "text_encoder" / "model.safetensors", "pt") as weights:
        keys = list(weights.keys())
    assert "text_model.embeddings.token_embedding.weight" in keys
    assert all(key.startswith("text_model.") for key in keys)
