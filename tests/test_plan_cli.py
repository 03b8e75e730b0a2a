"""Tests for ``render.py SCENE --plan``: the table, the JSON, no cache created, no torch, and why not cached."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.plan.history import frame_status, load_plan, save_plan
from pipeline.plan.planner import plan
from pipeline.scene.load import load_scene
from pipeline.store.cache import CacheDir

ROOT = Path(__file__).resolve().parents[1]
SCENE = "scenes/dog_cat.yaml"
FRAMES = 64  # dog_cat: keyframes at 0 and 63


def render(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "render.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def plan_json(tmp_path_factory) -> tuple[list[dict[str, object]], Path]:
    cache = tmp_path_factory.mktemp("plan-json") / "cache"
    out = render(SCENE, "--plan", "--json", "--cache-dir", str(cache))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout), cache


def test_plan_json_has_one_object_per_frame(plan_json):
    rows, _ = plan_json
    assert isinstance(rows, list)
    assert [r["frame"] for r in rows] == list(range(FRAMES))
    for r in rows:
        assert re.fullmatch(r"[0-9a-f]{64}", str(r["key"]))
        assert r["cached"] is False
        assert r["status"] == "not rendered yet"
    assert len({r["key"] for r in rows}) == FRAMES
    assert rows[0]["cond"].keys() == {"a"}
    assert rows[63]["cond"].keys() == {"a"}
    assert rows[31]["cond"]["method"] == "slerp"
    assert rows[0]["noise"] == {"seed": 42}
    assert rows[0]["scalars"] == {"guidance": 7.0}


def test_plan_does_not_create_the_cache(plan_json):
    _, cache = plan_json
    assert not cache.exists()


def test_plan_table_mentions_every_frame(tmp_path, plan_json):
    rows, _ = plan_json
    out = render(SCENE, "--plan", "--cache-dir", str(tmp_path / "cache"))
    assert out.returncode == 0, out.stderr
    assert "64 frames" in out.stdout
    frames = {}
    for line in out.stdout.splitlines():
        m = re.match(r"^\s*(\d+)\s+([0-9a-f]{12})\s", line)
        if m:
            frames[int(m.group(1))] = m.group(2)
    assert frames == {r["frame"]: str(r["key"])[:12] for r in rows}
    assert out.stdout.count("not rendered yet") == FRAMES
    assert "0 cached, 64 to render" in out.stdout
    assert not (tmp_path / "cache").exists()


def test_plan_works_without_torch(tmp_path):
    cache = tmp_path / "cache"
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        from pipeline.cli import main
        code = 0
        try:
            main([{SCENE!r}, "--plan", "--cache-dir", {str(cache)!r}])
        except SystemExit as exc:
            code = exc.code or 0
        loaded = [m for m in ("torch", "diffusers", "transformers") if sys.modules.get(m) is not None]
        print("MARKER", code, loaded, "diffusers" in sys.modules, "transformers" in sys.modules)
        sys.exit(code)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "MARKER 0 [] False False" in out.stdout
    assert "0 cached, 64 to render" in out.stdout
    assert not cache.exists()


def test_plan_of_a_bad_scene_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("keyframes:\n  - {frame: 0, prompt: a dog, guidance: lots}\n")
    out = render(str(bad), "--plan", "--cache-dir", str(tmp_path / "cache"))
    assert out.returncode == 2
    assert "bad.yaml:2:" in out.stderr


# -- why a frame is not cached --------------------------------------------------------------------

SMALL = """\
model: tiny
size: [64, 64]
steps: 2
guidance: 7.0
seed: 5
keyframes:
  - {frame: 0, prompt: a dog}
  - {frame: 4, prompt: a bird}
  - {frame: 8, prompt: LAST, curve: ease_in_out_sine}
"""


def _plan_of(path: Path, make_env):
    return plan(load_scene(path), make_env())


def test_frame_status_names_the_changed_prompt(tmp_path, make_env):
    scene = tmp_path / "small.yaml"
    scene.write_text(SMALL.replace("LAST", "a cat"))
    first = _plan_of(scene, make_env)
    with CacheDir(tmp_path / "cache") as cache:
        assert load_plan(cache.records, scene) is None
        assert frame_status(first, None, set()) == ["not rendered yet"] * 9
        save_plan(cache.records, scene, first)
        # Frames 0 and 1 were rendered: they are in the frame store.
        for job in first[:2]:
            cache.frames.put(job.key, b"dummy png bytes")

        scene.write_text(SMALL.replace("LAST", "a cow"))
        second = _plan_of(scene, make_env)
        previous = load_plan(cache.records, scene)
        assert previous is not None
        cached = cache.frames.present([j.key for j in second])
        status = frame_status(second, previous, cached)

    # Keyframe 8's prompt decides frames 5..8; frames 0..4 keep their keys.
    assert [a.key == b.key for a, b in zip(first, second, strict=True)] == [True] * 5 + [False] * 4
    assert status == ["cached", "cached"] + ["not rendered yet"] * 3 + ["changed: prompt"] * 4


def test_frame_status_base_change_and_new_frames(tmp_path, make_env):
    scene = tmp_path / "small.yaml"
    scene.write_text(SMALL.replace("LAST", "a cat"))
    first = _plan_of(scene, make_env)
    with CacheDir(tmp_path / "cache") as cache:
        save_plan(cache.records, scene, first)
        scene.write_text(SMALL.replace("LAST", "a cat").replace("steps: 2", "steps: 3") + "frames: 11\n")
        second = _plan_of(scene, make_env)
        status = frame_status(second, load_plan(cache.records, scene), set())
    assert status == ["changed: steps"] * 9 + ["new frame"] * 2


def test_plan_cli_reports_cached_and_changed_frames(tmp_path):
    # The CLI's own environment (embedded model, auto device) makes the keys; record that plan.
    from pipeline.render.environment import resolve_env

    scene = tmp_path / "small.yaml"
    scene.write_text(SMALL.replace("LAST", "a cat"))
    cache_dir = tmp_path / "cache"
    first = plan(load_scene(scene), resolve_env(load_scene(scene)))
    with CacheDir(cache_dir) as cache:
        save_plan(cache.records, scene, first)
        cache.frames.put(first[0].key, b"dummy png bytes")
    scene.write_text(SMALL.replace("LAST", "a cow"))

    out = render(str(scene), "--plan", "--json", "--cache-dir", str(cache_dir))
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["cached"] for r in rows] == [True] + [False] * 8
    assert [r["status"] for r in rows] == ["cached"] + ["not rendered yet"] * 4 + ["changed: prompt"] * 4
