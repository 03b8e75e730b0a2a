"""The embedded offline models in ``pipeline/embedded`` load and render like real checkpoints.

``tiny`` (SD 1.x), ``tiny-inpaint``, ``tiny-depth``, ``tiny-sdxl`` and ``tiny-sd3`` are made
by ``tools/make_tiny_models.py``; their weights are random, so the pinned pixel values below
only change when that script (or the library versions) change.
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


# --------------------------------------------------------------------------------------
# The other embedded models: tiny-inpaint, tiny-depth, tiny-sdxl, tiny-sd3
# --------------------------------------------------------------------------------------

EMBEDDED = TINY.parent
PIPELINE_CLASSES = {
    "tiny": "StableDiffusionPipeline",
    "tiny-inpaint": "StableDiffusionInpaintPipeline",
    "tiny-depth": "StableDiffusionDepth2ImgPipeline",
    "tiny-sdxl": "StableDiffusionXLPipeline",
    "tiny-sd3": "StableDiffusion3Pipeline",
}


def load_embedded(name: str) -> object:
    """Load ``pipeline/embedded/<name>`` in float32, offline, with the class its model_index names.

    A ``[null, null]`` entry of model_index.json is passed as None: diffusers refuses to load
    a pipeline without a non-optional component (SD 3's text_encoder_3 / tokenizer_3) otherwise.
    """
    import json

    import diffusers

    folder = EMBEDDED / name
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    absent = {key: None for key, value in index.items() if isinstance(value, list) and value[0] is None}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        with warnings.catch_warnings():  # diffusers >= 0.42 prefers dtype=, which older ones lack
            warnings.filterwarnings("ignore", message=".*torch_dtype.* is deprecated", category=FutureWarning)
            pipeline = getattr(diffusers, index["_class_name"]).from_pretrained(
                folder, torch_dtype=torch.float32, local_files_only=True, **absent
            )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def render(pipeline, prompt: str | None = PROMPT, **kwargs) -> np.ndarray:
    """A 2-step render with a seeded CPU generator, as a (1, H, W, 3) float array."""
    with warnings.catch_warnings():  # depth2img asks for float32 CPU autocast, which torch declines
        warnings.filterwarnings("ignore", message=".*CPU autocast.*", category=UserWarning)
        return pipeline(
            prompt,
            num_inference_steps=2,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="np",
            **kwargs,
        ).images


def assert_pinned(image: np.ndarray, pinned: dict[tuple[int, int], list[float]]) -> None:
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all()
    for (y, x), rgb in pinned.items():
        np.testing.assert_allclose(image[0, y, x, :], rgb, atol=1e-3, err_msg=f"pixel {(y, x)}")


def gradient_image():
    """A 64x64 RGB gradient: the init image of the inpaint and depth renders."""
    from PIL import Image

    ramp = np.linspace(0, 255, 64)
    rgb = np.stack(
        [np.tile(ramp, (64, 1)), np.tile(ramp[:, None], (1, 64)), 255 - np.tile(ramp, (64, 1))], -1
    )
    return Image.fromarray(rgb.astype(np.uint8))


def square_mask():
    """White (repaint) in the middle 32x32 square, black elsewhere."""
    from PIL import Image

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    return mask


@pytest.mark.parametrize("name", sorted(PIPELINE_CLASSES))
def test_embedded_model_folder(name: str) -> None:
    """model_index names the pipeline class; the CLIP tokenizer files are the same in every model;
    CLIP text encoders are saved with SD's ``text_model.`` names."""
    import json

    from safetensors import safe_open

    folder = EMBEDDED / name
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    assert index["_class_name"] == PIPELINE_CLASSES[name]
    assert (folder / "README.md").is_file()
    for tokenizer in ("tokenizer", "tokenizer_2"):
        if index.get(tokenizer, [None])[0] is None:
            continue
        assert index[tokenizer] == ["transformers", "CLIPTokenizer"]
        for file in ("vocab.json", "merges.txt"):
            assert (folder / tokenizer / file).read_bytes() == (TINY / "tokenizer" / file).read_bytes()
    for encoder in ("text_encoder", "text_encoder_2"):
        if index.get(encoder, [None])[0] is None:
            continue
        with safe_open(folder / encoder / "model.safetensors", "pt") as weights:
            keys = list(weights.keys())
            assert weights.get_tensor(keys[0]).dtype == torch.float16
        assert "text_model.embeddings.token_embedding.weight" in keys
        assert all(key.startswith("text_model.") or key == "text_projection.weight" for key in keys)
        assert ("text_projection.weight" in keys) == (index[encoder][1] == "CLIPTextModelWithProjection")


# Pixels of the 2-step 64x64 renders with seed 0 (computed once with torch 2.13 CPU,
# diffusers 0.42.1, transformers 5.23.0).
INPAINT_PIXELS = {
    (0, 0): [0.458152, 0.597519, 0.570689],
    (32, 32): [0.662112, 0.296595, 0.469250],
    (63, 63): [0.448083, 0.533688, 0.490866],
}
# The depth render with a given depth map: it does not go through DPTImageProcessor, whose
# resizing differs between its PIL and torchvision backends (transformers picks the latter
# where torchvision is installed).
DEPTH_PIXELS = {
    (0, 0): [0.470245, 0.589545, 0.549264],
    (32, 32): [0.637212, 0.123100, 0.101501],
    (63, 63): [0.436735, 0.529134, 0.480938],
}
# The DPT's predicted depth (32x32) for a fixed input tensor.
DPT_DEPTHS = {(31, 31): 1.515114, (24, 8): 1.524054, (20, 12): 1.528508}
SDXL_PIXELS = {
    (0, 0): [0.457026, 0.601930, 0.561984],
    (32, 32): [0.611273, 0.357998, 0.559007],
    (63, 63): [0.452825, 0.517689, 0.460443],
}
SD3_PIXELS = {
    (0, 0): [0.520403, 0.541707, 0.501190],
    (32, 32): [0.661632, 0.783622, 0.478581],
    (63, 63): [0.492692, 0.512035, 0.529741],
}


def test_tiny_inpaint_renders() -> None:
    from diffusers import StableDiffusionInpaintPipeline

    pipe = load_embedded("tiny-inpaint")
    assert type(pipe) is StableDiffusionInpaintPipeline
    # 4 latent + 1 mask + 4 masked-image latent channels, as SD 1.5 inpainting.
    assert pipe.unet.config.in_channels == 9
    assert pipe.vae.config.latent_channels == pipe.unet.config.out_channels == 4
    image = render(pipe, image=gradient_image(), mask_image=square_mask(), height=64, width=64)
    assert_pinned(image, INPAINT_PIXELS)


def test_tiny_depth_renders() -> None:
    from diffusers import StableDiffusionDepth2ImgPipeline
    from transformers import DPTForDepthEstimation

    pipe = load_embedded("tiny-depth")
    assert type(pipe) is StableDiffusionDepth2ImgPipeline
    assert isinstance(pipe.depth_estimator, DPTForDepthEstimation)
    assert type(pipe.feature_extractor).__name__.startswith("DPTImageProcessor")
    assert pipe.unet.config.in_channels == 5  # 4 latent + 1 depth
    assert pipe.tokenizer.pad_token == "!"  # as SD 2's
    # A given depth map, (batch, height, width): a left-to-right ramp.
    depth_map = torch.linspace(0.0, 1.0, 64).repeat(64, 1)[None]
    given = render(pipe, image=gradient_image(), depth_map=depth_map)
    assert_pinned(given, DEPTH_PIXELS)
    # Without it the depth is estimated from the image by the (random) DPT.
    estimated = render(pipe, image=gradient_image())
    assert estimated.shape == (1, 64, 64, 3)
    assert np.isfinite(estimated).all()
    assert np.abs(estimated - given).max() > 1e-2
    pixel_values = torch.linspace(-1.0, 1.0, 3 * 32 * 32).reshape(1, 3, 32, 32)
    with torch.no_grad():
        depth = pipe.depth_estimator(pixel_values=pixel_values).predicted_depth
    assert depth.shape == (1, 32, 32)
    for (y, x), value in DPT_DEPTHS.items():
        assert depth[0, y, x].item() == pytest.approx(value, abs=1e-3), f"depth {(y, x)}"


def test_tiny_sdxl_renders() -> None:
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    pipe = load_embedded("tiny-sdxl")
    assert type(pipe) is StableDiffusionXLPipeline
    assert type(pipe.text_encoder) is CLIPTextModel
    assert type(pipe.text_encoder_2) is CLIPTextModelWithProjection
    assert pipe.config.force_zeros_for_empty_prompt is True
    assert (pipe.tokenizer.pad_token, pipe.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
    image = render(pipe, height=64, width=64)
    assert_pinned(image, SDXL_PIXELS)

    # The renderer's path: its own prompt embeddings (both encoders' hidden states, concatenated)
    # and the pooled embedding of text_encoder_2.
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    assert embeds.shape == (1, 77, 64)
    assert pooled.shape == (1, 32)
    assert negative is None and negative_pooled is None
    again = render(pipe, None, prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=64, width=64)
    np.testing.assert_allclose(again, image, atol=1e-5)


def test_tiny_sd3_renders() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    pipe = load_embedded("tiny-sd3")
    assert type(pipe) is StableDiffusion3Pipeline
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert pipe.vae.config.latent_channels == pipe.transformer.config.in_channels == 16
    assert pipe.scheduler.config.shift == 3.0
    image = render(pipe, "a dog", height=64, width=64)
    assert_pinned(image, SD3_PIXELS)

    # The renderer's path: prompt embeddings = the two CLIPs' hidden states (32 + 32), zero-padded
    # to joint_attention_dim (128), then 256 zero rows for the absent T5; pooled = 32 + 32.
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt="a dog", prompt_2=None, prompt_3=None, device="cpu", do_classifier_free_guidance=True
        )
    assert embeds.shape == negative.shape == (1, 77 + 256, 128)
    assert pooled.shape == negative_pooled.shape == (1, 64)
    assert not embeds[:, :77, 64:].any() and not embeds[:, 77:].any()
    again = render(
        pipe,
        None,
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=negative_pooled,
        height=64,
        width=64,
    )
    np.testing.assert_allclose(again, image, atol=1e-5)
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator("cpu").manual_seed(1))
    own = render(
        pipe,
        None,
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=negative_pooled,
        latents=latents,
        height=64,
        width=64,
    )
    assert own.shape == (1, 64, 64, 3) and np.isfinite(own).all()
    assert np.abs(own - image).max() > 1e-2
