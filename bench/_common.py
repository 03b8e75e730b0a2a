"""Shared helpers for the benchmarks: temp scenes, timing, medians, subprocess runs, machine facts, tables.

Every benchmark writes its scenes, caches and outputs under a temporary directory (``workdir()``),
never into the project's ``scenes/`` or ``cache/``. Timings use ``time.perf_counter``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def quick() -> bool:
    """``--quick`` on the command line: smaller sizes for a smoke run."""
    return "--quick" in sys.argv[1:]


def threads() -> int:
    """``--threads N`` (default 1): torch intra-op threads here and ``OMP_NUM_THREADS`` for children.

    On a shared 2-core machine torch's default (one OpenMP thread per core) is unusable for timing:
    when another process holds a core, every parallel region waits for the descheduled thread and
    the same pipeline call takes 0.06 s or 18 s. One thread gives stable, comparable numbers.
    """
    args = sys.argv[1:]
    n = int(args[args.index("--threads") + 1]) if "--threads" in args else 1
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["MKL_NUM_THREADS"] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    return n


@contextlib.contextmanager
def workdir(prefix: str = "sdbench-") -> Iterator[Path]:
    """A fresh temporary folder, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix) as d:
        yield Path(d)


def write_scene(folder: Path, text: str, name: str = "scene") -> Path:
    """Write scene YAML text to ``folder/name.yaml`` and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def repeat(fn: Callable[[], Any], n: int) -> list[float]:
    """Seconds of ``n`` calls."""
    return [timed(fn)[0] for _ in range(n)]


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def run_cli(
    args: Sequence[str], *, stdout: Any = subprocess.DEVNULL, check: bool = True, **kw: Any
) -> tuple[float, subprocess.CompletedProcess]:
    """Run ``python render.py ARGS`` as a subprocess from the project root; (wall seconds, result)."""
    cmd = [PYTHON, str(ROOT / "render.py"), *map(str, args)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=stdout, stderr=subprocess.PIPE, text=True, **kw)
    secs = time.perf_counter() - t0
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return secs, proc


def render_inprocess(args: Sequence[str]) -> None:
    """``main(args)`` of the CLI in this process; raises if it exits non-zero."""
    from pipeline.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"render.py {' '.join(map(str, args))} exited {exc.code}") from None


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def machine() -> dict[str, str]:
    """nproc, CPU model, RAM, GPU (none on the benchmark machine), Python and torch versions."""
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    gpu = (
        "no GPU"
        if not (os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/dri/renderD128"))
        else "GPU device present"
    )
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "ram": ram,
        "gpu": gpu,
        "python": platform.python_version(),
    }


def header(title: str) -> None:
    m = machine()
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"
    print(f"# {title}")
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; nproc={m['nproc']}; cpu={m['cpu']}; ram={m['ram']}; {m['gpu']}; python {m['python']}"
    )
    print(
        f"# load average at start: {load}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; code: {revision()}"
    )


def revision() -> str:
    """The git commit of the code measured, and the pipeline files changed since (read-only git)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--short", "--", "pipeline", "render.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.split()
    except OSError:
        return "unknown"
    changed = [p for p in dirty if "/" in p or p.endswith(".py")]
    return f"{head or 'unknown'}" + (f" + uncommitted {', '.join(changed)}" if changed else "")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a Markdown table (floats with 3 significant digits)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("| " + " | ".join("-" * w for w in widths) + " |")
    for r in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


# A 3-keyframe tiny scene at 32x32 and 2 steps, N frames long (the no-op and memory benchmarks).
THREE_KEYFRAME_SCENE = """\
model: tiny
size: [32, 32]
steps: 2
guidance: 7.0
seed: 42
frames: {frames}
keyframes:
  - frame: 0
    prompt: "a dog in a field"
  - frame: {mid}
    prompt: "a fox in a field"
  - frame: {last}
    prompt: "a cat in a field"
"""
