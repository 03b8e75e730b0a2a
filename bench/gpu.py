"""GPU throughput: the SD 1.5 architecture with random weights (no download), ours vs a naive loop.

Builds a ``StableDiffusionPipeline`` folder with SD 1.5's exact architecture (CLIP ViT-L/14 text encoder,
the 860M-parameter UNet, the 84M VAE, PNDM scheduler) and random weights, then renders a 2-keyframe
prompt morph at 512x512, 25 steps, through the project's API (``pipeline.open(...).render()``, frames
stored as PNG in a fresh cache, no outputs) at batch sizes 1/4/8/16, in float16 and bfloat16, side by
side with a naive diffusers loop (one ``pipe(...)`` call per frame, prompts encoded every frame) in
the same run. For each it reports ms per frame, frames per second, the share of wall time spent outside
the diffusers call (our driver: embeddings, noise, PNG, cache), and the fraction of the device's peak
(an SD 1.5 frame at 25 steps with CFG plus the VAE decode is about 42.7 TFLOP).

    python bench/gpu.py                    # the full run: about 4-6 minutes on one H100/H200
    python bench/gpu.py --frames 16        # fewer frames per measurement
    python bench/gpu.py --extras           # also torch.compile and channels-last, measured at batch 8
    python bench/gpu.py --smoke            # a tiny architecture on the CPU: checks the script itself

Copy the table into ``bench/RESULTS.md`` with the date and the header lines.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path
from typing import Any

import _common as c

TFLOP_PER_FRAME = 42.7  # SD 1.5, 512x512, 25 steps, CFG (2 UNet passes per step), plus the VAE decode
# Dense fp16/bf16 tensor-core peaks (TFLOP/s) of common devices, by a substring of their name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0}
A = "A cute dog in a beautiful field of lavender flowers, perfect lighting, film grain"
B = "A cute cat in a beautiful field of lavender flowers, perfect lighting, film grain"


def build_model(folder: Path, smoke: bool) -> None:
    """Save an SD 1.5-shaped pipeline with random weights (``smoke``: a tiny one) to ``folder``."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    width = 32 if smoke else 768
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=width,
            intermediate_size=4 * width,
            num_attention_heads=4 if smoke else 12,
            num_hidden_layers=2 if smoke else 12,
            max_position_embeddings=77,
            vocab_size=49408,
            projection_dim=width,
            hidden_act="quick_gelu",
        )
    )
    blocks = (32, 64) if smoke else (320, 640, 1280, 1280)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=1 if smoke else 2,
        block_out_channels=blocks,
        down_block_types=("CrossAttnDownBlock2D",) * (len(blocks) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(blocks) - 1),
        cross_attention_dim=width,
        attention_head_dim=8,
    )
    vae_blocks = (32, 32, 32, 32) if smoke else (128, 256, 512, 512)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=vae_blocks,
        layers_per_block=1 if smoke else 2,
        latent_channels=4,
        sample_size=512,
        norm_num_groups=32,
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
    )
    tokenizer = CLIPTokenizer.from_pretrained(c.ROOT / "pipeline" / "embedded" / "tiny" / "tokenizer")
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    params = sum(p.numel() for m in (text, unet, vae) for p in m.parameters())
    print(f"# model: {params / 1e6:.0f}M parameters, saved to {folder}")


def timed_pipeline_class(base: type, spent: list[float], device: str) -> type:
    """A subclass of ``base``, under the same name, that adds the wall time of each call to ``spent``.

    It keeps the name because the renderer reuses the loaded pipeline only when the class name is the
    one its mode needs.
    """
    import torch

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = base.__call__(self, *args, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        spent.append(time.perf_counter() - t0)
        return out

    return type(base.__name__, (base,), {"__call__": __call__})


def ours(
    folder: Path, work: Path, pipe: Any, dtype: str, batch: int, frames: int, size: int, steps: int
) -> float:
    """Seconds for ``frames`` frames through ``Session.render`` (model load excluded: injected)."""
    import pipeline
    from pipeline.render.renderer import FrameRenderer

    scene = {
        "model": str(folder),
        "size": [size, size],
        "steps": steps,
        "guidance": 7.5,
        "seed": 42,
        "dtype": dtype,
        "frames": frames,
        "keyframes": [{"frame": 0, "prompt": A}, {"frame": frames - 1, "prompt": B}],
        "outputs": [],
    }
    session = pipeline.open(
        scene,
        base_dir=work,
        name=f"{dtype}-{batch}-{time.monotonic_ns()}",
        device=pipe.device.type,
        batch_size=batch,
        cache_dir=work / f"cache-{time.monotonic_ns()}",
        allow_outside_inputs=True,
    )
    assert not session.problems, session.problems
    session.plan()  # model fingerprint and planning: outside the timing
    t0 = time.perf_counter()
    report = session.render(
        renderer=lambda setup: FrameRenderer(
            pipe, setup.scene, setup.plan, setup.cache, device=pipe.device.type, dtype=dtype
        )
    )
    seconds = time.perf_counter() - t0
    assert report.rendered == frames, report
    return seconds


def naive(pipe: Any, frames: int, size: int, steps: int) -> float:
    """The peer-tool loop: prompts encoded and one diffusers call per frame, PNG-encoded."""
    import torch

    from pipeline.render.interpolate import slerp

    device = pipe.device
    torch.set_grad_enabled(False)  # as inside the pipeline call
    t0 = time.perf_counter()
    latents = torch.randn((1, 4, size // 8, size // 8), generator=torch.Generator("cpu").manual_seed(42))
    for i in range(frames):
        a, neg = pipe.encode_prompt(A, device, 1, True, negative_prompt="")
        b, _ = pipe.encode_prompt(B, device, 1, False)
        embeds = slerp(a, b, i / max(1, frames - 1))
        image = pipe(
            prompt_embeds=embeds,
            negative_prompt_embeds=neg,
            latents=latents.to(device, pipe.dtype),
            num_inference_steps=steps,
            guidance_scale=7.5,
            height=size,
            width=size,
        ).images[0]
        image.save(io.BytesIO(), format="PNG", compress_level=1)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=32, help="frames per measurement")
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--extras", action="store_true", help="also measure torch.compile and channels-last")
    ap.add_argument("--smoke", action="store_true", help="tiny architecture, CPU, 64 px, 2 steps")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense fp16 peak")
    args = ap.parse_args([a for a in sys.argv[1:] if a not in ("--quick",)])
    import torch
    from diffusers import StableDiffusionPipeline

    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    size, steps = (64, 2) if args.smoke else (512, 25)
    frames = min(args.frames, 8) if args.smoke else args.frames
    batches = [int(b) for b in args.batches.split(",")]
    dtypes = ["float32"] if device == "cpu" else args.dtypes.split(",")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    c.header(f"gpu: SD 1.5 architecture, random weights, {size}x{size}, {steps} steps, {frames} frames")
    print(f"# device: {name}; peak {peak or '?'} TFLOP/s; torch {torch.__version__}")
    rows = []
    with c.workdir("sdgpu-") as work:
        folder = work / "sd15-random"
        t, _ = c.timed(lambda: build_model(folder, args.smoke))
        print(f"# built and saved in {t:.1f} s")
        for dtype in dtypes:
            spent: list[float] = []
            cls = timed_pipeline_class(StableDiffusionPipeline, spent, device)
            pipe = cls.from_pretrained(folder, torch_dtype=getattr(torch, dtype)).to(device)
            pipe.set_progress_bar_config(disable=True)
            ours(folder, work, pipe, dtype, batches[0], min(frames, 2), size, steps)  # warm-up
            runs: list[tuple[str, Any]] = [
                (f"ours, batch {b}", lambda b=b, p=pipe: ours(folder, work, p, dtype, b, frames, size, steps))
                for b in batches
            ]
            runs.append(("naive, 1 frame/call", lambda p=pipe: naive(p, frames, size, steps)))
            if args.extras and device == "cuda":
                runs += extra_runs(folder, work, pipe, dtype, frames, size, steps)
            for label, fn in runs:
                spent.clear()
                seconds = fn()
                inside = sum(spent)
                per_frame = seconds / frames
                util = (TFLOP_PER_FRAME / per_frame / peak) if peak and not args.smoke else None
                rows.append(
                    (
                        dtype,
                        label,
                        f"{1000 * per_frame:.1f}",
                        f"{frames / seconds:.2f}",
                        f"{100 * max(0.0, seconds - inside) / seconds:.1f}%",
                        f"{100 * util:.1f}%" if util is not None else "-",
                    )
                )
                print(f"# {dtype} {label}: {1000 * per_frame:.1f} ms/frame", flush=True)
            del pipe
            if device == "cuda":
                torch.cuda.empty_cache()
    c.table(["dtype", "renderer", "ms/frame", "frames/s", "outside the call", "of peak"], rows)


def extra_runs(
    folder: Path, work: Path, pipe: Any, dtype: str, frames: int, size: int, steps: int
) -> list[tuple[str, Any]]:
    """channels-last, then torch.compile of the UNet, each measured at batch 8 (compile time apart)."""
    import torch

    def channels_last() -> float:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        return ours(folder, work, pipe, dtype, 8, frames, size, steps)

    def compiled() -> float:
        pipe.unet = torch.compile(pipe.unet, mode="max-autotune-no-cudagraphs")
        t, _ = c.timed(lambda: ours(folder, work, pipe, dtype, 8, 8, size, steps))
        print(f"# torch.compile warm-up (compiling): {t:.1f} s", flush=True)
        return ours(folder, work, pipe, dtype, 8, frames, size, steps)

    return [("ours, batch 8, channels-last", channels_last), ("ours, batch 8, + torch.compile", compiled)]


if __name__ == "__main__":
    main()
