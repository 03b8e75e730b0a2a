"""Make the small input files the example scenes use: an init image, a mask, a depth map, a
textual-inversion embedding and a LoRA for the embedded ``tiny`` model. Deterministic; nothing is
downloaded::

    python tools/make_inputs.py            # writes scenes/inputs/*

The pictures are drawn with Pillow (a landscape of simple shapes), so the project never depends on
someone else's image. The embedding is a seeded random vector of the tiny text encoder's width,
saved in the diffusers/A1111 textual-inversion layout ``{"<token>": tensor[1, dim]}``. The LoRA is
rank 4 on the tiny UNet's attention projections, with seeded random up-projections (peft's own
init would make it a no-op), saved with diffusers' ``save_lora_weights`` like a trained one.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "scenes" / "inputs"
SIZE = 512


def landscape() -> Image.Image:
    """A sky, a sun, hills and a house: enough structure for img2img and depth to keep."""
    img = Image.new("RGB", (SIZE, SIZE))
    draw = ImageDraw.Draw(img)
    for y in range(SIZE // 2):  # sky gradient
        c = 150 + y * 90 // (SIZE // 2)
        draw.line([(0, y), (SIZE, y)], fill=(100, c - 40, 255))
    draw.ellipse([360, 50, 450, 140], fill=(255, 220, 90))
    draw.polygon(
        [(0, 300), (140, 200), (300, 290), (420, 220), (512, 270), (512, 512), (0, 512)], fill=(70, 150, 60)
    )
    draw.rectangle([150, 300, 260, 400], fill=(200, 120, 80))
    draw.polygon([(140, 300), (205, 240), (270, 300)], fill=(150, 50, 40))
    draw.rectangle([190, 350, 220, 400], fill=(90, 60, 40))
    return img.filter(ImageFilter.GaussianBlur(1))


def mask() -> Image.Image:
    """White repaints, black keeps: repaint the house."""
    img = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(img).rectangle([130, 220, 290, 420], fill=255)
    return img


def depth() -> Image.Image:
    """Near is bright: the ground comes closer towards the bottom, the house stands out."""
    img = Image.new("L", (SIZE, SIZE))
    draw = ImageDraw.Draw(img)
    for y in range(SIZE):
        draw.line([(0, y), (SIZE, y)], fill=max(0, min(255, (y - 150) * 255 // 362)))
    draw.rectangle([150, 240, 270, 400], fill=200)
    return img.filter(ImageFilter.GaussianBlur(2))


def learned_embedding(path: Path, token: str, dim: int, seed: int = 0) -> None:
    """A textual-inversion file in safetensors format, written without torch (the format is simple)."""
    rng = random.Random(seed)
    values = [rng.gauss(0.0, 0.02) for _ in range(dim)]
    data = struct.pack(f"<{dim}f", *values)
    header = {token: {"dtype": "F32", "shape": [1, dim], "data_offsets": [0, len(data)]}}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def lora(folder: Path, name: str) -> None:
    """A LoRA for the tiny UNet, in the file layout diffusers writes and reads."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(
        ROOT / "pipeline" / "embedded" / "tiny", subfolder="unet", torch_dtype=torch.float32
    )
    torch.manual_seed(0)  # lora_A starts random too
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param_name, param in unet.named_parameters():
            if "lora_B" in param_name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet), weight_name=name
    )
    (folder / name).chmod(0o644)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    landscape().save(args.out / "landscape.png", optimize=True)
    mask().save(args.out / "house_mask.png", optimize=True)
    depth().save(args.out / "landscape_depth.png", optimize=True)
    tiny_dim = json.loads(
        (ROOT / "pipeline" / "embedded" / "tiny" / "text_encoder" / "config.json").read_text()
    )["hidden_size"]
    learned_embedding(args.out / "tom_tiny.safetensors", "<tom>", tiny_dim)
    lora(args.out, "style_tiny.safetensors")
    for p in sorted(args.out.iterdir()):
        print(f"{p.relative_to(ROOT)}: {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
