"""Previews (``--frames``, ``--frame``, ``--draft``): the same keys as the scene's plan (a draft: its
own), and only files under ``preview/``: never a final output, a record or a ``previous/`` folder.

Renders use the embedded ``tiny`` model at 32x32 with 2 steps; a counting renderer wraps the real one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

import pipeline
from pipeline.app import InputError
from pipeline.cli import app as cli_app
from pipeline.outputs.preview import Draft, label, needed_jobs, parse_frames
from pipeline.store.cache import CacheDir
from tests.conftest import CountingRenderer as Counting

SCENE = """\
model: tiny
size: [32, 32]
steps: 2
keyframes:
  - {frame: 0, prompt: a dog in a field}
  - {frame: 9, prompt: a cat in a field}
outputs: [out.gif]
"""

FEEDBACK = """\
model: tiny
size: [32, 32]
steps: 2
mode: feedback
strength: 0.5
keyframes:
  - {frame: 0, prompt: a dog in a field}
  - {frame: 5, prompt: a cat in a field}
outputs: [out.gif]
"""


def _scene(tmp_path: Path, text: str = SCENE) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


def _open(path: Path, **kw: Any) -> pipeline.Session:
    return pipeline.open(path, cache_dir=path.parent / "cache", device="cpu", **kw)


def _files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (the cache left out) with its inode and mtime."""
    return {
        str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file() and "cache" not in p.relative_to(root).parts
    }


def _cached_keys(path: Path) -> set[str]:
    with CacheDir.open(path.parent / "cache") as cache:
        return set(cache.frames.keys())


def test_frames_are_a_python_slice_of_the_scene_frames() -> None:
    assert parse_frames("0:64:8", 48) == [0, 8, 16, 24, 32, 40]
    assert parse_frames("::-16", 48) == [47, 31, 15]
    assert parse_frames("-3:", 48) == [45, 46, 47]
    assert parse_frames("12", 48) == [12]
    assert parse_frames("-1", 48) == [47]
    for bad, why in [
        ("1:9:0", "the step cannot be 0"),
        ("48", "48 is beyond the end; the scene has 48 frames (0 to 47)"),
        ("50:60", "selects no frame of the 48"),
        ("a:b", "is not a frame range"),
        ("1:2:3:4", "has 3 colons"),
        ("", "is empty"),
    ]:
        with pytest.raises(ValueError, match=re.escape(why)):
            parse_frames(bad, 48)


def test_a_preview_is_named_after_what_it_shows() -> None:
    assert label([0, 8, 16], 64, None) == "frames_0-16_step8"
    assert label([3, 4, 5], 64, None) == "frames_3-5"
    assert label([12], 64, None) == "frame_12"
    assert label([1, 5, 6], 64, None) == "frames_1_5_6"
    assert label(list(range(64)), 64, None) == "all"


def test_a_preview_renders_its_frames_only_and_writes_nothing_but_previews(tmp_path: Path) -> None:
    path = _scene(tmp_path)
    session = _open(path)
    plan_keys = [j.key for j in session.plan()]
    counting = Counting()
    sheet = tmp_path / "renders" / "s" / "preview" / "s_frames_2-7_step5.png"
    seen: list[tuple[str, bool]] = []  # (key just stored, whether the sheet was on disk then)
    report = session.render(
        frames=[2, 7],
        renderer=counting,
        progress=lambda p: seen.extend((key, sheet.exists()) for key in p.keys),
    )
    # The contact sheet is written as frames finish, before the render ends.
    assert seen == [(plan_keys[2], True), (plan_keys[7], True)]

    # The preview's frames are the plan's frames 2 and 7, and nothing else was made or stored.
    assert counting.keys == [plan_keys[2], plan_keys[7]]
    assert _cached_keys(path) == {plan_keys[2], plan_keys[7]}
    preview = tmp_path / "renders" / "s" / "preview"
    assert report.shown == [2, 7]
    assert report.outputs == [
        str(preview / "s_frames_2-7_step5.png"),
        str(preview / "s_frames_2-7_step5.gif"),
    ]
    assert report.record == [] and report.previous is None
    assert sorted(_files(tmp_path)) == [
        "renders/s/preview/s_frames_2-7_step5.gif",
        "renders/s/preview/s_frames_2-7_step5.png",
        "s.yaml",
    ]
    with Image.open(preview / "s_frames_2-7_step5.gif") as gif:
        assert gif.n_frames == 2
    with Image.open(sheet) as image:
        assert image.size == (2 * 32 + 2, 32)  # two cells side by side, 2 px apart

    # The final render finds those two frames cached: they are the same keys.
    final = _open(path).render(renderer=(counting := Counting()))
    assert (final.rendered, final.cached) == (8, 2)
    assert sorted(counting.keys) == sorted(k for i, k in enumerate(plan_keys) if i not in (2, 7))
    finals = {k: v for k, v in _files(tmp_path).items() if "preview" not in k}

    # A preview after it renders nothing and leaves every final output and the record as they were.
    again = _open(path).render(frames=parse_frames("0:10:3", 10), renderer=(counting := Counting()))
    assert counting.keys == [] and (again.rendered, again.cached) == (0, 4)
    assert {k: v for k, v in _files(tmp_path).items() if "preview" not in k} == finals
    assert not (tmp_path / "renders" / "s" / "previous").exists()
    assert _cached_keys(path) == set(plan_keys)


def test_a_feedback_preview_renders_the_chain_up_to_its_frame(tmp_path: Path) -> None:
    path = _scene(tmp_path, FEEDBACK)
    session = _open(path)
    plan = session.plan()
    keys = [j.key for j in plan]
    assert [j.frame for j in needed_jobs(plan, [3])] == [0, 1, 2, 3]
    counting = Counting()
    report = session.render(frames=[3], renderer=counting)
    assert counting.keys == keys[:4]  # each frame starts from the one before it
    assert _cached_keys(path) == set(keys[:4])
    assert any("3 earlier frames of the chains" in note for note in report.notes)
    sheet = tmp_path / "renders" / "s" / "preview" / "s_frame_3.png"
    assert report.outputs == [str(sheet)]
    with Image.open(sheet) as image:
        assert image.size == (32, 32)  # one frame at its own size


def test_a_draft_is_another_scene_with_its_own_keys(tmp_path: Path) -> None:
    path = _scene(tmp_path)
    final_keys = [j.key for j in _open(path).plan()]
    draft = _open(path, draft=Draft())
    assert draft.scene is not None and (draft.scene.size, draft.scene.steps) == ([16, 16], 1)
    draft_keys = [j.key for j in draft.plan()]
    assert not set(draft_keys) & set(final_keys)
    report = draft.render(renderer=(counting := Counting()))
    assert counting.keys == draft_keys
    assert report.outputs[0].endswith("renders/s/preview/s_draft_16x16_1steps_all.png")
    assert sorted(_files(tmp_path)) == [
        "renders/s/preview/s_draft_16x16_1steps_all.gif",
        "renders/s/preview/s_draft_16x16_1steps_all.png",
        "s.yaml",
    ]
    # The final plan is untouched: the same keys, none of them cached by the draft.
    final = _open(path)
    assert [j.key for j in final.plan()] == final_keys
    assert {f.status for f in final.status()} == {"not rendered yet"}
    sized = _open(path, draft=Draft(steps=2, width=24, height=8))
    assert sized.scene is not None and (sized.scene.size, sized.scene.steps) == ([24, 8], 2)


def test_bad_preview_options_are_located_and_nothing_is_written(tmp_path: Path) -> None:
    path = _scene(tmp_path)
    runner = CliRunner()
    cases = [
        (["--frames", "5:5"], "--frames: '5:5' selects no frame of the 10 (frames 0 to 9)"),
        (["--frames", "0:9:0"], "--frames: '0:9:0': the step cannot be 0"),
        (["--frame", "10"], "--frame: 10 is beyond the end; the scene has 10 frames (0 to 9)"),
        (["--frame", "1", "--frames", "0:4"], "--frames and --frame: give one or the other"),
        (["--draft-size", "20x16"], "--draft-size: width 20 is not allowed; use a multiple of 8"),
        (["--draft-size", "big"], "--draft-size: 'big' is not a size; use WIDTHxHEIGHT"),
        (["--draft-steps", "0"], "--draft-steps: 0 is not allowed"),
        (["--watch", "--plan"], "--watch renders again on every save; it does not go with --plan"),
    ]
    for args, message in cases:
        result = runner.invoke(cli_app, ["render", str(path), "--cache-dir", str(tmp_path / "cache"), *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
    assert sorted(_files(tmp_path)) == ["s.yaml"] and not (tmp_path / "cache").exists()
    with pytest.raises(InputError, match="--frame: -11 is beyond the end"):
        _open(path).render(frames=[-11])
