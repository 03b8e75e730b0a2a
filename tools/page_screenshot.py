"""A screenshot of a render page (``index.html``) in headless Chromium, as the README's picture is made::

    python render.py scenes/dog_cat.yaml --out /tmp/dog_cat
    python tools/page_screenshot.py /tmp/dog_cat/index.html docs/render_page.png --height 1500

Debian's chromium (``/usr/bin/chromium``) driven by playwright (the ``test`` extra); ``tests/test_page.py``
opens pages the same way (:func:`chromium`).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
# What works headless in a container: no sandbox (no user namespaces), no GPU, and nothing that reaches
# the network on its own (QUIC, background updates, sync).
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WIDTH = 1100


@contextlib.contextmanager
def chromium(height: int = 900) -> Iterator[Any]:
    """A playwright browser context of headless Chromium with a new, empty profile (removed after)."""
    if not CHROMIUM.exists():
        raise FileNotFoundError(
            f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium; .ci/run does)"
        )
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                profile,
                executable_path=str(CHROMIUM),
                headless=True,
                args=FLAGS,
                viewport={"width": WIDTH, "height": height},
            )
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("page", type=Path, help="the index.html of a render")
    parser.add_argument("png", type=Path, help="where to write the screenshot")
    parser.add_argument("--height", type=int, default=1500, help="pixels of the page shown (from the top)")
    args = parser.parse_args()
    with chromium(args.height) as context:
        page = context.new_page()
        page.goto(args.page.resolve().as_uri(), wait_until="load")
        page.wait_for_function(
            "!document.querySelector('video') || document.querySelector('video').readyState >= 2"
        )
        page.screenshot(path=str(args.png))
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
