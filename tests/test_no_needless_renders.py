"""Edits that cannot change a pixel render nothing: one real render, then the edited scene renders 0.

Each edit here used to re-render frames (issue 10, item 8): a prompt, negative prompt or travel seed
restated where it is already in force (an a -> a blend), ``scheduler: pndm`` on a model whose own
scheduler is that PNDM, and a re-indented ``model_index.json``. tests/test_keys.py checks each one's
keys alone; this renders them for real.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.render.modelfiles import EMBEDDED_DIR
from tests.conftest import run_render

BEFORE = """
model: models/mine
size: [32, 32]
steps: 2
noise: travel
negative_prompt: blurry
frames: 6
keyframes:
  - {frame: 0, prompt: a dog, seed: 3}
  - {frame: 3, prompt: a cat}
outputs: [f/]
"""
AFTER = """
model: models/mine
scheduler: pndm
size: [32, 32]
steps: 2
noise: travel
negative_prompt: blurry
frames: 6
keyframes:
  - {frame: 0, prompt: a dog, seed: 3}
  - {frame: 3, prompt: a cat, seed: 3}
  - {frame: 5, prompt: [{text: a cat, weight: 2}], negative_prompt: blurry, seed: 3}
outputs: [f/]
"""


def test_restating_what_is_in_force_renders_nothing(tmp_path: Path) -> None:
    model = tmp_path / "models" / "mine"
    shutil.copytree(EMBEDDED_DIR / "tiny", model)
    scheduler = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["_class_name"], scheduler["skip_prk_steps"]) == ("PNDMScheduler", True)
    scene = tmp_path / "scene.yaml"
    scene.write_text(BEFORE)
    first = run_render(scene, tmp_path / "cache")
    assert first["rendered"] == 6

    scene.write_text(AFTER)
    index = model / "model_index.json"
    index.write_text(json.dumps(json.loads(index.read_text()), indent=4) + "\n")  # layout only
    again = run_render(scene, tmp_path / "cache")
    assert (again["rendered"], again["cached"]) == (0, 6)
