"""Peak memory of a long render against a short one: memory must not grow with the frame count.

Frames go into the cache as each batch finishes and the outputs stream frames back from the cache
one at a time, so a 1,000-frame render should peak at about the same RSS as a 100-frame render.

Each render is a separate subprocess, ``python render.py SCENE --cache-dir FRESH -q --report R``,
of a tiny-model scene (3 keyframes, 32x32, 2 steps, default MP4 + GIF outputs) in a temporary
folder. The child's peak RSS is ``ru_maxrss`` from ``os.wait4`` on that child (Linux: KiB; it
covers the child and the children it waited for, i.e. ffmpeg). While it runs, its ``VmRSS`` is
also sampled every 0.05 s from /proc to show when the peak happens (render vs. writing outputs).
Both sizes run twice, interleaved (100, 1000, 100, 1000); the table shows the larger peak of
each size and the ratio long/short.

Children run with OMP_NUM_THREADS=1 (``--threads N`` to change; see ``_common.threads``).

    /work/venv/bin/python bench/memory.py [--quick]      # --quick: 20 vs 200 frames, once each
    /work/venv/bin/python bench/memory.py --frames 100,4000   # other sizes, once each
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import _common as c

SCENE = c.THREE_KEYFRAME_SCENE


def sample_rss(pid: int, out: list[tuple[float, int]], stop: threading.Event) -> None:
    """Append (seconds since start, VmRSS KiB) of ``pid`` until ``stop`` is set or it is gone."""
    t0 = time.perf_counter()
    path = Path(f"/proc/{pid}/status")
    while not stop.is_set():
        try:
            for line in path.read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out.append((time.perf_counter() - t0, int(line.split()[1])))
        except (OSError, ValueError, IndexError):
            return
        time.sleep(0.05)


def render(folder: Path, frames: int) -> dict:
    """Render a fresh ``frames``-frame scene in a child; returns its peak RSS, time and report."""
    scene = c.write_scene(
        folder, SCENE.format(frames=frames, mid=frames // 2, last=frames - 1), f"mem{frames}"
    )
    report = folder / "report.json"
    cmd = [
        c.PYTHON,
        str(c.ROOT / "render.py"),
        str(scene),
        "--cache-dir",
        str(folder / "cache"),
        "-q",
        "--report",
        str(report),
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=c.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample_rss, args=(proc.pid, samples, stop), daemon=True)
    sampler.start()
    stderr = proc.stderr.read().decode()  # the child only ends after closing it
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    secs = time.perf_counter() - t0
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{stderr[-2000:]}")
    r = c.read_json(report)
    assert (r["rendered"], r["cached"]) == (frames, 0), r
    peak_at = max(samples, key=lambda s: s[1])[0] if samples else float("nan")
    return {
        "peak_kib": usage.ru_maxrss,
        "seconds": secs,
        "report_s": r["seconds"],
        "peak_at": peak_at,
        "sampled_kib": max((s[1] for s in samples), default=0),
    }


def main() -> None:
    short, long = (20, 200) if c.quick() else (100, 1000)
    rounds = 1 if c.quick() else 2
    if "--frames" in sys.argv:  # e.g. --frames 100,4000: other sizes, once each
        short, long = map(int, sys.argv[sys.argv.index("--frames") + 1].split(","))
        rounds = 1
    c.threads()
    c.header(
        f"memory: peak RSS of a {long}-frame render against a {short}-frame render (32x32, 2 steps, MP4 + GIF)"
    )
    results: dict[int, list[dict]] = {short: [], long: []}
    with c.workdir() as d:
        for r in range(rounds):
            for frames in (short, long):
                results[frames].append(render(d / f"{frames}-{r}", frames))
    rows = []
    for frames, rs in results.items():
        for i, res in enumerate(rs):
            rows.append(
                (
                    frames,
                    i + 1,
                    res["peak_kib"] / 1024,
                    res["sampled_kib"] / 1024,
                    res["peak_at"],
                    res["seconds"],
                    res["report_s"],
                )
            )
    c.table(
        [
            "frames",
            "run",
            "peak RSS MiB (wait4)",
            "max sampled VmRSS MiB",
            "sampled peak at s",
            "wall s",
            "report seconds",
        ],
        rows,
    )
    peak = {f: max(x["peak_kib"] for x in rs) / 1024 for f, rs in results.items()}
    print(
        f"peak {long} frames / peak {short} frames = {peak[long]:.1f} / {peak[short]:.1f} MiB = {peak[long] / peak[short]:.3f}"
    )


if __name__ == "__main__":
    main()
