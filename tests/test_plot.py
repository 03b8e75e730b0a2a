"""``--plot``: the values plot, written like ``--plan`` runs: no model loaded, torch never imported,
nothing else written (no cache, no render folder)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import pipeline
from pipeline.outputs.plot import plot_values

ROOT = Path(__file__).resolve().parent.parent

SCENE = """\
model: tiny
size: [32, 32]
steps: 2
noise: travel
loras: [{path: style.safetensors, name: style, scale: 0}]
keyframes:
  - {frame: 0, prompt: a dog, guidance: 7, seed: 1}
  - {frame: 4, prompt: a cat, guidance: 5, seed: 2, lora: {style: 1}}
"""

WRAPPER = """\
import sys
from pipeline.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    print('EXIT', e.code)
print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')
"""


@pytest.fixture
def scene(tmp_path: Path) -> Path:
    import shutil

    folder = tmp_path / "s"
    folder.mkdir()
    shutil.copy(ROOT / "scenes" / "inputs" / "style_tiny.safetensors", folder / "style.safetensors")
    path = folder / "plot.yaml"
    path.write_text(SCENE)
    return path


def test_the_values_are_the_recipes(scene: Path, tmp_path: Path) -> None:
    values = plot_values(pipeline.open(scene, cache_dir=tmp_path / "cache").plan())
    assert values == {
        "prompt_t": [0.0, 0.25, 0.5, 0.75, 0.0],
        "noise_t": [0.0, 0.25, 0.5, 0.75, 0.0],
        "guidance": [7.0, 6.5, 6.0, 5.5, 5.0],
        "lora:style": [0.0, 0.25, 0.5, 0.75, 1.0],
    }


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WRAPPER, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_plot_writes_the_plot_alone_without_torch(scene: Path, tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"values{suffix}"
    result = _cli(scene, "--plot", out, "--cache-dir", tmp_path / "cache")
    lines = result.stdout.splitlines()
    assert lines == [f"values plot: {out} (prompt_t, noise_t, guidance, lora:style)", "EXIT 0", "NO-TORCH"]
    assert not (tmp_path / "cache").exists() and not (scene.parent / "renders").exists()
    if suffix == ".png":
        from PIL import Image

        with Image.open(out) as image:
            assert image.format == "PNG" and image.width == 800
    else:
        text = out.read_text()
        assert text.startswith("<?xml") and "<svg" in text
        # Text stays text (svg.fonttype none): the panels are named, the still values listed.
        assert ">guidance<" in text and ">lora:style<" in text and ">prompt mix t<" in text


def test_plot_needs_a_png_or_svg_name(scene: Path, tmp_path: Path) -> None:
    result = _cli(scene, "--plot", tmp_path / "values.txt", "--cache-dir", tmp_path / "cache")
    assert result.stdout.split() == ["EXIT", "2", "NO-TORCH"]
    assert "--plot: " in result.stderr and "end it in .png or .svg" in result.stderr
    assert not (tmp_path / "values.txt").exists()
