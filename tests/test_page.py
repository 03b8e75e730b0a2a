"""The render page (``index.html`` beside the outputs), loaded in a real headless Chromium.

The render uses the embedded tiny model at 64x64 with 2 steps. The page is checked in a copy of the
output folder moved elsewhere (every link must be relative): the video plays (its metadata loads, its
duration is the frames over the fps), every picture decodes, the plot is there, the table has one row
per frame and says which frames this run rendered, nothing fails to load and nothing is logged as an
error. A screenshot of it must not be blank.

Chromium is Debian's (``/usr/bin/chromium``; ``.ci/run`` installs it), driven by playwright's Python
package (the ``test`` extra); the test fails, saying so, where either is missing.
"""

from __future__ import annotations

import html.parser
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from pipeline.outputs.page import MAX_THUMBS, sheet_frames
from pipeline.outputs.targets import check_outputs
from pipeline.scene.load import load_scene
from pipeline.scene.problems import SceneError
from tests.conftest import run_render as render
from tools.page_screenshot import CHROMIUM, chromium

FRAMES, FPS = 8, 12

SCENE = """\
model: tiny
size: [64, 64]
steps: 2
seed: 3
fps: 12
frames: 8
keyframes:
  - {frame: 0, prompt: a dog, guidance: 5}
  - {frame: 4, prompt: a wolf, zoom: 1.0}
  - {frame: 7, prompt: a cat, guidance: 9}
"""


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A scene rendered after a preview of frame 0: frame 0 was cached, the other 7 rendered."""
    root = tmp_path_factory.mktemp("page")
    scene = root / "scene.yaml"
    scene.write_text(SCENE)
    cache = root / "cache"
    out = root / "renders" / "scene"
    render(scene, cache, "--frame", "0")
    assert not (out / "index.html").exists(), "a preview wrote the render page"
    report = render(scene, cache)
    return {"scene": scene, "cache": cache, "out": out, "report": report}


def browser_check(page_file: Path, screenshot: Path | None = None) -> dict[str, Any]:
    """Load ``page_file`` from disk in headless Chromium; what the page holds, and what went wrong."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium; .ci/run does)"
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail("playwright is missing: pip install -e '.[test]' (setup.sh does)")
    problems: list[str] = []
    with chromium() as context:
        page = context.new_page()
        page.on(
            "console",
            lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None,
        )
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: problems.append(f"failed: {r.url} ({r.failure})"))
        page.goto(page_file.as_uri(), wait_until="load")  # every picture loaded (or failed)
        # HAVE_CURRENT_DATA: the video decoded its first frame.
        page.wait_for_function("document.querySelector('video').readyState >= 2", timeout=20_000)
        found = page.evaluate(
            """() => {
            const v = document.querySelector('video');
            return {
              video: {readyState: v.readyState, duration: v.duration, width: v.videoWidth, error: v.error},
              images: [...document.images].map(i => ({src: i.getAttribute('src'), width: i.naturalWidth})),
              plots: [...document.querySelectorAll('img.plot')].map(i => i.getAttribute('src')),
              rows: [...document.querySelectorAll('#frame-table tbody tr')].map(
                r => [...r.cells].slice(0, 2).map(c => c.textContent)),
              settings: document.querySelector('#resolved-scene').textContent,
            };
          }"""
        )
        played = page.evaluate(
            "() => document.querySelector('video').play().then(() => 'playing', e => String(e))"
        )
        if screenshot is not None:
            page.screenshot(path=str(screenshot), full_page=True)
    return {**found, "played": played, "problems": problems}


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [v for k, v in attrs if k in ("src", "href") and v is not None]


@pytest.mark.slow
def test_the_page_shows_everything_in_chromium_from_a_moved_folder(
    rendered: dict[str, Any], tmp_path: Path
) -> None:
    report = rendered["report"]
    out: Path = rendered["out"]
    assert report["page"] == str(out / "index.html")
    moved = tmp_path / "elsewhere" / "a folder"  # a space: links are percent-encoded
    moved.parent.mkdir()
    shot = tmp_path / "page.png"
    shutil.move(out, moved)  # nothing may still point at the original folder
    try:
        found = browser_check(moved / "index.html", screenshot=shot)
    finally:
        shutil.move(moved, out)
    assert found["problems"] == []
    video = found["video"]
    assert video["error"] is None and video["readyState"] >= 2 and video["width"] == 64
    assert video["duration"] == pytest.approx(FRAMES / FPS, abs=0.01)
    assert found["played"] == "playing"
    assert {i["src"] for i in found["images"]} == {
        "page/keyframe_00000.png",
        "page/keyframe_00004.png",
        "page/keyframe_00007.png",
        "page/values.svg",
    }
    assert all(i["width"] > 0 for i in found["images"]), found["images"]
    assert found["plots"] == ["page/values.svg"]
    # One row per frame; frame 0 was cached by the preview, the others were rendered by this run.
    assert found["rows"] == [["0", "cached"]] + [[str(f), "rendered"] for f in range(1, FRAMES)]
    assert "steps: 2" in found["settings"] and "frames: 8" in found["settings"]
    # The screenshot is a picture of the page, not a blank: the frames and the plot have many colours.
    with Image.open(shot) as image:
        assert image.width == 1100 and image.height > 900
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 500


def test_every_link_of_the_page_is_relative(rendered: dict[str, Any]) -> None:
    parser = _Links()
    parser.feed((rendered["out"] / "index.html").read_text())
    assert parser.links, "the page links to nothing"
    for link in parser.links:
        assert ":" not in link and not link.startswith(("/", "\\")), link
        assert (rendered["out"] / link).exists(), link


def test_previews_and_no_op_reruns_leave_the_page_alone(rendered: dict[str, Any]) -> None:
    out: Path = rendered["out"]
    page = out / "index.html"
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in [page, *sorted((out / "page").iterdir())]}
    again = render(rendered["scene"], rendered["cache"])
    assert again["page"] is None and again["rendered"] == 0
    render(rendered["scene"], rendered["cache"], "--frames", "0:8:2")
    render(rendered["scene"], rendered["cache"], "--draft")
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in [page, *sorted((out / "page").iterdir())]}
    assert after == before
    assert not list((out / "preview").glob("*.html"))


def test_a_rerender_keeps_the_replaced_page_with_the_replaced_outputs(tmp_path: Path) -> None:
    scene = tmp_path / "scene.yaml"
    short = "model: tiny\nsize: [32, 32]\nsteps: 2\nframes: {n}\nkeyframes:\n  - {{frame: 0, prompt: a dog}}\n  - {{frame: {last}, prompt: a cat}}\n"
    scene.write_text(short.format(n=3, last=2))
    render(scene, tmp_path / "cache")
    out = tmp_path / "renders" / "scene"
    first = (out / "index.html").read_text()
    scene.write_text(short.format(n=4, last=3))
    report = render(scene, tmp_path / "cache")
    kept = Path(report["previous"])
    assert (kept / "index.html").read_text() == first
    assert (kept / "page" / "keyframe_00002.png").is_file() and (kept / "scene.mp4").is_file()
    # The new page shows the new keyframes only: the old keyframe's picture is gone from page/.
    assert sorted(p.name for p in (out / "page").glob("keyframe_*")) == [
        "keyframe_00000.png",
        "keyframe_00003.png",
    ]
    assert report["page"] == str(out / "index.html") and (out / "index.html").read_text() != first


def test_no_output_may_take_the_page_or_its_folder(tmp_path: Path) -> None:
    scene = tmp_path / "scene.yaml"
    scene.write_text(SCENE + "outputs: [out.mp4, page/, page/x.gif]\n")
    with pytest.raises(SceneError) as exc:
        check_outputs(load_scene(scene), tmp_path / "out")
    assert [str(p) for p in exc.value.problems] == [
        f"{scene}:11:20: output 'page/' would be written over by the render page (index.html and its page/ "
        "folder in the output folder); choose another path",
        f"{scene}:11:27: output 'page/x.gif' would be written over by the render page (index.html and its "
        "page/ folder in the output folder); choose another path",
    ]


def test_the_contact_sheet_shows_the_keyframes_or_frames_evenly_spaced() -> None:
    assert sheet_frames([0, 4, 7], 8) == [0, 4, 7]
    assert sheet_frames([], 5) == [0, 1, 2, 3, 4]  # a grid or a walk: no keyframes
    spread = sheet_frames([], 1000)
    assert len(spread) == MAX_THUMBS and spread[0] == 0 and spread[-1] == 999
    many = list(range(0, 2000, 10))
    assert sheet_frames(many, 2000)[:3] == [0, 60, 130] and len(sheet_frames(many, 2000)) == MAX_THUMBS
