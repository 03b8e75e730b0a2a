"""CPU threads for rendering: 1 vs torch's default (one per core) vs the project's choice, in one run.

Renders the same 12-frame scene (64x64, 8 steps, tiny model) in fresh caches through ``render.py``
subprocesses, the settings alternating round by round so that load changes hit each alike. Prints the
wall time per setting (median of the rounds) and the load average around the run.

    python bench/threads.py [--rounds N]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import _common as c

SCENE = """\
model: tiny
size: [64, 64]
steps: 8
seed: 1
frames: 12
keyframes:
  - {frame: 0, prompt: "a dog in a field"}
  - {frame: 11, prompt: "a cat in a field"}
outputs: []
"""
SETTINGS = {"1 thread": ["--threads", "1"], "torch default": ["--threads", "0"], "auto (default)": []}


def main() -> None:
    args = sys.argv[1:]
    rounds = int(args[args.index("--rounds") + 1]) if "--rounds" in args else 3
    c.header(f"threads: 12 frames, 64x64, 8 steps, tiny, CPU; {rounds} rounds")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    used: dict[str, str] = {}
    with c.workdir() as d:
        scene = c.write_scene(d, SCENE)
        for r in range(rounds):
            for name, extra in SETTINGS.items():
                report = d / f"report-{r}-{len(times[name])}.json"
                cmd = [c.PYTHON, str(c.ROOT / "render.py"), str(scene), "--cache-dir", str(d / f"c{r}{name}")]
                cmd += ["--device", "cpu", "-q", "--report", str(report), *extra]
                t0 = time.perf_counter()
                subprocess.run(cmd, env=env, check=True, capture_output=True)
                times[name].append(time.perf_counter() - t0)
                used[name] = str(json.loads(report.read_text()).get("threads"))
    print(f"# load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    base = c.median(times["1 thread"])
    c.table(
        ["setting", "threads used", "seconds (median)", "all rounds", "vs 1 thread"],
        [
            (n, used[n], f"{c.median(t):.2f}", " ".join(f"{x:.1f}" for x in t), f"{c.median(t) / base:.2f}x")
            for n, t in times.items()
        ],
    )


if __name__ == "__main__":
    main()
