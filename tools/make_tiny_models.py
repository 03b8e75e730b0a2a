"""Regenerate the tiny offline models embedded in ``pipeline/embedded/``.

Each model is a complete diffusers pipeline folder that loads exactly like a downloaded
checkpoint, e.g. ``StableDiffusionPipeline.from_pretrained("pipeline/embedded/tiny")``.
The weights are RANDOM (seeded, so reproducible): the images are noise-like patterns. The
models exist only so that tests and demos run offline, in seconds, on a CPU.

Models
------
``tiny``
    Stable Diffusion 1.x architecture: the real CLIP BPE tokenizer (49408 tokens, the same
    ids as SD), a 2-layer CLIP text encoder of width 32, a two-level UNet (one resnet per
    level, 1.6x faster on a CPU than SD's two), a four-block VAE (downsampling factor 8, as
    in SD: a 512x512 image is a 4x64x64 latent) and SD 1.5's PNDM scheduler. Weights are
    stored as float16 safetensors.
``tiny-inpaint``
    ``tiny`` with a 9-channel UNet input (4 latent + 1 mask + 4 masked-image latent), as in
    ``runwayml/stable-diffusion-inpainting``: a ``StableDiffusionInpaintPipeline``.
``tiny-depth``
    A ``StableDiffusionDepth2ImgPipeline`` like ``stabilityai/stable-diffusion-2-depth``: a
    5-channel UNet input (4 latent + 1 depth), SD 2's text side (tokenizer padded with
    ``!``, GELU, linear attention projections), a tiny ``DPTForDepthEstimation`` (ViT, 2
    layers, 32x32 input) and its ``DPTImageProcessor``.
``tiny-sdxl``
    A ``StableDiffusionXLPipeline``: ``CLIPTextModel`` + ``CLIPTextModelWithProjection``
    (their hidden states concatenated), a ``text_time`` UNet fed the pooled embedding and
    the six size/crop ids, SDXL base's Euler scheduler and VAE scaling factor.
``tiny-sd3``
    A ``StableDiffusion3Pipeline`` without T5 (``text_encoder_3`` = ``tokenizer_3`` = None):
    two ``CLIPTextModelWithProjection`` (CLIP-L and CLIP-G stand-ins), a 2-layer
    ``SD3Transformer2DModel``, a 16-channel VAE with SD 3's scaling and shift factors and
    the ``FlowMatchEulerDiscreteScheduler`` with shift 3.

Every model uses the same tokenizer files (the two-tokenizer models also pad one of them
with ``!``, like SD 2 / SDXL / SD 3, which changes only the two small JSON configs), and
every component is seeded with ``torch.manual_seed(0)`` before it is built.

Usage
-----
::

    python tools/make_tiny_models.py                  # build every model
    python tools/make_tiny_models.py tiny tiny-sdxl   # build only these
    python tools/make_tiny_models.py --bpe PATH/bpe_simple_vocab_16e6.txt.gz

The tokenizer vocabulary comes from OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (the file
OpenAI's CLIP ``simple_tokenizer`` reads). Where ``--bpe`` is not given, the script runs
``python -m pip download --no-deps open_clip_torch==3.3.0`` into a temporary folder and
takes the file from the wheel (``open_clip/bpe_simple_vocab_16e6.txt.gz``); ``--bpe`` also
accepts the path of that wheel. The file's sha256 is checked either way.

The output is byte-for-byte reproducible for a given torch / diffusers / transformers: the
only version-dependent bytes are the ``_diffusers_version`` and ``transformers_version``
fields that ``save_pretrained`` writes into the JSON configs (and, in principle, the random
initialisation, should a library change its default initialisers).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_DIR = REPO_ROOT / "pipeline" / "embedded"

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
OPEN_CLIP_WHEEL = "open_clip_torch==3.3.0"
OPEN_CLIP_MEMBER = f"open_clip/{BPE_FILENAME}"

# CLIP's special tokens, as in openai/clip-vit-large-patch14 (SD 1.x's tokenizer).
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
CLIP_VOCAB_SIZE = 49408
CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407
CLIP_MAX_LENGTH = 77
# Real CLIP ids of "A painting of a flooble": a conversion check.
EXPECTED_IDS = [49406, 320, 3086, 539, 320, 4062, 1059, 49407]

TINY_README = """\
# `tiny`: an embedded, offline, RANDOM Stable Diffusion model

A complete Stable Diffusion 1.x-architecture pipeline folder in diffusers format, small
enough (a few MB) to ship inside the package. It loads like any downloaded checkpoint:

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("pipeline/embedded/tiny", torch_dtype=torch.float32)
```

**The weights are random** (seeded, reproducible), so the images are noise-like patterns,
not pictures of the prompt. The model is only for offline tests and demos: it renders a
64x64 frame on a CPU in a fraction of a second, without a network or a GPU.

| component | what |
|---|---|
| tokenizer | the real CLIP BPE tokenizer (49408 tokens, ids as in SD 1.x, 77 tokens, padded with `<\\|endoftext\\|>`) |
| text_encoder | `CLIPTextModel`, width 32, 2 layers, 4 heads |
| unet | `UNet2DConditionModel`, channels (32, 64), cross-attention width 32 |
| vae | `AutoencoderKL`, four blocks (8, 16, 32, 32): downsampling factor 8 as in SD, `scaling_factor` 0.18215 |
| scheduler | `PNDMScheduler` with SD 1.5's configuration |
| safety_checker, feature_extractor | none |

Weights are stored as float16 safetensors; load them with `torch_dtype=torch.float32` on a CPU.

Regenerate (byte-for-byte identical for the same library versions) with:

```
python tools/make_tiny_models.py
```

Real checkpoints are not embedded: name one in a scene's `model:` field, either by its
Hugging Face id (e.g. `stable-diffusion-v1-5/stable-diffusion-v1-5`) or by a local folder.
"""


# --------------------------------------------------------------------------------------
# CLIP tokenizer files
# --------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def find_bpe(bpe: Path | None, workdir: Path) -> Path:
    """Return the path of ``bpe_simple_vocab_16e6.txt.gz``, checked against its sha256.

    ``bpe`` may be the ``.gz`` itself or an ``open_clip_torch`` wheel; when it is None the
    wheel is fetched with pip into ``workdir``.
    """
    if bpe is None:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                OPEN_CLIP_WHEEL,
                "-d",
                str(workdir),
            ],
            check=True,
        )
        wheels = sorted(workdir.glob("open_clip_torch-*.whl"))
        if not wheels:
            raise FileNotFoundError(f"pip download of {OPEN_CLIP_WHEEL} gave no wheel in {workdir}")
        bpe = wheels[0]
    if bpe.suffix == ".whl":
        target = workdir / BPE_FILENAME
        with zipfile.ZipFile(bpe) as wheel, wheel.open(OPEN_CLIP_MEMBER) as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        bpe = target
    digest = _sha256(bpe)
    if digest != BPE_SHA256:
        raise ValueError(f"{bpe}: sha256 {digest} is not OpenAI's {BPE_FILENAME} ({BPE_SHA256})")
    return bpe


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's map from the 256 byte values to printable unicode characters (GPT-2 / CLIP)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def clip_vocab_and_merges(bpe: Path) -> tuple[dict[str, int], list[str]]:
    """Convert the BPE file exactly as OpenAI's ``simple_tokenizer`` (and HF) do."""
    with gzip.open(bpe) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    pairs = [tuple(merge.split()) for merge in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab.extend("".join(pair) for pair in pairs)
    vocab.extend([BOS_TOKEN, EOS_TOKEN])
    encoder = {token: i for i, token in enumerate(vocab)}
    if (
        len(encoder) != CLIP_VOCAB_SIZE
        or encoder[BOS_TOKEN] != CLIP_BOS_ID
        or encoder[EOS_TOKEN] != CLIP_EOS_ID
    ):
        raise ValueError(f"{bpe}: unexpected vocabulary ({len(encoder)} tokens)")
    return encoder, [" ".join(pair) for pair in pairs]


def write_clip_tokenizer(folder: Path, bpe: Path, pad_token: str = EOS_TOKEN) -> None:
    """Write SD 1.x's tokenizer folder: vocab.json, merges.txt and the two small configs.

    ``pad_token`` is ``<|endoftext|>`` as in SD 1.x, or ``!`` (id 0) as in the OpenCLIP
    tokenizers of SD 2, SDXL's ``tokenizer_2`` and SD 3's ``tokenizer_2``; only the two JSON
    configs depend on it.

    The files are written directly, in the layout of ``openai/clip-vit-large-patch14`` and
    the SD 1.x repositories, rather than with ``CLIPTokenizer.save_pretrained``: with
    transformers 5 that writes only a 3.6 MB ``tokenizer.json`` (which transformers 4's slow
    ``CLIPTokenizer`` cannot read) and machine-specific keys (``is_local``). The folder is
    then loaded back with ``CLIPTokenizer`` and checked against the real CLIP ids.
    """
    from transformers import CLIPTokenizer

    encoder, merges = clip_vocab_and_merges(bpe)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8"
    )
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": pad_token, "unk_token": EOS_TOKEN}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": CLIP_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special,
    }
    for name, content in (("special_tokens_map.json", special), ("tokenizer_config.json", config)):
        (folder / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    tokenizer = CLIPTokenizer.from_pretrained(folder)
    ids = tokenizer("A painting of a flooble").input_ids
    if (
        len(tokenizer) != CLIP_VOCAB_SIZE
        or ids != EXPECTED_IDS
        or tokenizer.pad_token_id != encoder[pad_token]
    ):
        raise ValueError(
            f"tokenizer check failed: {len(tokenizer)} tokens, ids {ids}, pad {tokenizer.pad_token_id}"
        )


def add_clip_text_prefix(weights: Path) -> None:
    """Give a saved ``CLIPTextModel``'s weights the ``text_model.`` key prefix of SD checkpoints.

    transformers 5 dropped the ``text_model`` submodule and saves a freshly built model
    without the prefix (it only restores legacy names for models it loaded from a legacy
    checkpoint); transformers 4 cannot load such a file (its weights would stay random
    and different). transformers 5 reads the prefixed names, like every real SD checkpoint.
    Only for ``CLIPTextModel``: ``CLIPTextModelWithProjection`` keeps its ``text_model``
    submodule and saves the SD names (``text_model.*``, ``text_projection.weight``) itself.
    """
    from safetensors.torch import load_file, save_file

    prefix = "text_model."
    state = load_file(weights)
    state = {key if key.startswith(prefix) else prefix + key: value for key, value in state.items()}
    save_file(state, weights, metadata={"format": "pt"})


# --------------------------------------------------------------------------------------
# Shared components
# --------------------------------------------------------------------------------------

# The pad token of SD 2's tokenizer and of the second CLIP tokenizer of SDXL and SD 3.
OPEN_CLIP_PAD_TOKEN = "!"


def clip_text_config(
    pad_token_id: int = CLIP_EOS_ID, hidden_act: str = "quick_gelu", projection_dim: int = 32
):
    """A 2-layer CLIP text encoder of width 32 over the real CLIP vocabulary.

    ``hidden_act`` is ``quick_gelu`` for OpenAI's CLIP-L (SD 1.x, SDXL's and SD 3's first
    encoder) and ``gelu`` for the OpenCLIP ones (SD 2's ViT-H, SDXL's and SD 3's bigG).
    """
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=37,
        projection_dim=projection_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=pad_token_id,
    )


def sd_unet(**overrides):
    """``tiny``'s two-level UNet; ``overrides`` change its config (e.g. ``in_channels``)."""
    from diffusers import UNet2DConditionModel

    config = dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    config.update(overrides)
    return UNet2DConditionModel(**config)


def sd_vae(**overrides):
    """``tiny``'s four-block VAE (downsampling factor 8); ``overrides`` change its config."""
    from diffusers import AutoencoderKL

    config = dict(
        sample_size=512,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        scaling_factor=0.18215,
    )
    config.update(overrides)
    return AutoencoderKL(**config)


def sd_pndm_scheduler():
    """The PNDM scheduler configuration of SD 1.5 (also that of SD 1.5 inpainting and SD 2 depth)."""
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    # SD 1.5's scheduler_config.json also says clip_sample: false. PNDM ignores it, but a
    # scheduler made with e.g. DDIMScheduler.from_config(pipe.scheduler.config) reads it.
    scheduler.register_to_config(clip_sample=False)
    return scheduler


def seeded(build: Callable[[], object]) -> object:
    """``build()`` right after ``torch.manual_seed(0)``: each component's weights depend only on itself."""
    import torch

    torch.manual_seed(0)
    return build()


def save_pipeline(
    folder: Path,
    bpe: Path,
    readme: str,
    pipeline_class: type,
    tokenizers: dict[str, str],
    config_overrides: dict[str, tuple[str, str]] | None = None,
    **components: object,
) -> None:
    """Save a pipeline made of ``components`` into ``folder`` (replaced) as a diffusers checkpoint.

    ``tokenizers`` maps each tokenizer component (``tokenizer``, ``tokenizer_2``) to its pad
    token: their files are written by :func:`write_clip_tokenizer`, put back after
    ``save_pretrained`` (which would rewrite them). Every ``torch.nn.Module`` is stored in
    float16; ``CLIPTextModel`` weights get SD's ``text_model.`` prefix (see
    :func:`add_clip_text_prefix`; ``CLIPTextModelWithProjection`` already has it).
    ``config_overrides`` replaces ``model_index.json`` entries (library, class). Other
    keyword arguments go to ``pipeline_class`` as they are (``None`` components, flags).
    """
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)

    with tempfile.TemporaryDirectory() as tmp:
        for name, pad_token in tokenizers.items():
            write_clip_tokenizer(Path(tmp) / name, bpe, pad_token=pad_token)
            components[name] = CLIPTokenizer.from_pretrained(Path(tmp) / name)
        for value in components.values():
            if isinstance(value, torch.nn.Module):
                value.to(torch.float16)

        pipe = pipeline_class(**components)
        if config_overrides:
            pipe.register_to_config(**config_overrides)
        pipe.save_pretrained(folder, safe_serialization=True)
        for name in tokenizers:
            shutil.rmtree(folder / name)
            shutil.copytree(Path(tmp) / name, folder / name)

    for name, value in components.items():
        if type(value) is CLIPTextModel:
            add_clip_text_prefix(folder / name / "model.safetensors")
    (folder / "README.md").write_text(readme, encoding="utf-8")
    for path in folder.rglob("*"):  # save_pretrained leaves some files 0600
        path.chmod(0o755 if path.is_dir() else 0o644)


def model_card(
    name: str,
    pipeline_class: str,
    intro: str,
    rows: list[tuple[str, str]],
    notes: str = "",
    load_kwargs: str = "",
) -> str:
    """The README.md of an embedded model, in the layout of ``tiny``'s.

    ``load_kwargs`` is appended to the ``from_pretrained`` call of the usage example.
    """
    table = "".join(f"| {component} | {what} |\n" for component, what in rows)
    return f"""\
# `{name}`: an embedded, offline, RANDOM {intro}

It is a complete pipeline folder in diffusers format, small enough (a few MB) to ship inside
the package, and loads like any downloaded checkpoint:

```python
from diffusers import {pipeline_class}
pipe = {pipeline_class}.from_pretrained("pipeline/embedded/{name}", torch_dtype=torch.float32{load_kwargs})
```

**The weights are random** (seeded, reproducible), so the images are noise-like patterns,
not pictures of the prompt. The model is only for offline tests and demos: it renders a
64x64 frame on a CPU in a fraction of a second, without a network or a GPU.

| component | what |
|---|---|
{table}
{notes}Weights are stored as float16 safetensors; load them with `torch_dtype=torch.float32` on a CPU.
The tokenizer is the real CLIP BPE tokenizer (49408 tokens, the ids of SD), 77 tokens.

Regenerate (byte-for-byte identical for the same library versions) with:

```
python tools/make_tiny_models.py {name}
```
"""


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


def build_tiny(folder: Path, bpe: Path) -> None:
    """The ``tiny`` SD 1.x-architecture pipeline with random float16 weights."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    unet = seeded(sd_unet)
    vae = seeded(sd_vae)
    text_encoder = seeded(lambda: CLIPTextModel(clip_text_config()))
    save_pipeline(
        folder,
        bpe,
        TINY_README,
        StableDiffusionPipeline,
        tokenizers={"tokenizer": EOS_TOKEN},
        vae=vae,
        text_encoder=text_encoder,
        unet=unet,
        scheduler=sd_pndm_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_inpaint(folder: Path, bpe: Path) -> None:
    """``tiny`` with the 9-channel UNet input of SD 1.5 inpainting."""
    from diffusers import StableDiffusionInpaintPipeline
    from transformers import CLIPTextModel

    # 4 noisy-latent channels + 1 mask channel + 4 masked-image-latent channels.
    unet = seeded(lambda: sd_unet(in_channels=9))
    vae = seeded(sd_vae)
    text_encoder = seeded(lambda: CLIPTextModel(clip_text_config()))
    readme = model_card(
        "tiny-inpaint",
        "StableDiffusionInpaintPipeline",
        "Stable Diffusion 1.x inpainting model",
        [
            (
                "mirrors",
                "`runwayml/stable-diffusion-inpainting` (`stable-diffusion-v1-5/stable-diffusion-inpainting`)",
            ),
            ("tokenizer", "the real CLIP tokenizer, padded with `<\\|endoftext\\|>`"),
            ("text_encoder", "`CLIPTextModel`, width 32, 2 layers, 4 heads"),
            (
                "unet",
                "`UNet2DConditionModel` as in `tiny` but with **9 input channels**: 4 latent + 1 mask + 4 masked-image latent",
            ),
            ("vae", "`AutoencoderKL`, four blocks (8, 16, 32, 32): factor 8, `scaling_factor` 0.18215"),
            ("scheduler", "`PNDMScheduler` with SD 1.5's configuration"),
            ("safety_checker, feature_extractor", "none"),
        ],
        notes="Call it with `pipe(prompt, image=..., mask_image=...)` (white = repaint).\n\n",
    )
    save_pipeline(
        folder,
        bpe,
        readme,
        StableDiffusionInpaintPipeline,
        tokenizers={"tokenizer": EOS_TOKEN},
        vae=vae,
        text_encoder=text_encoder,
        unet=unet,
        scheduler=sd_pndm_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# The depth estimator's input size; ViT patches of 16 make a 2x2 grid.
DPT_IMAGE_SIZE = 32


def tiny_dpt():
    """A tiny non-hybrid ``DPTForDepthEstimation``: a 2-layer ViT of width 32 on 32x32 inputs.

    ``initializer_range`` 0.15 (not 0.02) gives depths of order 1: with 0.02 the random
    network's output is ~1e-9. The position embeddings, which transformers zero-initialises,
    are drawn at random like the other weights (a trained DPT's are not zero): without them
    a uniform input image gives a nearly flat depth map, which the depth pipeline's min-max
    normalisation would turn into NaN.
    """
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation

    config = DPTConfig(
        image_size=DPT_IMAGE_SIZE,
        patch_size=16,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        is_hybrid=False,
        backbone_out_indices=(0, 1),
        reassemble_factors=(4, 2),
        neck_hidden_sizes=(16, 32),
        fusion_hidden_size=16,
        initializer_range=0.15,
    )
    model = DPTForDepthEstimation(config)
    with torch.no_grad():
        torch.nn.init.normal_(model.dpt.embeddings.position_embeddings, std=config.initializer_range)
    return model.eval()


def build_tiny_depth(folder: Path, bpe: Path) -> None:
    """A depth-to-image pipeline like SD 2 depth: 5-channel UNet input and a tiny DPT."""
    from diffusers import StableDiffusionDepth2ImgPipeline
    from transformers import CLIPTextModel, DPTImageProcessor

    # 4 noisy-latent channels + 1 depth channel; SD 2's linear attention projections.
    unet = seeded(lambda: sd_unet(in_channels=5, use_linear_projection=True))
    vae = seeded(sd_vae)
    # SD 2's OpenCLIP ViT-H text encoder: GELU, its tokenizer pads with "!".
    text_encoder = seeded(lambda: CLIPTextModel(clip_text_config(pad_token_id=0, hidden_act="gelu")))
    depth_estimator = seeded(tiny_dpt)
    feature_extractor = DPTImageProcessor(
        do_resize=True,
        size={"height": DPT_IMAGE_SIZE, "width": DPT_IMAGE_SIZE},
        keep_aspect_ratio=False,
        ensure_multiple_of=1,
        resample=3,  # bicubic
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    readme = model_card(
        "tiny-depth",
        "StableDiffusionDepth2ImgPipeline",
        "Stable Diffusion 2 depth-to-image model",
        [
            ("mirrors", "`stabilityai/stable-diffusion-2-depth`"),
            ("tokenizer", "the real CLIP tokenizer, padded with `!` as SD 2's"),
            (
                "text_encoder",
                "`CLIPTextModel`, width 32, 2 layers, 4 heads, GELU (like SD 2's OpenCLIP ViT-H)",
            ),
            (
                "unet",
                "`UNet2DConditionModel` as in `tiny` but with **5 input channels** (4 latent + 1 depth) and linear attention projections",
            ),
            ("vae", "`AutoencoderKL`, four blocks (8, 16, 32, 32): factor 8, `scaling_factor` 0.18215"),
            ("scheduler", "`PNDMScheduler` with SD 2 depth's configuration"),
            (
                "depth_estimator",
                f"`DPTForDepthEstimation`: non-hybrid ViT, width 32, 2 layers, {DPT_IMAGE_SIZE}x{DPT_IMAGE_SIZE} input (SD 2 depth uses DPT-Hybrid MiDaS)",
            ),
            (
                "feature_extractor",
                f"`DPTImageProcessor`, {DPT_IMAGE_SIZE}x{DPT_IMAGE_SIZE}, `keep_aspect_ratio` false, mean = std = 0.5",
            ),
        ],
        notes=(
            "Call it with `pipe(prompt, image=...)` (the depth is estimated from `image`) or with\n"
            "`depth_map=` a `(batch, height, width)` tensor. The depth estimator's weights are random too.\n\n"
        ),
    )
    save_pipeline(
        folder,
        bpe,
        readme,
        StableDiffusionDepth2ImgPipeline,
        tokenizers={"tokenizer": OPEN_CLIP_PAD_TOKEN},
        # transformers 5 builds DPTImageProcessor as DPTImageProcessorPil when torchvision is
        # missing; the checkpoint names the public class, which every version can load.
        config_overrides={"feature_extractor": ("transformers", "DPTImageProcessor")},
        vae=vae,
        text_encoder=text_encoder,
        unet=unet,
        scheduler=sd_pndm_scheduler(),
        depth_estimator=depth_estimator,
        feature_extractor=feature_extractor,
    )


# SDXL's micro-conditioning: original size, crop top-left and target size, (h, w) each.
SDXL_TIME_IDS = 6
SDXL_TIME_EMBED_DIM = 8


def build_tiny_sdxl(folder: Path, bpe: Path) -> None:
    """An SDXL-architecture pipeline: two CLIP text encoders and a ``text_time`` UNet."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    text_encoder = seeded(lambda: CLIPTextModel(clip_text_config()))
    text_encoder_2 = seeded(
        lambda: CLIPTextModelWithProjection(
            clip_text_config(pad_token_id=0, hidden_act="gelu", projection_dim=32)
        )
    )
    cross_attention_dim = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    unet = seeded(
        lambda: sd_unet(
            sample_size=128,  # SDXL's: 1024x1024 by default
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            cross_attention_dim=cross_attention_dim,
            addition_embed_type="text_time",
            addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=text_encoder_2.config.projection_dim
            + SDXL_TIME_IDS * SDXL_TIME_EMBED_DIM,
        )
    )
    vae = seeded(lambda: sd_vae(sample_size=1024, scaling_factor=0.13025))
    scheduler = EulerDiscreteScheduler(  # SDXL base 1.0's scheduler_config.json
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        timestep_spacing="leading",
        steps_offset=1,
    )
    # Keys of SDXL's scheduler_config.json that Euler ignores (as tiny's clip_sample).
    scheduler.register_to_config(
        clip_sample=False, sample_max_value=1.0, set_alpha_to_one=False, skip_prk_steps=True
    )
    readme = model_card(
        "tiny-sdxl",
        "StableDiffusionXLPipeline",
        "Stable Diffusion XL model",
        [
            ("mirrors", "`stabilityai/stable-diffusion-xl-base-1.0`"),
            ("tokenizer", "the real CLIP tokenizer, padded with `<\\|endoftext\\|>`"),
            ("tokenizer_2", "the real CLIP tokenizer, padded with `!` (id 0) as SDXL's"),
            ("text_encoder", "`CLIPTextModel`, width 32, 2 layers, 4 heads (CLIP-L stand-in)"),
            (
                "text_encoder_2",
                "`CLIPTextModelWithProjection`, width 32, projection 32, GELU (OpenCLIP bigG stand-in)",
            ),
            (
                "unet",
                f"`UNet2DConditionModel`, channels (32, 64), cross-attention width {cross_attention_dim} (both encoders' penultimate hidden states, concatenated), `addition_embed_type` `text_time`: pooled embedding (32) + 6 time ids x {SDXL_TIME_EMBED_DIM}",
            ),
            (
                "vae",
                "`AutoencoderKL`, four blocks (8, 16, 32, 32): factor 8, `scaling_factor` 0.13025 as SDXL's",
            ),
            ("scheduler", "`EulerDiscreteScheduler` with SDXL base's configuration"),
            ("image_encoder, feature_extractor", "none"),
        ],
        notes=(
            "`force_zeros_for_empty_prompt` is true, as in SDXL base: without a negative prompt the\n"
            "unconditional embeddings are zeros. `encode_prompt` returns `prompt_embeds` of shape\n"
            f"`(batch, 77, {cross_attention_dim})` and `pooled_prompt_embeds` of shape `(batch, 32)`.\n\n"
        ),
    )
    save_pipeline(
        folder,
        bpe,
        readme,
        StableDiffusionXLPipeline,
        tokenizers={"tokenizer": EOS_TOKEN, "tokenizer_2": OPEN_CLIP_PAD_TOKEN},
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        unet=unet,
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
    )


# The width of SD 3's (absent) T5 embeddings: the two CLIPs' 32 + 32 are zero-padded up to it.
SD3_JOINT_ATTENTION_DIM = 128


def build_tiny_sd3(folder: Path, bpe: Path) -> None:
    """An SD 3 (Medium, without T5) architecture pipeline: MMDiT, two CLIPs, 16-channel VAE."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    text_encoder = seeded(lambda: CLIPTextModelWithProjection(clip_text_config(projection_dim=32)))
    text_encoder_2 = seeded(
        lambda: CLIPTextModelWithProjection(
            clip_text_config(pad_token_id=0, hidden_act="gelu", projection_dim=32)
        )
    )
    pooled_dim = text_encoder.config.projection_dim + text_encoder_2.config.projection_dim
    transformer = seeded(
        lambda: SD3Transformer2DModel(
            sample_size=128,  # SD 3's: 1024x1024 by default
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=SD3_JOINT_ATTENTION_DIM,
            caption_projection_dim=32,  # = num_attention_heads * attention_head_dim
            pooled_projection_dim=pooled_dim,
            pos_embed_max_size=128,  # up to 2048x2048 (SD 3's 192, 3072, costs 2.4 MB here)
        )
    )
    vae = seeded(
        lambda: sd_vae(
            sample_size=1024,
            latent_channels=16,
            scaling_factor=1.5305,  # SD 3's
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    readme = model_card(
        "tiny-sd3",
        "StableDiffusion3Pipeline",
        "Stable Diffusion 3 model (without T5)",
        [
            (
                "mirrors",
                "`stabilityai/stable-diffusion-3-medium-diffusers` loaded with `text_encoder_3=None, tokenizer_3=None`",
            ),
            ("tokenizer", "the real CLIP tokenizer, padded with `<\\|endoftext\\|>`"),
            ("tokenizer_2", "the real CLIP tokenizer, padded with `!` (id 0) as SD 3's"),
            (
                "text_encoder",
                "`CLIPTextModelWithProjection`, width 32, projection 32, 2 layers (CLIP-L stand-in)",
            ),
            (
                "text_encoder_2",
                "`CLIPTextModelWithProjection`, width 32, projection 32, GELU (CLIP-G stand-in)",
            ),
            ("text_encoder_3, tokenizer_3", "none (T5 omitted: the pipeline uses zeros in its place)"),
            (
                "transformer",
                f"`SD3Transformer2DModel`, 2 layers, 4 heads of 8, patch 2, `joint_attention_dim` {SD3_JOINT_ATTENTION_DIM}, pooled projection {pooled_dim}",
            ),
            (
                "vae",
                "`AutoencoderKL`, 16 latent channels, four blocks (8, 16, 32, 32): factor 8, `scaling_factor` 1.5305, `shift_factor` 0.0609",
            ),
            ("scheduler", "`FlowMatchEulerDiscreteScheduler`, shift 3.0"),
        ],
        notes=(
            "`encode_prompt` returns `prompt_embeds` of shape `(batch, 77 + max_sequence_length, "
            f"{SD3_JOINT_ATTENTION_DIM})`: the\n"
            "two CLIPs' penultimate hidden states (32 + 32) concatenated and zero-padded to "
            f"{SD3_JOINT_ATTENTION_DIM}, followed by\n"
            "`max_sequence_length` (256) zero rows where T5's embeddings would be; and "
            f"`pooled_prompt_embeds` of shape `(batch, {pooled_dim})`.\n\n"
            "`text_encoder_3=None, tokenizer_3=None` must be passed to `from_pretrained`, as for the\n"
            "real SD 3 without T5: diffusers refuses to load a pipeline whose non-optional component\n"
            "is `null` in `model_index.json` unless it is passed explicitly.\n\n"
        ),
        load_kwargs=", text_encoder_3=None, tokenizer_3=None",
    )
    save_pipeline(
        folder,
        bpe,
        readme,
        StableDiffusion3Pipeline,
        tokenizers={"tokenizer": EOS_TOKEN, "tokenizer_2": OPEN_CLIP_PAD_TOKEN},
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        text_encoder_3=None,
        tokenizer_3=None,
        image_encoder=None,
        feature_extractor=None,
    )


def check_image(size: int = 64):
    """A deterministic RGB test image: a colour gradient."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, size, dtype=np.float64)
    rgb = np.stack(
        [ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1), 255 - ramp[None, :].repeat(size, 0)],
        -1,
    )
    return Image.fromarray(rgb.astype(np.uint8))


def check_inputs(class_name: str) -> dict[str, object]:
    """The call arguments, other than the prompt, of the check render of a pipeline class."""
    from PIL import Image

    size = {"height": 64, "width": 64}
    if class_name == "StableDiffusionInpaintPipeline":
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (16, 16, 48, 48))
        return {"image": check_image(), "mask_image": mask, **size}
    if class_name == "StableDiffusionDepth2ImgPipeline":
        return {"image": check_image()}  # its size is the image's
    return size


def check_pipeline(folder: Path) -> None:
    """Load ``folder`` in float32 on the CPU with its own pipeline class and render one small image."""
    import diffusers
    import torch

    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    class_name = index["_class_name"]
    # diffusers only loads a [null, null] component that its pipeline class lists as optional
    # unless it is passed as None, e.g. SD 3's text_encoder_3 and tokenizer_3.
    absent = {name: None for name, value in index.items() if isinstance(value, list) and value[0] is None}
    with warnings.catch_warnings():  # diffusers >= 0.42 prefers dtype=, which older ones lack
        warnings.filterwarnings("ignore", message=".*torch_dtype.* is deprecated", category=FutureWarning)
        pipe = getattr(diffusers, class_name).from_pretrained(
            folder, torch_dtype=torch.float32, local_files_only=True, **absent
        )
    pipe.set_progress_bar_config(disable=True)
    with warnings.catch_warnings():  # depth2img autocasts to float32 on the CPU, which torch declines
        warnings.filterwarnings("ignore", message=".*CPU autocast.*", category=UserWarning)
        image = pipe(
            "A painting of a flooble",
            num_inference_steps=2,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="np",
            **check_inputs(class_name),
        ).images
    if image.shape != (1, 64, 64, 3) or not torch.isfinite(torch.from_numpy(image)).all():
        raise ValueError(f"{folder}: bad test image, shape {image.shape}")


MODELS: dict[str, Callable[[Path, Path], None]] = {
    "tiny": build_tiny,
    "tiny-inpaint": build_tiny_inpaint,
    "tiny-depth": build_tiny_depth,
    "tiny-sdxl": build_tiny_sdxl,
    "tiny-sd3": build_tiny_sd3,
}


def _quiet_libraries() -> None:
    """Silence progress bars and the "casting with to()" warnings of the fp16 conversion."""
    import diffusers
    import transformers

    for logging in (diffusers.utils.logging, transformers.utils.logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "models", nargs="*", metavar="MODEL", help=f"models to build, of {', '.join(MODELS)} (default: all)"
    )
    parser.add_argument(
        "--bpe", type=Path, help=f"{BPE_FILENAME}, or an open_clip_torch wheel (default: pip download)"
    )
    parser.add_argument("--out", type=Path, default=EMBEDDED_DIR, help="parent folder (default: %(default)s)")
    parser.add_argument("--no-check", action="store_true", help="skip the test render after building")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")

    _quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        bpe = find_bpe(args.bpe, Path(tmp))
        for name in args.models or list(MODELS):
            folder = args.out / name
            MODELS[name](folder, bpe)
            if not args.no_check:
                check_pipeline(folder)
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            print(f"{name}: {folder} ({size:,} bytes)")


if __name__ == "__main__":
    main()
