"""``render.py import``: Parseq exports and Deforum settings files become scenes that plan and render.

The fixtures in tests/fixtures/ are small files in the tools' public formats: a Parseq export
(``meta``, ``options``, ``prompts``, ``keyframes``, ``rendered_frames`` with ``_delta``/``_pc``
fields and ``deforum_prompt``) and a Deforum settings file (``prompts``, schedule strings, ``W``,
``H``, ``fps``, ``max_frames``...). The imported scenes render with the tiny model at 32 px, 2 steps.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import pipeline
from pipeline.scene.importer import convert
from pipeline.scene.load import parse_scene

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def run_import(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "import", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def imported(tmp_path: Path, fixture: str) -> Path:
    """The fixture imported through the CLI, beside its copy in tmp_path."""
    source = tmp_path / fixture
    shutil.copy(FIXTURES / fixture, source)
    done = run_import(fixture, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    scene = source.with_suffix(".yaml")
    assert done.stdout == f"wrote {scene.name}\n"
    return scene


def small(scene: Path, steps: int = 2) -> dict:
    """The imported scene at 32x32 px and few steps (the fixtures name real sizes)."""
    data = yaml.safe_load(scene.read_text())
    data.update(size=[32, 32], steps=steps)
    return data


def test_a_parseq_export_becomes_a_scene_that_renders(tmp_path: Path) -> None:
    scene = imported(tmp_path, "parseq_export.json")
    text = scene.read_text()
    assert "#  - values that change and that a scene has no place for: rotation_3d_x" in text
    data = yaml.safe_load(text)
    assert (data["fps"], data["frames"], data["mode"], data["seed"]) == (12, 8, "feedback", 42)
    # Parseq's scale is guidance, written where it bends; its strength is kept, ours is changed.
    assert data["guidance"] == "0:(7), 4:(9), 7:(8.25)"
    assert data["strength"] == 0.35
    # Motion is per frame, from Parseq's deltas (as Deforum reads them by default).
    assert data["translate_x"] == "0:(0), 1:(2), 7:(2)"
    assert data["keyframes"][0] == {"frame": 0, "prompt": "A lighthouse on a cliff, storm", "hold": True}
    assert data["keyframes"][1]["prompt"] == [
        {"text": "A lighthouse on a cliff, storm", "weight": 0.5},
        {"text": "A lighthouse at dawn", "weight": 0.5},
    ]
    session = pipeline.open(
        small(scene), base_dir=tmp_path, name="parseq", cache_dir=tmp_path / "cache", device="cpu"
    )
    plan = session.plan()
    assert [j.recipe["scalars"]["guidance"] for j in plan] == [7.0, 7.5, 8.0, 8.5, 9.0, 8.75, 8.5, 8.25]
    # The prompt holds until the next one starts, as Parseq's prompts switch at their frame.
    assert plan[3].recipe["cond"] == plan[0].recipe["cond"]
    report = session.render()
    assert (report.frames, report.rendered) == (8, 8)


def test_a_deforum_settings_file_becomes_a_scene_that_renders(tmp_path: Path) -> None:
    scene = imported(tmp_path, "deforum_settings.txt")
    data = yaml.safe_load(scene.read_text())
    assert (data["size"], data["steps"], data["fps"], data["frames"]) == ([512, 512], 20, 15, 10)
    assert (data["scheduler"], data["seed"], data["noise"]) == ("euler_ancestral", 1234, "per_frame")
    assert data["strength"] == "0:(0.35), 8:(0.5)"  # Deforum's strength_schedule 0.65 -> 0.5, kept
    assert data["prompt_suffix"] == "highly detailed"
    assert data["negative_prompt"] == "photo nsfw"
    assert [k["frame"] for k in data["keyframes"]] == [0, 6]
    notes = scene.read_text().split("# Not carried over:")[1].split("\nsize")[0]
    assert "color_coherence: LAB" in notes and "translation_z" not in notes  # 2D mode ignores z
    # 4 steps: at strength 0.35 euler_ancestral has at least one step to take (2 x 0.35 rounds to 0).
    session = pipeline.open(
        small(scene, steps=4), base_dir=tmp_path, name="deforum", cache_dir=tmp_path / "cache", device="cpu"
    )
    plan = session.plan()
    zoom = [j.recipe["scalars"]["zoom"] for j in plan]
    assert zoom == pytest.approx([1.0 + 0.01 * math.sin(2 * 3.14 * t / 10) for t in range(10)], abs=1e-9)
    assert [j.recipe["scalars"]["strength"] for j in plan][::4] == [0.35, pytest.approx(0.425), 0.5]
    report = session.render()
    assert (report.frames, report.rendered) == (10, 10)


def test_an_imported_scene_loads_as_it_is(tmp_path: Path) -> None:
    for fixture in ("parseq_export.json", "deforum_settings.txt"):
        text, _ = convert(FIXTURES / fixture)
        parse_scene(text, "imported.yaml", base_path=tmp_path / "imported.yaml")


@pytest.mark.parametrize(
    ("content", "where", "words"),
    [
        ('{"keyframes": [1, 2]}\n', "1:1", "a JSON object with neither 'rendered_frames' nor 'prompts'"),
        ("[1, 2]\n", "1:1", "JSON list with neither"),
        ("keyframes:\n  - {frame: 0, prompt: a dog}\n", "1:1", "not JSON (Expecting value)"),
        ('{"prompts": {"0": "a"},\n "W": 512,,\n}\n', "2:11", "not JSON (Expecting property name"),
        (
            '{"rendered_frames": [{"zoom": 1}]}\n',
            "1:2",
            "rendered_frames holds no frames with a 'frame' number",
        ),
        ('{"max_frames": 10,\n  "prompts": "a dog"}\n', "2:3", "the prompts are not a mapping of frames"),
    ],
)
def test_a_file_of_another_format_is_a_located_exit_2_and_writes_nothing(
    tmp_path: Path, content: str, where: str, words: str
) -> None:
    (tmp_path / "in.json").write_text(content)
    done = run_import("in.json", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith(f"in.json:{where}: ") and words in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.json"]


def test_a_missing_file_or_a_folder_is_a_located_exit_2(tmp_path: Path) -> None:
    done = run_import("missing.json", cwd=tmp_path)
    assert (done.returncode, done.stderr.split(";")[0]) == (2, "missing.json:1:1: not found")
    (tmp_path / "folder").mkdir()
    done = run_import("folder", cwd=tmp_path)
    assert (done.returncode, done.stderr.split(";")[0]) == (2, "folder:1:1: not a regular file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_an_existing_scene_is_not_replaced_without_overwrite(tmp_path: Path) -> None:
    shutil.copy(FIXTURES / "deforum_settings.txt", tmp_path)
    (tmp_path / "deforum_settings.yaml").write_text("mine\n")
    done = run_import("deforum_settings.txt", cwd=tmp_path)
    assert done.returncode == 2 and "already exists; pass --overwrite" in done.stderr
    assert (tmp_path / "deforum_settings.yaml").read_text() == "mine\n"
    assert run_import("deforum_settings.txt", "--overwrite", cwd=tmp_path).returncode == 0
    assert (tmp_path / "deforum_settings.yaml").read_text().startswith("# Imported from the Deforum settings")
