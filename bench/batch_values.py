"""Keyframed values and batching: frames per second of scenes that ease guidance or strength.

Two scenes with the embedded ``tiny`` model on the CPU, rendered through the API into a fresh cache
with ``--batch-size 4``: a txt2img morph whose guidance eases from 3 to 9 (with a negative prompt
per keyframe), and ``scenes/img2img.yaml`` (strength eased from 0.3 to 0.8). The real renderer is
wrapped to count its calls and time them; frames per second are counted from the start of the
first pipeline call to the end of ``render()`` (model loading and planning left out). Run it from
another commit's checkout (``git worktree add /tmp/old COMMIT``, this file copied in) for the
figures before.

    python bench/batch_values.py [--rounds 3] [--threads 1] [--quick]
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import _common as c

GUIDANCE = """\
model: tiny
size: [{size}, {size}]
steps: 10
frames: {frames}
seed: 5
curve: ease_in_out_sine
keyframes:
  - {{frame: 0, prompt: "a lighthouse on a cliff", negative_prompt: "blurry", guidance: 3.0}}
  - {{frame: {last}, prompt: "a lighthouse in a storm", negative_prompt: "dark", guidance: 9.0}}
outputs: []
"""


class Timed:
    """The real renderer, its calls counted and the first one's start noted."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls: list[int] = []
        self.first: float | None = None

    @property
    def encoded(self) -> int:
        return int(self.real.encoded)

    @property
    def scene(self) -> Any:
        return self.real.scene

    def render_batch(self, jobs: list[Any]) -> list[Any]:
        if self.first is None:
            self.first = time.perf_counter()
        self.calls.append(len(jobs))
        return self.real.render_batch(jobs)


def render_once(path: Path, cache: Path, threads: int) -> tuple[int, int, float]:
    import pipeline

    session = pipeline.open(path, device="cpu", batch_size=4, threads=threads, cache_dir=cache)
    session.plan()
    made: list[Timed] = []

    def factory(setup: Any) -> Timed:
        made.append(Timed(setup.default()))
        return made[0]

    report = session.render(renderer=factory)
    end = time.perf_counter()
    timed = made[0]
    assert report.rendered == sum(timed.calls), report
    assert timed.first is not None
    return report.rendered, len(timed.calls), end - timed.first


def main() -> None:
    threads = c.threads()
    args = sys.argv[1:]
    rounds = int(args[args.index("--rounds") + 1]) if "--rounds" in args else (1 if c.quick() else 3)
    c.header(
        f"batch_values: eased guidance and eased strength, batch 4, {threads} thread(s), {rounds} rounds"
    )
    rows = []
    with c.workdir() as d:
        shutil.copytree(c.ROOT / "scenes" / "inputs", d / "inputs")
        frames = 8 if c.quick() else 16
        guidance = c.write_scene(d, GUIDANCE.format(size=64, frames=frames, last=frames - 1), "guidance")
        img2img = d / "img2img.yaml"
        shutil.copy(c.ROOT / "scenes" / "img2img.yaml", img2img)
        for name, path in (
            ("eased guidance (txt2img)", guidance),
            ("scenes/img2img.yaml (eased strength)", img2img),
        ):
            seconds = []
            for r in range(rounds):
                n, calls, t = render_once(path, d / f"cache-{path.stem}-{r}", threads)
                seconds.append(t)
            t = c.median(seconds)
            rows.append((name, n, calls, f"{t:.2f}", " ".join(f"{s:.2f}" for s in seconds), f"{n / t:.2f}"))
    c.table(["scene", "frames", "pipeline calls", "seconds (median)", "all rounds", "frames/s"], rows)


if __name__ == "__main__":
    main()
