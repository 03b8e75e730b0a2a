"""Where the project keeps things by default: the cache folder.

In a checkout (``git clone`` then ``render.py``, or ``pip install -e .``) the cache is ``cache/`` at the
project root, beside the scenes. Installed as a package (``pip install .``), the code lives in
site-packages, which is no place for gigabytes of frames: the cache goes to the user's cache folder
(``platformdirs``: ``~/.cache/sd-scenes`` on Linux, ``~/Library/Caches/sd-scenes`` on macOS)::

    default_cache_dir()        # Path('/work/main/cache') in a checkout
"""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
APP_NAME = "sd-scenes"


def in_checkout() -> bool:
    """True when the code runs from the project's own folder (a clone or an editable install)."""
    return (PROJECT_ROOT / "pyproject.toml").is_file() and (PROJECT_ROOT / "render.py").is_file()


def default_cache_dir() -> Path:
    """``cache/`` in a checkout, the user's cache folder for an installed package."""
    if in_checkout():
        return PROJECT_ROOT / "cache"
    import platformdirs

    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def cache_location_note(cache_dir: Path) -> str:
    """How ``cache info`` says which default applies."""
    if cache_dir != default_cache_dir():
        return "chosen with --cache-dir"
    return "the checkout's cache/ folder" if in_checkout() else "the user's cache folder (platformdirs)"
