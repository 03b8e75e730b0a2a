"""Outputs that cannot all be written correctly are refused before anything loads, renders or is written.

Found as silent wrong output: ``outputs: [f/, f/frame_00000.png]`` let the grid image overwrite frame 0 of
the folder (both said ``written``), and a 300-character output name rendered every frame for minutes
before failing with ``File name too long``. Each case runs the real CLI in a child process that reports
whether torch, diffusers or transformers were imported: exit 2, ``FILE:LINE:COL`` at the output's line,
no traceback, no cache and no render folder. The name-length bound is also checked from the other side:
the longest name it allows is really written.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import run_render
from tests.reliability._helpers_inputs import cli_probe

SCENE = """\
model: tiny
size: [32, 32]
steps: 2
frames: 2
keyframes:
  - {{frame: 0, prompt: a dog}}
  - {{frame: 1, prompt: a cat}}
outputs: {outputs}
"""


def write(folder: Path, outputs: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    scene = folder / "scene.yaml"
    scene.write_text(SCENE.format(outputs=outputs))
    return scene


def rejected(scene: Path, tmp_path: Path) -> list[str]:
    """Render ``scene`` in a child process: exit 2, nothing imported or written; the stderr lines."""
    before = sorted(scene.parent.rglob("*"))
    code, heavy, stdout, stderr = cli_probe(str(scene), "--cache-dir", str(tmp_path / "cache"))
    assert code == 2, stderr
    assert heavy == [], f"imported {heavy} before refusing the outputs"
    assert "Traceback" not in stdout + stderr
    assert stdout == ""
    assert not (tmp_path / "cache").exists()
    assert sorted(scene.parent.rglob("*")) == before  # no render folder, no partial file
    return stderr.splitlines()


def test_a_grid_image_inside_a_frames_folder_is_refused(tmp_path: Path) -> None:
    scene = write(tmp_path / "s", "[f/, f/frame_00000.png]")
    assert rejected(scene, tmp_path) == [
        f"{scene}:8:15: output 2 'f/frame_00000.png' lies inside output 1 'f/', so one would overwrite "
        "the other; give each output its own path, none inside another output's folder"
    ]


def test_an_output_name_too_long_with_its_temporary_suffix_is_refused_before_rendering(
    tmp_path: Path,
) -> None:
    name = "n" * 296 + ".gif"
    scene = write(tmp_path / "s", f"[ok.gif, {name}]")
    assert rejected(scene, tmp_path) == [
        f"{scene}:8:19: output 2 cannot be written: 'nnnnnnnnnnnnnnnnnnnnnnnnnnnnnn...nnnnnnnnnnnnnnnnnnnnnnnnnn.gif' "
        "is 300 bytes long; this file system allows 255 per name"
    ]


@pytest.mark.skipif(
    not hasattr(os, "pathconf") or os.pathconf("/tmp", "PC_NAME_MAX") != 255, reason="needs NAME_MAX 255"
)
def test_the_longest_name_allowed_is_really_written(tmp_path: Path) -> None:
    # 255 bytes per name, less the temporary name's '.' + '.partial-' + a 10-digit pid + '-' + 8 hex + '.gif'.
    longest = "m" * (255 - 33 - 4) + ".gif"
    scene = write(tmp_path / "s", f"[{longest}, frames_{'f' * 200}/]")
    report = run_render(scene, tmp_path / "cache")
    out = tmp_path / "s" / "renders" / "scene"
    assert set(report["output_status"].values()) == {"written"}
    assert (out / longest).stat().st_size > 0
    assert sorted(p.name for p in (out / f"frames_{'f' * 200}").iterdir()) == [
        "frame_00000.png",
        "frame_00001.png",
    ]
    assert not [p for p in out.rglob("*.partial-*")]
