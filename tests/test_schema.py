"""Editor support: the scene format's JSON Schema (``render.py schema``, ``scenes/scene.schema.json``).

The file in the repository must be the one the models make (regenerate it with
``python render.py schema > scenes/scene.schema.json``), every example scene must point at it on its
second line, and every example must be valid under it while typical mistakes are not.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.scene.editor_schema import MODELINE, scene_schema, schema_text

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = ROOT / "scenes" / "scene.schema.json"
EXAMPLES = sorted((ROOT / "scenes").glob("*.yaml"))

jsonschema = pytest.importorskip("jsonschema")


@pytest.fixture(scope="module")
def validator() -> object:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_the_schema_file_is_the_one_the_models_make() -> None:
    assert SCHEMA_PATH.read_text() == schema_text(), (
        "scenes/scene.schema.json is out of date: python render.py schema > scenes/scene.schema.json"
    )


def test_render_py_schema_prints_it() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "schema"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout == SCHEMA_PATH.read_text()


def test_every_key_has_a_description() -> None:
    schema = scene_schema()
    models = {"Scene": schema, **schema["$defs"]}
    missing = [
        f"{name}.{key}"
        for name, model in models.items()
        for key, prop in model["properties"].items()
        if not prop.get("description")
    ]
    assert missing == []


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_points_at_the_schema_and_is_valid(path: Path, validator: object) -> None:
    lines = path.read_text().splitlines()
    assert lines[0].startswith(f"# {path.name}:")
    assert lines[1] == MODELINE
    errors = [e.message for e in validator.iter_errors(yaml.safe_load(path.read_text()))]  # type: ignore[attr-defined]
    assert errors == []


@pytest.mark.parametrize(
    ("text", "wrong"),
    [
        ("keyframes: [{frame: 0, promtp: a}]", "'promtp' was unexpected"),
        ("scheduler: dpm++\nkeyframes: [{frame: 0, prompt: a}]", "'dpm++'"),
        ("curve: ease_in_blah\nkeyframes: [{frame: 0, prompt: a}]", "'ease_in_blah'"),
        ("keyframes: [{frame: 2.5, prompt: a}]", "2.5"),
        ("size: [64, 64, 3]\nkeyframes: [{frame: 0, prompt: a}]", "too long"),
        ("mode: img3img\nkeyframes: [{frame: 0, prompt: a}]", "'img3img'"),
        ("grid: {prompts: [a, b, c]}", "too short"),
    ],
)
def test_mistakes_are_invalid(text: str, wrong: str, validator: object) -> None:
    found = validator.iter_errors(yaml.safe_load(text))  # type: ignore[attr-defined]
    # An error inside an anyOf (null or a grid) says why in its context.
    errors = [m for e in found for m in [e.message, *(c.message for c in e.context)]]
    assert any(wrong in e for e in errors), errors


def test_the_shorthands_the_loader_takes_are_valid(validator: object) -> None:
    text = """
noise: travel
duration: 2.5s
curve: cubic_bezier(0.4, 0, 0.2, 1)
keyframes:
  - {frame: 0, prompt: "a dog", seed: 1}
  - {frame: 1.5s, prompt: [{text: a cat, weight: 2}, {text: a fox}], seed: 2, lora: {style: 0.5}}
outputs: [a.mp4, frames/, {path: b.gif, rubber_band: true}]
"""
    assert [e.message for e in validator.iter_errors(yaml.safe_load(text))] == []  # type: ignore[attr-defined]
