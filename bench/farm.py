"""The render farm (``--workers``) against a render in one process: frames per second with 1 and 2 CPU
workers, and what shipping a batch costs the driver.

Scene: a 2-keyframe prompt morph, tiny model, 64x64, 8 steps, 32 frames (16 with ``--quick``), batch 4,
float32 on the CPU, every worker with ONE torch thread (``--threads 1``; the in-process render too).

- in-process: ``pipeline.open(scene, threads=1, batch_size=4).render()``;
- farm, 1 and 2 workers: the same with ``workers=N`` on a local Ray cluster (started once, outside the
  timings; each render's workers load the model, inside them).

Each render starts from an empty cache; 3 rounds of each (1 with ``--quick``), medians shown. ``total s`` is the whole ``render()``; ``steady frames/s`` counts
from the first frame stored to the last (model loads and the first batch left out); ``driver CPU ms/frame``
is this process's CPU time (all its threads: claims, sending, verifying and storing PNGs) over the frames.

Shipping: a do-nothing Ray actor is sent batches of 4 frames as the farm sends them (jobs with their
recipes, two prompt embeddings the size of SD 1.5's, 77x768 float32, one feedback frame) and returns 4 PNGs
of 64x64 and of 512x512 (real frames' sizes); the driver then checks them as the farm does (``verify_png``).
Per frame: the round trip, the bytes each way, and the check. Median of 20 batches.

    .venv/bin/python bench/farm.py [--quick]
"""

from __future__ import annotations

import os
import pickle
import time

import _common as c

SCENE = """\
model: tiny
size: [64, 64]
steps: 8
guidance: 7.0
seed: 42
outputs: []
keyframes:
  - frame: 0
    prompt: "a watercolor fox in a snowy forest"
  - frame: {last}
    prompt: "a watercolor owl in a snowy forest"
"""
BATCH = 4


def render(folder, frames: int, workers: int | None) -> dict[str, float]:
    import pipeline

    scene = c.write_scene(folder, SCENE.format(last=frames - 1))
    stored: list[float] = []
    session = pipeline.open(scene, threads=1, batch_size=BATCH, workers=workers, cache_dir=folder / "cache")
    cpu0, t0 = time.process_time(), time.perf_counter()
    report = session.render(progress=lambda p: stored.extend(time.perf_counter() for _ in p.keys))
    total, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert report.rendered == frames, report
    steady = (len(stored) - BATCH) / (stored[-1] - stored[BATCH - 1])
    return {"total": total, "fps": frames / total, "steady": steady, "cpu_ms": 1000 * cpu / frames}


def shipping(size: int, rounds: int) -> dict[str, float]:
    """Round trip of one farm batch and its PNGs to a do-nothing actor, per frame."""
    import numpy as np
    import ray
    import torch
    from safetensors.torch import save

    import pipeline
    from pipeline.render.batches import encode_png
    from pipeline.render.farm import verify_png

    rng = np.random.default_rng(0)
    pngs = [encode_png(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(BATCH)]
    with c.workdir() as folder:
        scene = c.write_scene(folder, SCENE.format(last=BATCH - 1))
        jobs = list(pipeline.open(scene).plan())
    emb = save({"prompt_embeds": torch.zeros(1, 77, 768)})
    batch = {"jobs": jobs, "embeddings": {"a": emb, "b": emb}, "previous": {"p": pngs[0]}}

    @ray.remote(num_cpus=0)
    class Echo:
        def render(self, job: str, batch: dict) -> list[bytes]:
            return pngs

    echo = Echo.remote()
    ray.get(echo.render.remote("x", batch))
    trips, checks = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        back = ray.get(echo.render.remote("x", batch))
        trips.append(time.perf_counter() - t)
        t = time.perf_counter()
        for png in back:
            verify_png(png, (size, size))
        checks.append(time.perf_counter() - t)
    ray.kill(echo)
    sent = len(pickle.dumps(batch, protocol=5))
    return {
        "trip_ms": 1000 * c.median(trips) / BATCH,
        "check_ms": 1000 * c.median(checks) / BATCH,
        "sent_kb": sent / BATCH / 1024,
        "sent_no_emb_kb": len(pickle.dumps({**batch, "embeddings": {}}, protocol=5)) / BATCH / 1024,
        "back_kb": sum(map(len, pngs)) / BATCH / 1024,
    }


def main() -> None:
    c.threads()
    frames = 16 if c.quick() else 32
    c.header(f"render farm: {frames} frames 64x64, 8 steps, batch {BATCH}, 1 torch thread per worker")
    from pipeline.render.farm import farm_pool

    rows, results = [], {}
    for workers in (None, 1, 2):
        if workers is not None:
            farm_pool(workers, None, "cpu", 1).pids()  # the cluster and its workers started, untimed
        runs = []
        for _ in range(1 if c.quick() else 3):
            with c.workdir() as folder:
                runs.append(render(folder, frames, workers))
        r = results[workers] = {k: c.median([run[k] for run in runs]) for k in runs[0]}
        r["all"] = " ".join(f"{run['steady']:.1f}" for run in runs)
        base = results[None]["steady"]
        name = "in-process" if workers is None else f"farm, {workers} worker{'s' * (workers > 1)}"
        rows.append(
            [
                name,
                f"{r['total']:.2f}",
                f"{r['fps']:.2f}",
                f"{r['steady']:.2f}",
                r["all"],
                f"{r['steady'] / base:.2f}",
                f"{r['cpu_ms']:.1f}",
            ]
        )
    c.table(
        [
            "render",
            "total s",
            "frames/s",
            "steady frames/s",
            "all rounds",
            "vs in-process",
            "driver CPU ms/frame",
        ],
        rows,
    )
    print(f"2 workers / 1 worker (steady): {results[2]['steady'] / results[1]['steady']:.2f}")
    rows = []
    for size in (64, 512):
        s = shipping(size, 5 if c.quick() else 20)
        rows.append(
            [
                f"{size}x{size}",
                f"{s['trip_ms']:.2f}",
                f"{s['check_ms']:.2f}",
                f"{s['sent_kb']:.1f}",
                f"{s['sent_no_emb_kb']:.1f}",
                f"{s['back_kb']:.1f}",
            ]
        )
    c.table(
        [
            "frame",
            "round trip ms/frame",
            "PNG check ms/frame",
            "sent KiB/frame",
            "sent KiB/frame, embeddings held",
            "PNG KiB/frame back",
        ],
        rows,
    )
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
