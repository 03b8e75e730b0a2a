"""Train ``demo``: a small Stable Diffusion 1.x-architecture model that draws 64 emoji.

The embedded ``tiny`` models have random weights, so nothing they render shows its prompt.
``demo`` is trained here, from nothing, on a curated atlas of 64 Noto Color Emoji (animal
faces, fruit, a few objects) with captions made from templates that include the example
scenes' own phrases (the Keras dog/cat prompts, "cows ... windmill in Holland", ...). Its
parts are the standard diffusers ones, so the result is an ordinary pipeline folder that
loads with ``StableDiffusionPipeline.from_pretrained``:

- ``AutoencoderKL``, factor 2 (channels 16, 32; 4 latent channels): a 32x32 image is a
  4x16x16 latent. Trained first, alone (MSE + a tiny KL), then frozen.
- ``CLIPTextModel`` (width 64, 2 layers, 4 heads) over the project's real CLIP BPE tokenizer
  (``pipeline/embedded/tiny/tokenizer``), trained from scratch with the UNet.
- ``UNet2DConditionModel`` at 16x16 latents, channels (32, 64, 64), cross-attention 64.
- v-prediction on the cosine (``squaredcos_cap_v2``) schedule, min-SNR(5) loss weights, an
  EMA of the UNet and text encoder; 12% empty captions so classifier-free guidance works.
  Sampling uses ``DDIMScheduler`` with ``trailing`` spacing (the first step is t=999).

Usage
-----
::

    python tools/train_demo_model.py atlas            # re-render tools/demo_data/ (needs apt packages)
    nohup nice -n 19 python tools/train_demo_model.py train --workdir /work/demo_train \\
        > /work/demo_train/log.txt 2>&1 &             # resumes by itself from --workdir
    python tools/train_demo_model.py eval --model /work/demo_train/pipeline
    python tools/train_demo_model.py export --workdir /work/demo_train --out pipeline/embedded/demo

``atlas`` renders the curated set with Pillow from Debian's ``fonts-noto-color-emoji``
(NotoColorEmoji.ttf at its bitmap size 109, ``embedded_color=True``, downscaled to 32 px)
and names it from ``unicode-data``'s ``emoji-test.txt``; the result (``atlas.png``,
``emoji.json``) is committed with ``ATTRIBUTION.md`` (the licences), so training never needs apt.

``train`` keeps its whole state in ``--workdir/state.pt`` (written every ``--save-every``
steps, atomically, and on SIGINT/SIGTERM) and continues from it when started again with
the same workdir (``--fresh`` starts over). Every ``--eval-every`` steps it measures the
semantic score (below), appends it to ``scores.jsonl``, writes ``samples_NNNNNN.png`` (a
contact sheet: atlas image, then seed 0 and seed 1, for each class) and saves the EMA
model as a pipeline folder in ``--workdir/pipeline``. A GPU is used when there is one.

Semantic score: each class's prompt is rendered with 2 seeds (32x32, 8 DDIM steps, guidance
7); a render counts when its nearest atlas image (squared distance of 16x16 RGB on white)
is its own class's. Chance is 1/64 (1.6%). ``scene`` prompts are the dog/cat scene's long
prompt with the class's noun; ``short`` prompts are "a photo of a <noun>". The morph check:
the dog prompt's render is nearer the dog image than the cat's, and the reverse.

Stop rule (issue 16): after ``--stop-after`` CPU seconds (or wall seconds on a GPU) of UNet
training with the best score still at chance (below 2x chance), training stops and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "tools" / "demo_data"
TOKENIZER_DIR = REPO_ROOT / "pipeline" / "embedded" / "tiny" / "tokenizer"
FONT_PATH = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST_PATH = Path("/usr/share/unicode/emoji/emoji-test.txt")

ATLAS_CELL = 32  # pixels per emoji in atlas.png
ATLAS_COLUMNS = 8
FONT_SIZE = 109  # NotoColorEmoji's only bitmap size (CBDT strike)

# The curated set: (Unicode CLDR name in emoji-test.txt, noun, plural, other names used in captions).
# The extra names tie the example scenes' subjects to the nearest emoji we have.
CURATED: list[tuple[str, str, str, tuple[str, ...]]] = [
    ("dog face", "dog", "dogs", ("puppy", "golden retriever")),
    ("cat face", "cat", "cats", ("kitten",)),
    ("cow face", "cow", "cows", ()),
    ("horse face", "horse", "horses", ()),
    ("pig face", "pig", "pigs", ()),
    ("fox", "fox", "foxes", ()),
    ("tiger face", "tiger", "tigers", ()),
    ("lion", "lion", "lions", ()),
    ("rabbit face", "rabbit", "rabbits", ("bunny",)),
    ("monkey face", "monkey", "monkeys", ()),
    ("mouse face", "mouse", "mice", ()),
    ("hamster", "hamster", "hamsters", ()),
    ("bear", "bear", "bears", ()),
    ("panda", "panda", "pandas", ()),
    ("koala", "koala", "koalas", ()),
    ("frog", "frog", "frogs", ()),
    ("wolf", "wolf", "wolves", ()),
    ("unicorn", "unicorn", "unicorns", ()),
    ("chicken", "chicken", "chickens", ("hen",)),
    ("penguin", "penguin", "penguins", ()),
    ("owl", "owl", "owls", ()),
    ("octopus", "octopus", "octopuses", ()),
    ("turtle", "turtle", "turtles", ()),
    ("fish", "fish", "fish", ()),
    ("spouting whale", "whale", "whales", ()),
    ("butterfly", "butterfly", "butterflies", ()),
    ("honeybee", "bee", "bees", ()),
    ("snail", "snail", "snails", ()),
    ("lady beetle", "ladybug", "ladybugs", ()),
    ("elephant", "elephant", "elephants", ()),
    ("giraffe", "giraffe", "giraffes", ()),
    ("zebra", "zebra", "zebras", ()),
    ("red apple", "apple", "apples", ("bowl of fruit",)),
    ("green apple", "green apple", "green apples", ()),
    ("pear", "pear", "pears", ()),
    ("tangerine", "orange", "oranges", ("tangerine",)),
    ("lemon", "lemon", "lemons", ()),
    ("banana", "banana", "bananas", ()),
    ("watermelon", "watermelon", "watermelons", ()),
    ("grapes", "bunch of grapes", "grapes", ()),
    ("strawberry", "strawberry", "strawberries", ()),
    ("cherries", "pair of cherries", "cherries", ()),
    ("peach", "peach", "peaches", ()),
    ("pineapple", "pineapple", "pineapples", ()),
    ("kiwi fruit", "kiwi", "kiwis", ()),
    ("avocado", "avocado", "avocados", ()),
    ("coconut", "coconut", "coconuts", ()),
    ("mango", "mango", "mangoes", ()),
    ("rocket", "rocket", "rockets", ()),
    ("house", "house", "houses", ()),
    ("deciduous tree", "tree", "trees", ()),
    ("evergreen tree", "pine tree", "pine trees", ()),
    ("cactus", "cactus", "cacti", ()),
    ("sunflower", "sunflower", "sunflowers", ()),
    ("tulip", "tulip", "tulips", ()),
    ("cherry blossom", "cherry blossom", "cherry blossoms", ()),
    ("rose", "rose", "roses", ()),
    ("sun", "sun", "suns", ()),
    ("Tokyo tower", "tower", "towers", ("eiffel tower",)),
    ("office building", "skyscraper", "skyscrapers", ("office building",)),
    ("night with stars", "starry night", "starry nights", ()),
    ("sailboat", "sailboat", "sailboats", ()),
    ("automobile", "car", "cars", ()),
    ("balloon", "balloon", "balloons", ()),
]

# The dog/cat scene's prompt (scenes/dog_cat.yaml), with the noun as a field.
SCENE_TEMPLATE = (
    "A cute {noun} in a beautiful field of lavander colorful flowers everywhere, perfect lighting, "
    "leica summicron 35mm f2.0, kodak portra 400, film grain"
)
SHORT_TEMPLATE = "a photo of {a}"
# Caption templates: {noun}, {a} (noun with article), {plural}. The first ones are the example
# scenes' prompts (dog_cat, walk, cows_circle, grid_fixed, sd3/sdxl morphs).
TEMPLATES = [
    SCENE_TEMPLATE,
    "A cute {noun} in a beautiful field of lavander colorful flowers everywhere, perfect lighting",
    "An oil paintings of {plural} in a field next to a windmill in Holland",
    "A watercolor painting of {a} at the beach",
    "A still life DSLR photo of {a}",
    "{A} in the style of starry night",
    "An architectural sketch of {a}",
    SHORT_TEMPLATE,
    "{a}",
    "{noun}",
    "{plural}",
    "an emoji of {a}",
    "{name} emoji",
    "a cute {noun}",
    "a drawing of {a}",
    "a picture of {a}, high quality",
]
EMPTY_CAPTION_RATE = 0.12
MORPH_SEED = 42


# --------------------------------------------------------------------------------------
# The atlas
# --------------------------------------------------------------------------------------


def emoji_names(path: Path = EMOJI_TEST_PATH) -> dict[str, tuple[str, str, str]]:
    """CLDR name -> (emoji string, code points, group) of every fully-qualified emoji."""
    names: dict[str, tuple[str, str, str]] = {}
    group = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        if line.startswith("#") or "; fully-qualified" not in line:
            continue
        codes, rest = line.split(";", 1)
        # "1F436 ; fully-qualified # 🐶 E0.6 dog face"
        name = rest.split("#", 1)[1].strip().split(" ", 2)[2]
        chars = "".join(chr(int(code, 16)) for code in codes.split())
        names.setdefault(name, (chars, codes.strip(), group))
    return names


def render_emoji(chars: str, font: Any, cell: int = ATLAS_CELL) -> Any:
    """One emoji as an RGBA ``cell`` x ``cell`` image: drawn at the font's size, cropped, padded square, downscaled."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGBA", (FONT_SIZE * 2, FONT_SIZE * 2), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((FONT_SIZE // 2, FONT_SIZE // 2), chars, font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        raise ValueError(f"{chars!r}: the font draws nothing")
    glyph = canvas.crop(box)
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    # Resample premultiplied, so transparent pixels' colour does not bleed into the edges.
    return square.convert("RGBa").resize((cell, cell), Image.Resampling.LANCZOS).convert("RGBA")


def make_atlas(out: Path = DATA_DIR) -> None:
    """Render the curated set into ``out``: atlas.png (8 per row), emoji.json, ATTRIBUTION.md."""
    from PIL import Image, ImageFont

    names = emoji_names()
    font = ImageFont.truetype(str(FONT_PATH), FONT_SIZE)
    rows = math.ceil(len(CURATED) / ATLAS_COLUMNS)
    atlas = Image.new("RGBA", (ATLAS_COLUMNS * ATLAS_CELL, rows * ATLAS_CELL), (0, 0, 0, 0))
    entries = []
    for index, (name, noun, plural, others) in enumerate(CURATED):
        chars, codes, group = names[name]
        tile = render_emoji(chars, font)
        atlas.paste(tile, ((index % ATLAS_COLUMNS) * ATLAS_CELL, (index // ATLAS_COLUMNS) * ATLAS_CELL))
        entries.append(
            {
                "index": index,
                "emoji": chars,
                "codepoints": codes,
                "name": name,
                "group": group,
                "noun": noun,
                "plural": plural,
                "other_names": list(others),
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    atlas.save(out / "atlas.png", optimize=True)
    meta = {"cell": ATLAS_CELL, "columns": ATLAS_COLUMNS, "emoji": entries}
    (out / "emoji.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{out / 'atlas.png'}: {len(entries)} emoji")


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def load_atlas(data_dir: Path = DATA_DIR, size: int = ATLAS_CELL, limit: int | None = None):
    """(images, entries): the atlas as a float tensor (N, 3, size, size) in [-1, 1], on white."""
    import numpy as np
    import torch
    from PIL import Image

    meta = json.loads((data_dir / "emoji.json").read_text(encoding="utf-8"))
    cell, columns = meta["cell"], meta["columns"]
    entries = meta["emoji"][:limit] if limit else meta["emoji"]
    atlas = Image.open(data_dir / "atlas.png").convert("RGBA")
    images = []
    for entry in entries:
        i = entry["index"]
        tile = atlas.crop(
            ((i % columns) * cell, (i // columns) * cell, (i % columns + 1) * cell, (i // columns + 1) * cell)
        )
        white = Image.new("RGBA", tile.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, tile).convert("RGB")
        if size != cell:
            rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
        images.append(np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), entries


def with_article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def captions_for(entry: dict[str, Any]) -> list[str]:
    """Every caption of one atlas entry: each template with its noun, and the short ones with its other names."""
    captions = []
    for noun in [entry["noun"], *entry["other_names"]]:
        fields = {
            "noun": noun,
            "a": with_article(noun),
            "A": with_article(noun).capitalize(),
            "plural": entry["plural"] if noun == entry["noun"] else noun,
            "name": entry["name"],
        }
        templates = TEMPLATES if noun == entry["noun"] else TEMPLATES[:8]
        captions.extend(template.format(**fields) for template in templates)
    return sorted(set(captions))


def scene_prompt(entry: dict[str, Any]) -> str:
    return SCENE_TEMPLATE.format(noun=entry["noun"])


def short_prompt(entry: dict[str, Any]) -> str:
    return SHORT_TEMPLATE.format(a=with_article(entry["noun"]))


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    """The sizes of the three trained parts; ``demo`` is the issue's, ``test`` is for the fast test."""

    size: int = 32
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    unet_channels: tuple[int, ...] = (32, 64, 64)
    vae_channels: tuple[int, ...] = (16, 32)
    norm_groups: int = 8


PRESETS = {
    "demo": Arch(),
    "test": Arch(
        size=16, text_width=16, text_layers=1, text_heads=2, unet_channels=(8, 16), vae_channels=(8, 8)
    ),
}


def build_vae(arch: Arch):
    from diffusers import AutoencoderKL

    n = len(arch.vae_channels)
    return AutoencoderKL(
        sample_size=arch.size,
        in_channels=3,
        out_channels=3,
        block_out_channels=arch.vae_channels,
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=4,
        norm_num_groups=arch.norm_groups,
        scaling_factor=1.0,  # measured after VAE training (1 / std of the latents, as SD did)
    )


def build_text_encoder(arch: Arch):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=arch.text_width,
            intermediate_size=arch.text_width * 4,
            projection_dim=arch.text_width,
            num_hidden_layers=arch.text_layers,
            num_attention_heads=arch.text_heads,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )


def build_unet(arch: Arch):
    from diffusers import UNet2DConditionModel

    n = len(arch.unet_channels)
    # Cross-attention at every level but the first (the full-resolution one, where it costs most).
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
    up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
    return UNet2DConditionModel(
        sample_size=arch.size // 2 ** (len(arch.vae_channels) - 1),
        in_channels=4,
        out_channels=4,
        block_out_channels=arch.unet_channels,
        layers_per_block=1,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=arch.text_width,
        attention_head_dim=8,
        norm_num_groups=arch.norm_groups,
    )


SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
}


def train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULE, clip_sample=False)


def sample_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        **SCHEDULE, clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing", steps_offset=1
    )


def load_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR)


def make_pipeline(vae, text_encoder, unet, tokenizer):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sample_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


MODEL_CARD = """\
# `demo`: an embedded, offline, TRAINED Stable Diffusion model (64 emoji)

A Stable Diffusion 1.x-architecture pipeline folder in diffusers format, trained from scratch
by `tools/train_demo_model.py` on 64 Noto Color Emoji at 32x32 (see `tools/demo_data/`,
whose ATTRIBUTION.md gives the licences). It draws those 64 subjects (dog, cat, cow, horse,
fox, apple, rocket, house, ...) on white, at **32x32** pixels:

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("pipeline/embedded/demo", torch_dtype=torch.float32)
image = pipe("A cute dog in a field", height=32, width=32, num_inference_steps=8).images[0]
```

| component | what |
|---|---|
| tokenizer | the real CLIP BPE tokenizer (49408 tokens, ids as in SD 1.x) |
| text_encoder | `CLIPTextModel`, width {text_width}, {text_layers} layers, {text_heads} heads |
| unet | `UNet2DConditionModel`, channels {unet_channels}, cross-attention width {text_width} |
| vae | `AutoencoderKL`, channels {vae_channels}: factor {factor}, `scaling_factor` {scaling_factor:.5f} |
| scheduler | `DDIMScheduler`, v-prediction, cosine (`squaredcos_cap_v2`) betas, `trailing` spacing |

Trained: {summary}

Weights are stored as float16 safetensors; load them with `torch_dtype=torch.float32` on a CPU.
"""


def save_pipeline_folder(folder: Path, vae, text_encoder, unet, arch: Arch, summary: str) -> None:
    """Save the three parts as a float16 StableDiffusionPipeline folder (replaced atomically)."""
    import torch

    sys.path.insert(0, str(REPO_ROOT / "tools"))
    from make_tiny_models import add_clip_text_prefix

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    parts = [copy.deepcopy(m).to("cpu", torch.float16) for m in (vae, text_encoder, unet)]
    pipe = make_pipeline(parts[0], parts[1], parts[2], load_tokenizer())
    pipe.save_pretrained(tmp, safe_serialization=True)
    # The tokenizer files exactly as the other embedded models have them (save_pretrained rewrites them).
    shutil.rmtree(tmp / "tokenizer")
    shutil.copytree(TOKENIZER_DIR, tmp / "tokenizer")
    add_clip_text_prefix(tmp / "text_encoder" / "model.safetensors")
    card = MODEL_CARD.format(
        **asdict(arch),
        factor=2 ** (len(arch.vae_channels) - 1),
        scaling_factor=vae.config.scaling_factor,
        summary=summary,
    )
    (tmp / "README.md").write_text(card, encoding="utf-8")
    for path in tmp.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


def nearest(images, atlas):
    """Index of each image's nearest atlas image: squared distance of 2x-downsampled RGB."""
    import torch.nn.functional as F

    a = F.avg_pool2d(atlas.float(), 2).flatten(1)
    x = F.avg_pool2d(images.float(), 2).flatten(1)
    return (x[:, None, :] - a[None, :, :]).pow(2).sum(-1).argmin(1)


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def render(pipe, prompts: list[str], seeds: list[int], size: int, steps: int = 8, guidance: float = 7.0):
    """Render ``prompts`` (one seed each) with the pipeline; a (N, 3, size, size) tensor in [-1, 1]."""
    import torch

    out = []
    for start in range(0, len(prompts), 64):
        chunk = slice(start, start + 64)
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[chunk]]
        with _quiet(), torch.no_grad():
            images = pipe(
                prompts[chunk],
                height=size,
                width=size,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=generators,
                output_type="pt",
            ).images
        out.append(images.cpu() * 2 - 1)
    return torch.cat(out)


def evaluate(
    pipe,
    atlas,
    entries: list[dict[str, Any]],
    size: int,
    steps: int = 8,
    kinds: tuple[str, ...] = ("scene", "short"),
) -> tuple[dict[str, Any], Any]:
    """The semantic scores (see the module docstring) and the first kind's renders, for the contact sheet."""
    import torch

    pipe.set_progress_bar_config(disable=True)
    n = len(entries)
    labels = torch.arange(n).repeat(2)
    seeds = [0] * n + [1] * n
    result: dict[str, Any] = {"chance": 1 / n}
    scene_images = None
    prompts = {"scene": scene_prompt, "short": short_prompt}
    for kind in kinds:
        images = render(pipe, [prompts[kind](e) for e in entries] * 2, seeds, size, steps)
        hits = nearest(images, atlas) == labels
        result[kind] = round(hits.float().mean().item(), 4)
        if scene_images is None:
            scene_images = images
    nouns = [e["noun"] for e in entries]
    if "dog" in nouns and "cat" in nouns:
        dog, cat = nouns.index("dog"), nouns.index("cat")
        morph = render(
            pipe, [scene_prompt(entries[dog]), scene_prompt(entries[cat])], [MORPH_SEED] * 2, size, steps
        )
        d = (morph[:, None] - atlas[None, [dog, cat]]).pow(2).flatten(2).sum(-1)
        result["morph"] = bool(d[0, 0] < d[0, 1] and d[1, 1] < d[1, 0])
    return result, scene_images


def contact_sheet(atlas, samples, path: Path, per_row: int = 4) -> None:
    """A PNG with, for each class, its atlas image then its two samples (seed 0, seed 1), at 2x."""
    import numpy as np
    from PIL import Image

    atlas, samples = atlas.numpy(), samples.numpy()
    n, _, size, _ = atlas.shape
    tiles = [np.concatenate([atlas[i], samples[i], samples[n + i]], axis=2) for i in range(n)]
    rows = math.ceil(n / per_row)
    blank = np.ones_like(tiles[0])
    grid = []
    for r in range(rows):
        row = [tiles[r * per_row + c] if r * per_row + c < n else blank for c in range(per_row)]
        gap = np.ones((3, size, size // 4))
        parts = []
        for tile in row:
            parts.extend([tile, gap])
        grid.append(np.concatenate(parts, axis=2))
    sheet = np.concatenate(grid, axis=1)
    pixels = ((sheet.transpose(1, 2, 0) + 1) * 127.5).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    image.resize((image.width * 2, image.height * 2), Image.Resampling.NEAREST).save(path)


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


class Trainer:
    """VAE, then UNet + text encoder; the whole state lives in ``workdir/state.pt``."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args = args
        self.workdir: Path = args.workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.arch = PRESETS[args.preset]
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.atlas, self.entries = load_atlas(args.data, self.arch.size, args.limit)
        self.tokenizer = load_tokenizer()
        self.captions: list[tuple[int, str]] = [
            (i, caption) for i, entry in enumerate(self.entries) for caption in captions_for(entry)
        ]
        self.by_class = [[c for j, c in self.captions if j == i] for i in range(len(self.entries))]
        torch.manual_seed(args.seed)
        self.vae = build_vae(self.arch).to(self.device)
        self.text_encoder = build_text_encoder(self.arch).to(self.device)
        self.unet = build_unet(self.arch).to(self.device)
        self.ema_text = copy.deepcopy(self.text_encoder).requires_grad_(False)
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
        params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        self.opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        self.scheduler = train_scheduler()
        self.alphas = self.scheduler.alphas_cumprod.to(self.device)
        self.state: dict[str, Any] = {
            "phase": "vae",
            "vae_step": 0,
            "unet_step": 0,
            "cpu_s": {"vae": 0.0, "unet": 0.0},
            "wall_s": {"vae": 0.0, "unet": 0.0},
            "best": 0.0,
            "psnr": None,
            "latents": None,
            "arch": asdict(self.arch),
            "limit": args.limit,
        }
        self.stop_requested = False

    # -- state ------------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.workdir / "state.pt"

    def save(self) -> None:
        import torch

        blob = {
            "state": self.state,
            "vae": self.vae.state_dict(),
            "text_encoder": self.text_encoder.state_dict(),
            "unet": self.unet.state_dict(),
            "ema_text": self.ema_text.state_dict(),
            "ema_unet": self.ema_unet.state_dict(),
            "vae_opt": self.vae_opt.state_dict(),
            "opt": self.opt.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "vae_scaling_factor": self.vae.config.scaling_factor,
        }
        tmp = self.state_path.with_suffix(".tmp")
        torch.save(blob, tmp)
        os.replace(tmp, self.state_path)

    def load(self) -> bool:
        import torch

        if self.args.fresh or not self.state_path.exists():
            return False
        blob = torch.load(self.state_path, map_location=self.device, weights_only=False)
        saved = blob["state"]
        if saved["arch"] != asdict(self.arch) or saved["limit"] != self.args.limit:
            raise SystemExit(
                f"{self.state_path}: made with preset {saved['arch']} limit {saved['limit']}; "
                "use the same --preset/--limit, or --fresh to start over"
            )
        self.state = saved
        for name in ("vae", "text_encoder", "unet", "ema_text", "ema_unet", "vae_opt", "opt"):
            getattr(self, name).load_state_dict(blob[name])
        self.vae.register_to_config(scaling_factor=blob["vae_scaling_factor"])
        torch.set_rng_state(blob["rng"]["torch"])
        random.setstate(blob["rng"]["python"])
        return True

    def log(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        print(f"{stamp} {message}", flush=True)

    # -- VAE --------------------------------------------------------------------------

    def vae_psnr(self) -> float:
        import torch

        self.vae.eval()
        with torch.no_grad():
            x = self.atlas.to(self.device)
            y = self.vae.decode(self.vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        self.vae.train()
        mse = ((y - x) / 2).pow(2).mean().item()
        return 10 * math.log10(1 / max(mse, 1e-12))

    def train_vae(self) -> None:
        import torch

        args, atlas = self.args, self.atlas.to(self.device)
        self.vae.train()
        while self.state["vae_step"] < args.vae_steps and not self.stop_requested:
            t0, c0 = time.time(), time.process_time()
            idx = torch.randint(0, len(atlas), (args.batch,), device=self.device)
            x = atlas[idx]
            flip = torch.rand(len(x), device=self.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            posterior = self.vae.encode(x).latent_dist
            y = self.vae.decode(posterior.sample()).sample
            loss = (y - x).pow(2).mean() + 0.1 * (y - x).abs().mean() + args.kl * posterior.kl().mean()
            self.vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.vae_opt.step()
            self.state["vae_step"] += 1
            self._tick("vae", t0, c0)
            step = self.state["vae_step"]
            if step % args.vae_eval_every == 0 or step == args.vae_steps:
                psnr = self.vae_psnr()
                self.state["psnr"] = psnr
                self.log(f"vae step {step} loss {loss.item():.5f} psnr {psnr:.2f} dB cpu {self._cpu('vae')}")
                if psnr >= args.vae_psnr:
                    break
            if step % args.save_every == 0:
                self.save()
        if self.stop_requested:
            return
        self.state["psnr"] = self.vae_psnr()
        self.finish_vae()

    def finish_vae(self) -> None:
        """Freeze the VAE; cache the atlas posteriors; set ``scaling_factor`` to 1/std of the latents."""
        import torch

        self.vae.eval().requires_grad_(False)
        with torch.no_grad():
            x = self.atlas.to(self.device)
            dist = self.vae.encode(torch.cat([x, x.flip(-1)])).latent_dist
        std = dist.sample().std().item()
        self.vae.register_to_config(scaling_factor=1.0 / std)
        self.state["latents"] = {"mean": dist.mean.cpu(), "std": dist.std.cpu()}
        self.state["phase"] = "unet"
        self.log(
            f"vae done: {self.state['vae_step']} steps, psnr {self.state['psnr']:.2f} dB, "
            f"scaling_factor {1.0 / std:.5f}, cpu {self._cpu('vae')}"
        )
        self.save()

    # -- UNet + text encoder ----------------------------------------------------------

    def batch_captions(self, classes: list[int]) -> list[str]:
        return [
            "" if random.random() < EMPTY_CAPTION_RATE else random.choice(self.by_class[c]) for c in classes
        ]

    def encode(self, model, captions: list[str]):
        ids = self.tokenizer(
            captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        return model(ids)[0]

    def train_unet(self) -> None:
        import torch

        args = self.args
        lat = self.state["latents"]
        mean, std = lat["mean"].to(self.device), lat["std"].to(self.device)
        scale = self.vae.config.scaling_factor
        n = len(self.entries)
        self.vae.eval().requires_grad_(False)
        self.unet.train()
        self.text_encoder.train()
        while self.state["unet_step"] < args.unet_steps and not self.stop_requested:
            t0, c0 = time.time(), time.process_time()
            classes = [random.randrange(n) for _ in range(args.batch)]
            flipped = [random.random() < 0.5 for _ in classes]
            rows = torch.tensor(
                [c + n * f for c, f in zip(classes, flipped, strict=True)], device=self.device
            )
            x0 = (mean[rows] + std[rows] * torch.randn_like(mean[rows])) * scale
            noise = torch.randn_like(x0)
            t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(x0),), device=self.device)
            noisy = self.scheduler.add_noise(x0, noise, t)
            target = self.scheduler.get_velocity(x0, noise, t)
            cond = self.encode(self.text_encoder, self.batch_captions(classes))
            pred = self.unet(noisy, t, cond).sample
            snr = self.alphas[t] / (1 - self.alphas[t])
            weight = snr.clamp(max=5.0) / (snr + 1)  # min-SNR-5 for v-prediction
            loss = (weight * (pred - target).pow(2).mean((1, 2, 3))).mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.opt.param_groups[0]["params"], 1.0)
            step = self.state["unet_step"] + 1
            for group in self.opt.param_groups:  # linear warm-up
                group["lr"] = args.lr * min(1.0, step / args.warmup)
            self.opt.step()
            self.update_ema(step)
            self.state["unet_step"] = step
            self._tick("unet", t0, c0)
            self.state["loss"] = 0.98 * self.state.get("loss", loss.item()) + 0.02 * loss.item()
            if step % args.log_every == 0:
                self.log(f"unet step {step} loss {self.state['loss']:.4f} cpu {self._cpu('unet')}")
            if step % args.eval_every == 0 or step == args.unet_steps:
                self.checkpoint_eval()
                if self.at_chance_too_long():
                    self.log(
                        f"STOP RULE: best score {self.state['best']:.3f} is still at chance "
                        f"(1/{n}) after {self._cpu('unet')} of UNet training; stopping"
                    )
                    self.save()
                    return
            if step % args.save_every == 0:
                self.save()

    def update_ema(self, step: int) -> None:
        import torch

        decay = min(self.args.ema, (1 + step) / (10 + step))
        for ema, model in ((self.ema_unet, self.unet), (self.ema_text, self.text_encoder)):
            with torch.no_grad():
                e = list(ema.parameters())
                m = [p.detach() for p in model.parameters()]
                torch._foreach_lerp_(e, m, 1 - decay)

    def at_chance_too_long(self) -> bool:
        spent = self.state["wall_s" if self.device.type == "cuda" else "cpu_s"]["unet"]
        return (
            bool(self.args.stop_after)
            and spent >= self.args.stop_after
            and self.state["best"] < 2 / len(self.entries)
        )

    def checkpoint_eval(self) -> None:
        import torch

        step = self.state["unet_step"]
        self.ema_unet.eval()
        self.ema_text.eval()
        pipe = make_pipeline(self.vae, self.ema_text, self.ema_unet, self.tokenizer).to(self.device)
        t0 = time.time()
        result, samples = evaluate(pipe, self.atlas, self.entries, self.arch.size, self.args.eval_steps)
        record = {
            "step": step,
            "cpu_s": round(self.state["cpu_s"]["unet"]),
            "wall_s": round(self.state["wall_s"]["unet"]),
            "loss": round(self.state["loss"], 5),
            "vae_psnr": round(self.state["psnr"], 2),
            **result,
            "eval_s": round(time.time() - t0, 1),
        }
        self.state["best"] = max(self.state["best"], result["scene"], result["short"])
        with (self.workdir / "scores.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.log(f"eval {json.dumps(record)}")
        contact_sheet(self.atlas, samples.cpu(), self.workdir / f"samples_{step:06d}.png")
        summary = (
            f"{step} UNet steps at batch {self.args.batch} ({record['cpu_s']} CPU s), VAE PSNR "
            f"{record['vae_psnr']} dB; semantic score {result['scene']:.2f} (scene prompts), "
            f"{result['short']:.2f} (short prompts), chance {result['chance']:.3f}."
        )
        save_pipeline_folder(
            self.workdir / "pipeline", self.vae, self.ema_text, self.ema_unet, self.arch, summary
        )
        torch.manual_seed(step)  # the eval's draws do not shift training's across a resume

    # -- bookkeeping ------------------------------------------------------------------

    def _tick(self, phase: str, t0: float, c0: float) -> None:
        self.state["wall_s"][phase] += time.time() - t0
        self.state["cpu_s"][phase] += time.process_time() - c0

    def _cpu(self, phase: str) -> str:
        return f"{self.state['cpu_s'][phase]:.0f} s (wall {self.state['wall_s'][phase]:.0f} s)"

    def run(self) -> None:
        resumed = self.load()
        s = self.state
        self.log(
            f"{'resumed' if resumed else 'started'} in {self.workdir}: phase {s['phase']}, vae step {s['vae_step']}, "
            f"unet step {s['unet_step']}, {len(self.entries)} images, {len(self.captions)} captions, "
            f"device {self.device}, threads {self.args.threads}"
        )

        def request_stop(signum: int, _frame: Any) -> None:
            self.log(f"signal {signum}: saving and stopping")
            self.stop_requested = True

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                previous[sig] = signal.signal(sig, request_stop)
        try:
            if s["phase"] == "vae":
                self.train_vae()
            if s["phase"] == "unet" and not self.stop_requested:
                self.train_unet()
            self.save()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.log(f"saved at vae step {s['vae_step']}, unet step {s['unet_step']}")


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("atlas", help="re-render tools/demo_data/ from the Debian emoji font")

    train = sub.add_parser("train", help="train (or continue training) in --workdir")
    train.add_argument("--workdir", type=Path, required=True)
    train.add_argument("--fresh", action="store_true", help="ignore an existing state.pt")
    train.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    train.add_argument("--data", type=Path, default=DATA_DIR)
    train.add_argument("--limit", type=int, help="use only the first N atlas images")
    train.add_argument("--batch", type=int, default=32)
    train.add_argument("--vae-steps", type=int, default=3000, help="at most (stops early at --vae-psnr)")
    train.add_argument("--vae-psnr", type=float, default=30.0)
    train.add_argument("--vae-lr", type=float, default=1e-3)
    train.add_argument("--vae-eval-every", type=int, default=100)
    train.add_argument("--kl", type=float, default=1e-6)
    train.add_argument("--unet-steps", type=int, default=20000)
    train.add_argument("--lr", type=float, default=5e-4)
    train.add_argument("--warmup", type=int, default=100)
    train.add_argument("--ema", type=float, default=0.999)
    train.add_argument("--eval-every", type=int, default=250)
    train.add_argument("--eval-steps", type=int, default=8)
    train.add_argument("--save-every", type=int, default=50)
    train.add_argument("--log-every", type=int, default=10)
    train.add_argument("--stop-after", type=float, default=3600.0, help="stop rule: seconds (0: never)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=1)
    train.add_argument("--device", help="cuda or cpu (default: cuda when available)")

    ev = sub.add_parser("eval", help="score a saved pipeline folder")
    ev.add_argument("--model", type=Path, required=True)
    ev.add_argument("--data", type=Path, default=DATA_DIR)
    ev.add_argument("--steps", type=int, default=8)
    ev.add_argument("--sheet", type=Path, help="write a contact sheet PNG here")

    export = sub.add_parser("export", help="copy the workdir's latest pipeline folder to --out")
    export.add_argument("--workdir", type=Path, required=True)
    export.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    if args.command == "atlas":
        make_atlas()
        return
    import torch

    sys.path.insert(0, str(REPO_ROOT / "tools"))
    from make_tiny_models import _quiet_libraries  # one way to silence diffusers and transformers

    _quiet_libraries()
    if args.command == "train":
        torch.set_num_threads(args.threads)
        Trainer(args).run()
    elif args.command == "eval":
        from diffusers import StableDiffusionPipeline

        torch.set_num_threads(1)
        with _quiet():
            pipe = StableDiffusionPipeline.from_pretrained(
                args.model, torch_dtype=torch.float32, local_files_only=True
            )
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        atlas, entries = load_atlas(args.data, size)
        result, samples = evaluate(pipe, atlas, entries, size, args.steps)
        print(json.dumps(result))
        if args.sheet:
            contact_sheet(atlas, samples, args.sheet)
    else:
        source = args.workdir / "pipeline"
        if args.out.exists():
            shutil.rmtree(args.out)
        shutil.copytree(source, args.out)
        print(f"{source} -> {args.out}")


if __name__ == "__main__":
    main()
