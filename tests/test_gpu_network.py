"""Tests that need what CI does not have: a CUDA GPU (``gpu``) or a model download (``network``).

They are collected everywhere and skipped unless CUDA is available or SD_SCENES_NETWORK=1 is set, so a
user with a GPU or a network connection can run the same suite: ``pytest -m gpu`` / ``-m network``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import run_render

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.gpu
def test_dog_cat_renders_on_cuda_in_float16(tmp_path: Path) -> None:
    shutil.copy(ROOT / "scenes" / "dog_cat.yaml", tmp_path / "dog_cat.yaml")
    report = run_render(tmp_path / "dog_cat.yaml", tmp_path / "cache", "--device", "cuda")
    assert (report["device"], report["dtype"]) == ("cuda", "float16")
    assert report["rendered"] == report["frames"] == 64
    again = run_render(tmp_path / "dog_cat.yaml", tmp_path / "cache", "--device", "cuda")
    assert again["rendered"] == 0


@pytest.mark.network
def test_a_hugging_face_model_by_id(tmp_path: Path) -> None:
    scene = tmp_path / "hub.yaml"
    scene.write_text(
        "model: hf-internal-testing/tiny-stable-diffusion-pipe\nsize: [32, 32]\nsteps: 2\n"
        "keyframes:\n  - {frame: 0, prompt: a dog}\n  - {frame: 2, prompt: a cat}\noutputs: [out.gif]\n"
    )
    report = run_render(scene, tmp_path / "cache", "--device", "cpu")
    assert report["rendered"] == 3
