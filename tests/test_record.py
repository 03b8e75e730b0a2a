"""The record a render leaves beside its outputs (``pipeline.outputs.record``): the resolved scene, the
per-frame table (JSON, CSV), an SRT per MP4, PNG text chunks, the MP4 comment, and previous outputs
kept on a re-render.

Frames come from an injected flat-colour renderer (no torch): what is tested is the record, and the
keys it must never change.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

import pipeline
from pipeline.outputs.record import frame_rows, scene_yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "scenes").glob("*.yaml"))

SCENE = """\
model: tiny
size: [32, 32]
steps: 2
seed: 5
fps: 4
noise: travel
keyframes:
  - {frame: 0, prompt: [{text: "a dog", weight: 2}, {text: "a wolf"}], seed: 7}
  - {frame: 1s, prompt: "a cat", guidance: 5, seed: 9, curve: ease_in_quad}
  - {frame: 5, prompt: "a cat", negative_prompt: "blurry"}
outputs: [out.mp4, {path: band.mp4, rubber_band: true}, frames/]
"""


class Flat:
    """Frames of one colour per key: enough for outputs, with no model."""

    encoded = 0

    def render_batch(self, jobs: list[Any]) -> list[bytes]:
        from PIL import Image

        out = []
        for job in jobs:
            buf = io.BytesIO()
            colour = tuple(bytes.fromhex(job.key[:6]))
            Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
            out.append(buf.getvalue())
        return out


def _keys(session: Any) -> list[str]:
    return [job.key for job in session.plan()]


def _round_trip(session: Any) -> Any:
    """The resolved scene, read back as a scene in the original scene's folder."""
    scene = session.scene
    return pipeline.open(
        scene_yaml(scene), base_dir=scene.base_dir, name=scene.name, cache_dir=session.cache_dir
    )


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_round_trips_through_its_resolved_scene(path: Path, tmp_path: Path) -> None:
    session = pipeline.open(path, cache_dir=tmp_path / "cache")
    assert session.problems == []
    again = _round_trip(session)
    assert again.problems == []
    assert _keys(again) == _keys(session)


@pytest.mark.parametrize(
    "text",
    [
        SCENE,
        # A value first set by a keyframe has no value at frame 0: writing the default would ease from it.
        "keyframes:\n  - {frame: 0, prompt: a}\n  - {frame: 4, guidance: 5, zoom: 2}\n"
        "  - {frame: 8, guidance: 9, negative_prompt: ugly}\nsize: [64, 64]\n",
        # A LoRA scale never written but keyframed; a duration in seconds.
        "loras: [{path: inputs/style_tiny.safetensors, name: style}]\nduration: 2.5s\nfps: 4\n"
        "keyframes:\n  - {frame: 0, prompt: a}\n  - {frame: 6, lora: {style: 0.5}}\n",
        # Travel seeds with no top-level seed.
        "noise: {kind: travel}\nkeyframes:\n  - {frame: 2, prompt: a, seed: 4}\n  - {frame: 6, seed: 8}\n",
    ],
    ids=["blend-seconds-travel", "unwritten-top-level", "lora-duration", "travel-no-seed"],
)
def test_resolved_scene_keeps_values_that_only_keyframes_set(text: str, tmp_path: Path) -> None:
    session = pipeline.open(text, base_dir=ROOT / "scenes", name="s", cache_dir=tmp_path / "cache")
    assert session.problems == []
    resolved = yaml.safe_load(scene_yaml(session.scene))
    assert "duration" not in resolved and isinstance(resolved["frames"], int)
    assert all(isinstance(kf["frame"], int) for kf in resolved["keyframes"])
    again = _round_trip(session)
    assert again.problems == []
    assert _keys(again) == _keys(session)


def test_a_render_leaves_its_record_and_no_key_changes(tmp_path: Path) -> None:
    scene_dir = tmp_path / "scenes"
    scene_dir.mkdir()
    path = scene_dir / "walk.yaml"
    path.write_text(SCENE)
    session = pipeline.open(path, cache_dir=tmp_path / "cache")
    keys = _keys(session)
    report = session.render(renderer=Flat(), command="render.py walk.yaml --quiet")
    out = scene_dir / "renders" / "walk"
    assert sorted(p.name for p in out.iterdir()) == [
        "band.mp4",
        "band.srt",
        "frames",
        "index.html",  # the render page (tests/test_page.py)
        "out.mp4",
        "out.srt",
        "page",
        "walk.frames.csv",
        "walk.frames.json",
        "walk.record.json",
        "walk.scene.yaml",
    ]
    assert sorted(Path(p).name for p in report.record) == [
        "band.srt",
        "out.srt",
        "walk.frames.csv",
        "walk.frames.json",
        "walk.record.json",
        "walk.scene.yaml",
    ]
    # The record does not feed the planner: a new session plans the very same keys, all cached.
    after = pipeline.open(path, cache_dir=tmp_path / "cache")
    assert _keys(after) == keys and all(f.cached for f in after.status())

    record = json.loads((out / "walk.record.json").read_text())
    assert record["command"] == "render.py walk.yaml --quiet"
    assert record["model"]["kind"] == "embedded" and record["model"]["fingerprint"]
    assert record["model"]["fingerprint"] == session.env.fingerprint
    assert {"python", "sd-scenes", "pillow", "torch", "diffusers"} <= set(record["libraries"])
    assert record["frames"] == 6 and record["base_key"] == session.plan().base_key
    assert record["outputs"] == {"out.mp4": "written", "band.mp4": "written", "frames": "written"}

    # The resolved scene from the record, copied beside the scene, plans the same keys.
    (scene_dir / "copy.yaml").write_text((out / "walk.scene.yaml").read_text())
    assert _keys(pipeline.open(scene_dir / "copy.yaml", cache_dir=tmp_path / "cache")) == keys

    rows = json.loads((out / "walk.frames.json").read_text())
    assert rows == json.loads(json.dumps(frame_rows(session.plan())))
    assert [r["key"] for r in rows] == keys
    assert rows[0]["prompt"] == {
        "a": [{"text": "a dog", "weight": 0.6666666667}, {"text": "a wolf", "weight": 0.3333333333}]
    }
    assert rows[2]["prompt"]["b"] == [{"text": "a cat", "weight": 1.0}] and rows[2]["prompt"]["t"] == 0.25
    assert rows[2]["noise"] == {"seed": 7, "to": 9, "t": 0.25}
    assert rows[4]["scalars"] == {"guidance": 5.0} and rows[5]["negative_prompt"]["a"][0]["text"] == "blurry"

    table = list(csv.DictReader(io.StringIO((out / "walk.frames.csv").read_text())))
    assert [r["frame"] for r in table] == ["0", "1", "2", "3", "4", "5"]
    assert list(table[0])[:10] == [
        "frame",
        "key",
        "mode",
        "prompt",
        "prompt_t",
        "negative_prompt",
        "seed",
        "seed_to",
        "noise_t",
        "guidance",
    ]
    assert (table[2]["prompt"], table[2]["prompt_t"], table[2]["seed_to"]) == (
        "a dog×0.666667 + a wolf×0.333333 → a cat",
        "0.25",
        "9",
    )

    # SRT: one cue per frame played, at the output's fps; the rubber band plays its way back too.
    cues = (out / "out.srt").read_text().strip().split("\n\n")
    assert len(cues) == 6
    assert cues[1].split("\n")[:2] == ["2", "00:00:00,250 --> 00:00:00,500"]
    assert cues[1].split("\n")[2].startswith("F#: 1; Seed: 7; Seed to: 9 @0.0625; guidance: ")
    assert len((out / "band.srt").read_text().strip().split("\n\n")) == 6 + 3

    # PNG frames carry their parameters; the MP4 its comment.
    from PIL import Image

    with Image.open(out / "frames" / "frame_00002.png") as image:
        texts = dict(image.text)
    assert json.loads(texts["sd-scenes"])["key"] == keys[2]
    assert texts["parameters"] == cues[2].split("\n")[2]
    assert _mp4_comment(out / "out.mp4").startswith("sd-scenes ")
    assert "walk.yaml, 6 frames 32x32, 2 steps, model tiny" in _mp4_comment(out / "out.mp4")


def _mp4_comment(path: Path) -> str:
    import imageio_ffmpeg

    probe = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [
        line.split(":", 1)[1].strip()
        for line in probe.stderr.splitlines()
        if line.strip().startswith("comment")
    ]
    return lines[0] if lines else ""


def test_a_rerender_keeps_the_previous_outputs_unless_told_to_overwrite(tmp_path: Path) -> None:
    scene_dir = tmp_path / "scenes"
    scene_dir.mkdir()
    path = scene_dir / "s.yaml"
    path.write_text(SCENE)
    pipeline.open(path, cache_dir=tmp_path / "cache").render(renderer=Flat())
    out = scene_dir / "renders" / "s"
    first = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    # Nothing changed: nothing is replaced, nothing kept.
    same = pipeline.open(path, cache_dir=tmp_path / "cache").render(renderer=Flat())
    assert same.previous is None and not (out / "previous").exists() and same.record == []

    path.write_text(SCENE.replace('"a cat"', '"a cow"'))
    report = pipeline.open(path, cache_dir=tmp_path / "cache").render(renderer=Flat())
    kept = Path(report.previous)
    assert kept.parent == out / "previous"
    # Every file the first run left is there, byte for byte, at its own relative path.
    assert {p.relative_to(kept): p.read_bytes() for p in kept.rglob("*") if p.is_file()} == first
    assert any(str(kept) in note for note in report.notes)
    assert (out / "out.mp4").read_bytes() != first[Path("out.mp4")]

    path.write_text(SCENE.replace('"a cat"', '"a hen"'))
    report = pipeline.open(path, cache_dir=tmp_path / "cache").render(renderer=Flat(), overwrite=True)
    assert report.previous is None
    assert [p.name for p in (out / "previous").iterdir()] == [kept.name]
