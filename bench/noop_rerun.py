"""No-op re-run: how long ``python render.py SCENE`` takes when every frame and output is up to date.

A 240-frame tiny scene (3 keyframes, 32x32, 2 steps, default MP4 + GIF outputs) is written to a
temporary folder and rendered once, cold, into a fresh temporary ``--cache-dir`` (subprocess;
wall time and the report's ``seconds`` shown). Then, each a subprocess from the project root:

- ``render.py SCENE --cache-dir D -q --report R`` 5 times (median, min, max); every report must say
  0 rendered, 240 cached and both outputs ``up to date``;
- ``render.py SCENE --cache-dir D --plan`` 5 times (stdout to /dev/null);
- for scale: ``python -c pass`` and ``python -c "import pipeline.cli"`` 5 times each.

torch: one more no-op run through a ``-c`` wrapper (as tests/test_render.py does) prints whether
``torch`` is in ``sys.modules`` at the end, and one through ``python -X importtime`` is grepped for
torch/diffusers/transformers imports.

Children run with OMP_NUM_THREADS=1 (``--threads N`` to change; see ``_common.threads``).

    /work/venv/bin/python bench/noop_rerun.py [--quick]      # --quick: 60 frames, 3 repeats
"""

from __future__ import annotations

import subprocess

import _common as c

SCENE = c.THREE_KEYFRAME_SCENE

WRAPPER = """\
import sys
from pipeline.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    assert e.code in (0, None), e.code
print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', len(sys.modules), 'modules')
"""


def main() -> None:
    frames = 60 if c.quick() else 240
    n = 3 if c.quick() else 5
    c.threads()
    c.header(f"noop_rerun: {frames}-frame tiny scene, 32x32, 2 steps, MP4 + GIF")
    rows = []
    with c.workdir() as d:
        scene = c.write_scene(d, SCENE.format(frames=frames, mid=frames // 2, last=frames - 1), "noop")
        cache, report = d / "cache", d / "report.json"
        args = [scene, "--cache-dir", cache, "-q", "--report", report]

        t, _ = c.run_cli(args)
        r = c.read_json(report)
        assert (r["rendered"], r["cached"]) == (frames, 0), r
        rows.append(
            (
                "cold render (subprocess)",
                1,
                t,
                t,
                t,
                f"{r['rendered']} rendered; report seconds {r['seconds']}",
            )
        )

        times = []
        for _ in range(n):
            report.unlink()
            t, _ = c.run_cli(args)
            r = c.read_json(report)
            assert (r["rendered"], r["cached"]) == (0, frames), r
            assert set(r["output_status"].values()) == {"up to date"}, r["output_status"]
            times.append(t)
        rows.append(
            (
                "no-op re-run (subprocess)",
                n,
                c.median(times),
                min(times),
                max(times),
                f"0 rendered, {frames} cached, outputs up to date; report seconds {r['seconds']}",
            )
        )

        plan_times = [c.run_cli([scene, "--cache-dir", cache, "--plan"])[0] for _ in range(n)]
        rows.append(("--plan (subprocess)", n, c.median(plan_times), min(plan_times), max(plan_times), ""))

        for what, code in [
            ("python -c pass", "pass"),
            ("python -c 'import pipeline.cli'", "import pipeline.cli"),
        ]:
            ts = [
                c.timed(lambda: subprocess.run([c.PYTHON, "-c", code], cwd=c.ROOT, check=True))[0]
                for _ in range(n)
            ]
            rows.append((what, n, c.median(ts), min(ts), max(ts), "for scale"))

        out = subprocess.run(
            [c.PYTHON, "-c", WRAPPER, *map(str, args)], cwd=c.ROOT, capture_output=True, text=True, check=True
        )
        torch_line = out.stdout.strip().splitlines()[-1]
        imp = subprocess.run(
            [c.PYTHON, "-X", "importtime", "-c", WRAPPER, *map(str, args)],
            cwd=c.ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        heavy = sorted(
            {
                ln.split("|")[-1].strip().split(".")[0]
                for ln in imp.stderr.splitlines()
                if ln.startswith("import time:")
            }
            & {"torch", "diffusers", "transformers", "numpy", "PIL", "imageio"}
        )
        total_us = sum(
            int(ln.split("|")[0].split(":")[1])
            for ln in imp.stderr.splitlines()
            if ln.startswith("import time:") and ln.split("|")[0].split(":")[1].strip().isdigit()
        )

    c.table(["run", "n", "median s", "min s", "max s", "note"], rows)
    print(f"torch after a no-op re-run (sys.modules): {torch_line}")
    print(
        f"-X importtime: heavy packages imported: {heavy or 'none'}; sum of self import times under -X importtime {total_us / 1e6:.2f} s"
    )


if __name__ == "__main__":
    main()
