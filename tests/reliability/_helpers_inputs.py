"""Shared helpers for the input-side reliability tests (cache tampering, staleness, hostile scenes,
model errors): scene folders with inputs, in-process and subprocess renders, frame decoding, and
direct access to the rows of a frames store."""

from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
INPUTS = ROOT / "scenes" / "inputs"
EMBEDDED = ROOT / "pipeline" / "embedded"
HEAVY = ("torch", "diffusers", "transformers")


def scene_in(folder: Path, text: str, name: str = "scene.yaml") -> Path:
    """Write ``text`` as ``folder/name`` beside a copy of ``scenes/inputs`` (as ``folder/inputs``)."""
    inputs = folder / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    for f in INPUTS.iterdir():
        if not (inputs / f.name).exists():
            shutil.copy(f, inputs / f.name)
    path = folder / name
    path.write_text(text)
    return path


def copy_model(dst: Path, name: str = "tiny") -> Path:
    """A local diffusers folder: a copy of an embedded model."""
    shutil.copytree(EMBEDDED / name, dst)
    return dst


def render(scene: Path, cache: Path, *extra: str) -> tuple[int, dict[str, Any] | None]:
    """Render through the real CLI in this process: (exit code, the --report JSON or None)."""
    from pipeline.cli import main

    report = scene.parent / "report.json"
    report.unlink(missing_ok=True)
    try:
        main([str(scene), "--cache-dir", str(cache), "--report", str(report), "-q", *extra])
        code = 0
    except SystemExit as exc:
        code = 0 if exc.code is None else int(exc.code)
    data = json.loads(report.read_text()) if report.is_file() else None
    return code, data


def render_ok(scene: Path, cache: Path, *extra: str) -> dict[str, Any]:
    code, report = render(scene, cache, *extra)
    assert code == 0 and report is not None, f"render exited with {code}"
    return report


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``python render.py ARGS`` in a subprocess from the project root."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "render.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


# A child that runs the CLI and then reports which heavy libraries it imported.
_PROBE = """
import json, sys
from pipeline.cli import main
code = 0
try:
    main(json.loads(sys.argv[1]))
except SystemExit as exc:
    code = 0 if exc.code is None else exc.code
except BaseException:  # what `python render.py` would show as a traceback, with exit code 1
    import traceback
    traceback.print_exc()
    code = 1
heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers', 'transformers'})
print('@@' + json.dumps({'code': code, 'heavy': heavy}))
"""


def cli_probe(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> tuple[int, list[str], str, str]:
    """Run the CLI in a child process: (exit code, heavy modules imported, stdout without the probe line, stderr)."""
    full_env = {**os.environ, **(env or {})}
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(list(args))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
    lines = result.stdout.splitlines()
    probe = [line for line in lines if line.startswith("@@")]
    assert probe, f"the child died: rc={result.returncode}\n{result.stdout}\n{result.stderr}"
    info = json.loads(probe[-1][2:])
    stdout = "\n".join(line for line in lines if not line.startswith("@@"))
    return int(info["code"]), list(info["heavy"]), stdout, result.stderr


def decode(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def plan_of(scene: Path, **env_changes: Any) -> Any:
    """The plan of a scene file as the CLI makes it on a CPU (``env_changes`` replace RenderEnv fields)."""
    import dataclasses

    from pipeline.plan.planner import plan
    from pipeline.render.environment import resolve_env
    from pipeline.scene.load import load_scene

    parsed = load_scene(scene)
    env = resolve_env(parsed, device="cpu")
    if env_changes:
        env = dataclasses.replace(env, **env_changes)
    return plan(parsed, env)


def cached_frames(cache: Path, keys: list[str]) -> list[np.ndarray]:
    """Decoded frames of ``keys`` from a cache directory (each must be readable)."""
    from pipeline.store.cache import CacheDir

    out = []
    with CacheDir(cache) as c:
        for key in keys:
            blob = c.frames.get(key)
            assert blob is not None, f"frame {key[:12]} is not in {cache}"
            out.append(decode(blob))
    return out


def folder_frames(folder: Path) -> list[np.ndarray]:
    """The PNGs of a ``frames/`` output, in order."""
    return [decode(p.read_bytes()) for p in sorted(folder.glob("frame_*.png"))]


def gif_frames(path: Path) -> list[np.ndarray]:
    from PIL import Image, ImageSequence

    with Image.open(path) as im:
        return [np.asarray(f.convert("RGB"), dtype=np.int16) for f in ImageSequence.Iterator(im)]


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> int:
    assert len(a) == len(b), (len(a), len(b))
    return max((int(np.abs(x - y).max()) for x, y in zip(a, b, strict=True)), default=0)


# -- the rows of a frames store --------------------------------------------------------------


def frames_db(cache: Path) -> Path:
    return cache / "frames" / "cache.db"


def row(cache: Path, key: str) -> tuple[int, str | None, bytes | None]:
    """(mode, filename, inline value) of a frame's row in the frames store."""
    with closing(sqlite3.connect(frames_db(cache))) as db:
        found = db.execute(
            "SELECT mode, filename, value FROM Cache WHERE key = ? AND raw = 1", (key,)
        ).fetchall()
    assert len(found) == 1, f"no row for {key[:12]}"
    mode, filename, value = found[0]
    return int(mode), filename, bytes(value) if value is not None else None


def update_row(cache: Path, key: str, **columns: Any) -> None:
    sets = ", ".join(f"{name} = ?" for name in columns)
    with closing(sqlite3.connect(frames_db(cache))) as db, db:
        cursor = db.execute(f"UPDATE Cache SET {sets} WHERE key = ? AND raw = 1", (*columns.values(), key))
        assert cursor.rowcount == 1


class Payload:
    """Unpickling this opens (creates) ``path`` for writing: proof that a cache value was unpickled."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))
