"""How far a feedback chain drifts between CPU thread counts and batch sizes.

A single frame's pixels depend on the number of CPU threads by at most 1 level (reduction order in
float32 matmuls). A feedback chain feeds each frame into the next, so that difference is amplified
frame by frame. This script renders ``scenes/feedback_zoom.yaml`` (and, for comparison, the plain
``scenes/dog_cat.yaml``) through the real CLI in fresh caches under several settings and prints, per
frame, the largest pixel difference from the reference run (1 thread, batch size 1).

    python bench/feedback_drift.py [--steps N] [--quick]
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from _common import PYTHON, ROOT, header, quick, workdir
from PIL import Image

SETTINGS = [(1, 1), (2, 1), (4, 1), (1, 4), (2, 4)]  # (threads, batch size); the first is the reference


def render(scene: Path, out: Path, cache: Path, threads: int, batch: int) -> list[np.ndarray]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [PYTHON, str(ROOT / "render.py"), str(scene), "--cache-dir", str(cache), "--out", str(out)]
    cmd += ["--device", "cpu", "--batch-size", str(batch), "-q"]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return [np.asarray(Image.open(p).convert("RGB"), dtype=int) for p in sorted((out / "f").glob("*.png"))]


def main() -> None:
    args = sys.argv[1:]
    steps = int(args[args.index("--steps") + 1]) if "--steps" in args else 10
    header("feedback_drift")
    for name in ("feedback_zoom", "dog_cat"):
        with workdir() as tmp:
            shutil.copytree(ROOT / "scenes" / "inputs", tmp / "inputs")
            text = (ROOT / "scenes" / f"{name}.yaml").read_text()
            text = re.sub(r"^steps: \d+", f"steps: {steps}", text, flags=re.M)
            text = re.sub(r"^outputs:(\n  - .*)+", "outputs: [f/]", text, flags=re.M)
            if quick():
                text = re.sub(r"^(  - frame: )\d+(\n    prompt: .*castles in)", r"\g<1>7\2", text, flags=re.M)
            scene = tmp / f"{name}.yaml"
            scene.write_text(text)
            runs = {s: render(scene, tmp / f"o{s}", tmp / f"c{s}", *s) for s in SETTINGS}
            ref = runs[SETTINGS[0]]
            print(f"\n{name} (steps {steps}): largest |difference| per frame from 1 thread, batch 1")
            for s in SETTINGS[1:]:
                diffs = [int(np.abs(a - b).max()) for a, b in zip(ref, runs[s], strict=True)]
                print(f"  threads {s[0]}, batch {s[1]}: " + " ".join(map(str, diffs)))


if __name__ == "__main__":
    main()
