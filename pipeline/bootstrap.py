"""First-run set-up for ``python render.py``: a fresh clone renders with one command.

``render.py`` calls :func:`ensure` before it imports anything else. Standard library only, since it
runs before the project's dependencies exist:

- the dependencies import here (your own environment, or ``.venv`` itself) and, inside ``.venv``, the
  set-up is current: nothing to do;
- otherwise ``setup.sh`` runs once (``.venv`` with torch first, then the pinned packages), unless the
  set-up in ``.venv`` is already current, and the command goes on inside ``.venv``'s Python.

"Current" means ``.venv/.sd-scenes-setup`` holds the digest of ``pyproject.toml``, ``constraints.txt``
and ``setup.sh`` as they are now (``setup.sh`` writes it), so a pull that changes a dependency sets
up again by itself::

    python3 render.py scenes/dog_cat.yaml     # sets up on first use, then renders
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
STAMP = VENV / ".sd-scenes-setup"
STAMPED_FILES = ("pyproject.toml", "constraints.txt", "setup.sh")
# Enough to tell "this interpreter has the project's dependencies" without importing them.
NEEDED = ("torch", "diffusers", "transformers", "typer", "diskcache", "pydantic", "platformdirs")


def setup_digest(root: Path = ROOT) -> str:
    """What ``setup.sh`` writes to the stamp: sha256 of the files that decide what is installed."""
    h = hashlib.sha256()
    for name in STAMPED_FILES:
        h.update((root / name).read_bytes())
    return h.hexdigest()


def venv_python(venv: Path = VENV) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def setup_is_current(venv: Path = VENV, root: Path = ROOT) -> bool:
    stamp = venv / STAMP.name
    try:
        return venv_python(venv).exists() and stamp.read_text().strip() == setup_digest(root)
    except OSError:
        return False


def running_in(venv: Path) -> bool:
    return Path(sys.prefix).resolve() == venv.resolve()


def action(*, in_venv: bool, has_deps: bool, current: bool) -> str:
    """What :func:`ensure` does: 'run' here, 'exec' into .venv, or 'setup' first (then exec)."""
    if in_venv:
        return "run" if current and has_deps else "setup"
    if has_deps:
        return "run"  # the user's own environment: leave it alone
    return "exec" if current else "setup"


def ensure(argv: list[str] | None = None) -> None:
    """Make sure the command runs where the dependencies are; may replace this process."""
    has_deps = all(importlib.util.find_spec(name) is not None for name in NEEDED)
    what = action(in_venv=running_in(VENV), has_deps=has_deps, current=setup_is_current())
    if what == "run":
        return
    if what == "setup":
        print(
            "sd-scenes: setting up .venv (torch first, then the pinned packages); the first time takes a "
            "minute or two ...",
            file=sys.stderr,
        )
        done = subprocess.run(["bash", str(ROOT / "setup.sh")], check=False)
        if done.returncode != 0 or not setup_is_current():
            print("sd-scenes: the set-up failed (see above); run 'bash setup.sh' to retry", file=sys.stderr)
            raise SystemExit(2)
    python = venv_python()
    args = [str(python), *(sys.argv if argv is None else argv)]
    os.execv(str(python), args)
