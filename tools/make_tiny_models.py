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

Usage
-----
::

    python tools/make_tiny_models.py                  # build every model
    python tools/make_tiny_models.py tiny             # build only ``tiny``
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


def write_clip_tokenizer(folder: Path, bpe: Path) -> None:
    """Write SD 1.x's tokenizer folder: vocab.json, merges.txt and the two small configs.

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
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
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
    if len(tokenizer) != CLIP_VOCAB_SIZE or ids != EXPECTED_IDS or tokenizer.pad_token_id != CLIP_EOS_ID:
        raise ValueError(
            f"tokenizer check failed: {len(tokenizer)} tokens, ids {ids}, pad {tokenizer.pad_token_id}"
        )


def add_clip_text_prefix(weights: Path) -> None:
    """Give a saved ``CLIPTextModel``'s weights the ``text_model.`` key prefix of SD checkpoints.

    transformers 5 dropped the ``text_model`` submodule and saves a freshly built model
    without the prefix (it only restores legacy names for models it loaded from a legacy
    checkpoint); transformers 4 cannot load such a file (its weights would stay random
    and different). transformers 5 reads the prefixed names, like every real SD checkpoint.
    """
    from safetensors.torch import load_file, save_file

    prefix = "text_model."
    state = load_file(weights)
    state = {key if key.startswith(prefix) else prefix + key: value for key, value in state.items()}
    save_file(state, weights, metadata={"format": "pt"})


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


def build_tiny(folder: Path, bpe: Path) -> None:
    """The ``tiny`` SD 1.x-architecture pipeline with random float16 weights."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
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

    torch.manual_seed(0)
    vae = AutoencoderKL(
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

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=37,
            projection_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=CLIP_MAX_LENGTH,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            bos_token_id=CLIP_BOS_ID,
            eos_token_id=CLIP_EOS_ID,
            pad_token_id=CLIP_EOS_ID,
        )
    )

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

    # The tokenizer files are written first; the pipeline then saves them again through
    # CLIPTokenizer.save_pretrained, so they are put back afterwards (see write_clip_tokenizer).
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(tmp) / "tokenizer"
        write_clip_tokenizer(tok_dir, bpe)
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)

        pipe = StableDiffusionPipeline(
            vae=vae.to(torch.float16),
            text_encoder=text_encoder.to(torch.float16),
            tokenizer=tokenizer,
            unet=unet.to(torch.float16),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(folder, safe_serialization=True)
        shutil.rmtree(folder / "tokenizer")
        shutil.copytree(tok_dir, folder / "tokenizer")
    add_clip_text_prefix(folder / "text_encoder" / "model.safetensors")

    (folder / "README.md").write_text(TINY_README, encoding="utf-8")
    for path in folder.rglob("*"):  # save_pretrained leaves some files 0600
        path.chmod(0o755 if path.is_dir() else 0o644)


def check_pipeline(folder: Path) -> None:
    """Load ``folder`` in float32 on the CPU and render one small image."""
    import torch
    from diffusers import StableDiffusionPipeline

    with warnings.catch_warnings():  # diffusers >= 0.42 prefers dtype=, which older ones lack
        warnings.filterwarnings("ignore", message=".*torch_dtype.* is deprecated", category=FutureWarning)
        pipe = StableDiffusionPipeline.from_pretrained(
            folder, torch_dtype=torch.float32, local_files_only=True
        )
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "A painting of a flooble",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
    ).images
    if image.shape != (1, 64, 64, 3) or not torch.isfinite(torch.from_numpy(image)).all():
        raise ValueError(f"{folder}: bad test image, shape {image.shape}")


MODELS: dict[str, Callable[[Path, Path], None]] = {
    "tiny": build_tiny,
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
