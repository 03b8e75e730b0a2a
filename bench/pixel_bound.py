"""How much a frame that is not fed back depends on the CPU thread count and on its batch.

Every frame's initial noise and extra noise come from its own generator, so its batch and the thread
count can only change the order of floating-point sums. This script renders one small scene per mode
and family (and an ancestral sampler) through the real CLI in fresh caches under several (threads,
batch size) settings and prints, per scene, the largest |difference| of any pixel (0-255) from the
reference run (1 thread, batch size 1), and how many pixel values differ at all.

    python bench/pixel_bound.py [--size N] [--steps N] [--frames N]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from _common import PYTHON, ROOT, header, workdir
from PIL import Image

SETTINGS = [(1, 1), (2, 1), (1, 4), (2, 4)]  # (threads, batch size); the first is the reference
IMG = "init_image: inputs/landscape.png\n"
SCENES = {
    "txt2img sd": ("tiny", ""),
    "txt2img sd, euler_ancestral": ("tiny", "scheduler: euler_ancestral\n"),
    "img2img sd": ("tiny", "mode: img2img\n" + IMG + "strength: 0.6\n"),
    "inpaint sd": ("tiny", "mode: inpaint\n" + IMG + "mask: inputs/house_mask.png\nstrength: 0.8\n"),
    "inpaint tiny-inpaint": ("tiny-inpaint", "mode: inpaint\n" + IMG + "mask: inputs/house_mask.png\n"),
    "depth2img estimated": ("tiny-depth", "mode: depth2img\n" + IMG + "strength: 0.7\n"),
    "txt2img sdxl": ("tiny-sdxl", "negative_prompt: blurry\n"),
    "img2img sdxl": ("tiny-sdxl", "mode: img2img\n" + IMG + "strength: 0.6\n"),
    "txt2img sd3": ("tiny-sd3", "negative_prompt: blurry\n"),
    "img2img sd3": ("tiny-sd3", "mode: img2img\n" + IMG + "strength: 0.6\n"),
}


def arg(name: str, default: int) -> int:
    args = sys.argv[1:]
    return int(args[args.index(name) + 1]) if name in args else default


def render(scene: Path, out: Path, cache: Path, threads: int, batch: int) -> np.ndarray:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [PYTHON, str(ROOT / "render.py"), str(scene), "--cache-dir", str(cache), "--out", str(out)]
    cmd += ["--device", "cpu", "--batch-size", str(batch), "-q"]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return np.stack(
        [np.asarray(Image.open(p).convert("RGB"), dtype=int) for p in sorted((out / "f").glob("*.png"))]
    )


def main() -> None:
    size, steps, frames = arg("--size", 64), arg("--steps", 4), arg("--frames", 6)
    header("pixel_bound")
    print(f"{size}x{size}, steps {steps}, {frames} frames (per_frame noise, a prompt morph), CPU float32")
    print("| scene | " + " | ".join(f"{t} thr, batch {b}" for t, b in SETTINGS[1:]) + " |")
    print("| --- |" + " --- |" * (len(SETTINGS) - 1))
    worst = 0
    for name, (model, extra) in SCENES.items():
        with workdir() as tmp:
            shutil.copytree(ROOT / "scenes" / "inputs", tmp / "inputs")
            scene = tmp / "s.yaml"
            scene.write_text(
                f"model: {model}\nsize: [{size}, {size}]\nsteps: {steps}\nnoise: per_frame\n{extra}"
                f"keyframes:\n  - {{frame: 0, prompt: a red house}}\n"
                f"  - {{frame: {frames - 1}, prompt: a blue tower}}\noutputs: [f/]\n"
            )
            runs = {s: render(scene, tmp / f"o{s}", tmp / f"c{s}", *s) for s in SETTINGS}
        ref = runs[SETTINGS[0]]
        cells = []
        for s in SETTINGS[1:]:
            diff = np.abs(runs[s] - ref)
            worst = max(worst, int(diff.max()))
            cells.append(f"{int(diff.max())} ({(diff > 0).mean() * 100:.2f}% differ)")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\nlargest difference over every scene and setting: {worst}")


if __name__ == "__main__":
    main()
