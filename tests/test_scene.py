"""Valid scenes parse as intended: defaults, frame references, shorthands, outputs, paths.

The invalid side (every rule, with line and column) is in ``test_scene_errors.py`` and its corpus.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest

from pipeline.scene.core import Scene
from pipeline.scene.load import load_scene, parse_scene
from pipeline.scene.problems import SceneError
from pipeline.scene.rules import output_kind
from pipeline.scene.schema import Output, PromptPart
from pipeline.scene.timeline import parse_frame_ref

ROOT = Path(__file__).resolve().parents[1]

TWO_KEYFRAMES = """
keyframes:
  - frame: 0
    prompt: a dog
  - frame: 12
    prompt: a cat
"""


def write_scene(folder: Path, text: str, name: str = "scene.yaml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def scene_from(folder: Path, text: str, name: str = "scene.yaml") -> Scene:
    return load_scene(write_scene(folder, text, name))


def make_png(path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (10, 20, 30)).save(path)
    return path


# ---------------------------------------------------------------------------------------------
# Defaults


def test_defaults_of_a_minimal_scene(tmp_path: Path) -> None:
    scene = scene_from(tmp_path, "keyframes:\n  - frame: 0\n    prompt: a dog\n")
    assert scene.model == "tiny"
    assert scene.revision is None
    assert scene.scheduler is None
    assert scene.dtype == "auto"
    assert scene.size == [512, 512]
    assert (scene.width, scene.height) == (512, 512)
    assert scene.steps == 25
    assert scene.guidance == 7.5
    assert scene.fps == 12.0
    assert scene.frames is None and scene.duration is None
    assert scene.seed == 0
    assert scene.negative_prompt == ""
    assert scene.interpolation == "slerp"
    assert scene.curve == "linear"
    assert scene.noise.kind == "fixed"
    assert scene.noise.seed is None and scene.noise.seeds is None and scene.noise.endpoint is False
    assert scene.clip_skip == 0 and scene.t5 is False
    assert scene.mode == "txt2img"
    assert scene.init_image is None and scene.mask is None and scene.depth_map is None
    assert scene.strength == 0.75
    assert (scene.zoom, scene.angle, scene.translate_x, scene.translate_y) == (1.0, 0.0, 0.0, 0.0)
    assert scene.embeddings == [] and scene.loras == []
    assert scene.walk is None and scene.grid is None
    assert scene.outputs is None
    # One keyframe at 0: a one-frame scene.
    assert scene.keyframe_frames == [0]
    assert scene.total_frames == 1
    kf = scene.keyframes[0]
    assert kf.hold is False
    assert kf.curve is None and kf.seed is None and kf.mode is None and kf.lora is None
    assert kf.guidance is None and kf.strength is None and kf.negative_prompt is None


def test_scene_path_name_and_base_dir(tmp_path: Path) -> None:
    scene = scene_from(tmp_path, TWO_KEYFRAMES, name="sub/dog_cat.yaml")
    assert scene.path == (tmp_path / "sub" / "dog_cat.yaml").resolve()
    assert scene.name == "dog_cat"
    assert scene.base_dir == (tmp_path / "sub").resolve()


def test_the_example_scene_parses() -> None:
    scene = load_scene(ROOT / "scenes" / "dog_cat.yaml")
    assert scene.model == "demo"  # the trained embedded model: the first render shows a real morph
    assert scene.size == [32, 32]
    assert scene.seed == 42
    assert scene.keyframe_frames == [0, 63]
    assert scene.total_frames == 64
    assert scene.keyframes[1].curve == "ease_in_out_sine"
    assert [o.path for o in scene.effective_outputs()] == ["dog_cat.mp4", "dog_cat.gif"]
    assert scene.effective_outputs()[1].rubber_band is True


# ---------------------------------------------------------------------------------------------
# Frames: numbers, seconds, frames:, duration:


def test_keyframes_by_frame_number_and_by_seconds(tmp_path: Path) -> None:
    scene = scene_from(
        tmp_path,
        """
        fps: 12
        keyframes:
          - frame: 0
            prompt: a dog
          - frame: 2.5s
            prompt: a cat
          - frame: 48
            prompt: a fox
          - frame: 5s
            prompt: a bird
        """,
    )
    assert scene.keyframe_frames == [0, 30, 48, 60]
    assert scene.total_frames == 61  # no frames/duration: up to and including the last keyframe
    # The raw value is kept as written; the frame number is derived.
    assert scene.keyframes[1].frame == "2.5s"


def test_seconds_follow_fps(tmp_path: Path) -> None:
    scene = scene_from(
        tmp_path, "fps: 24\nkeyframes:\n  - frame: 0\n    prompt: a\n  - frame: 2.5s\n    prompt: b\n"
    )
    assert scene.keyframe_frames == [0, 60]


@pytest.mark.parametrize(
    ("ref", "fps", "frame"),
    [
        (0, 12, 0),
        (30, 12, 30),
        ("2.5s", 12, 30),
        ("0s", 12, 0),
        ("1s", 30, 30),
        (" 2s ", 12, 24),
        ("0.5s", 4, 2),
    ],
)
def test_parse_frame_ref(ref: int | str, fps: float, frame: int) -> None:
    assert parse_frame_ref(ref, fps) == frame


@pytest.mark.parametrize("ref", ["'2.5 sec'", "2.5", "-1s", "s", "'1:30'", "true"])
def test_bad_frame_refs_are_one_clear_problem(ref: str) -> None:
    text = f"keyframes:\n  - frame: 0\n    prompt: a dog\n  - frame: {ref}\n    prompt: a cat\n"
    with pytest.raises(SceneError) as exc:
        parse_scene(text, "f.yaml")
    (problem,) = exc.value.problems
    assert (problem.line, problem.col) == (4, 12)
    assert "is not a frame; write a whole number like 24 or seconds like 2.5s" in problem.message


@pytest.mark.parametrize(
    ("length", "total"),
    [
        ("frames: 48", 48),
        ("duration: 10s", 120),
        ("duration: 10", 120),
        ("duration: 2.5s", 30),
        ("duration: 1.25", 15),
    ],
)
def test_frames_or_duration_give_total_frames(tmp_path: Path, length: str, total: int) -> None:
    scene = scene_from(tmp_path, f"fps: 12\n{length}\n{TWO_KEYFRAMES}")
    assert scene.total_frames == total
    assert scene.keyframe_frames == [0, 12]


@pytest.mark.parametrize(
    ("ref", "fps", "frame"),
    [
        # Halves round up, always: Python's round() would give 2 for 2.5 frames but 4 for 3.5.
        ("0.25s", 10, 3),
        ("0.35s", 10, 4),
        ("0.05s", 10, 1),
        ("0.15s", 10, 2),
        # Computed from the digits as written: 1.15 * 10 in binary floating point is 11.4999...
        ("1.15s", 10, 12),
        ("0.1s", 29.97, 3),  # 2.997
        ("0.24s", 10, 2),
    ],
)
def test_seconds_on_half_frames_round_half_up(ref: str, fps: float, frame: int) -> None:
    assert parse_frame_ref(ref, fps) == frame


@pytest.mark.parametrize(
    ("length", "total"), [("duration: 0.25s", 3), ("duration: 0.35", 4), ("duration: 1.15", 12)]
)
def test_duration_on_a_half_frame_rounds_up(tmp_path: Path, length: str, total: int) -> None:
    scene = scene_from(tmp_path, f"fps: 10\n{length}\nkeyframes:\n  - frame: 0\n    prompt: a\n")
    assert scene.total_frames == total


def test_duration_uses_fps(tmp_path: Path) -> None:
    scene = scene_from(tmp_path, f"fps: 4\nduration: 16s\n{TWO_KEYFRAMES}")
    assert scene.total_frames == 64


def test_keyframe_on_the_last_frame(tmp_path: Path) -> None:
    scene = scene_from(tmp_path, "frames: 13\n" + TWO_KEYFRAMES)
    assert scene.total_frames == 13
    assert scene.keyframe_frames == [0, 12]


# ---------------------------------------------------------------------------------------------
# Prompts


def test_prompt_shorthand_is_a_blend_of_one(tmp_path: Path) -> None:
    scene = scene_from(tmp_path, TWO_KEYFRAMES)
    assert scene.keyframes[0].prompt == [PromptPart(text="a dog", weight=1.0)]


def test_weighted_blend_list(tmp_path: Path) -> None:
    scene = scene_from(
        tmp_path,
        """
        keyframes:
          - frame: 0
            prompt:
              - {text: a dog, weight: 2}
              - {text: a cat, weight: 0.5}
              - text: a fox
        """,
    )
    parts = scene.keyframes[0].prompt
    assert parts is not None
    assert [(p.text, p.weight) for p in parts] == [("a dog", 2.0), ("a cat", 0.5), ("a fox", 1.0)]


def test_a_keyframe_without_a_prompt_keeps_none(tmp_path: Path) -> None:
    scene = scene_from(tmp_path, TWO_KEYFRAMES + "  - frame: 20\n    guidance: 9\n")
    assert scene.keyframes[2].prompt is None
    assert scene.keyframes[2].guidance == 9.0
    assert scene.keyframe_frames == [0, 12, 20]


@pytest.mark.parametrize("word", ["no", "yes", "on", "off", "y", "n", "1:30", "null_island", "True story"])
def test_yaml_11_words_stay_text(tmp_path: Path, word: str) -> None:
    """YAML 1.2 core: 'no' is the text "no", not false; '1:30' is text, not 90."""
    scene = scene_from(
        tmp_path,
        f"negative_prompt: {word}\nkeyframes:\n  - frame: 0\n    prompt: {word}\n    negative_prompt: {word}\n",
    )
    assert scene.keyframes[0].prompt == [PromptPart(text=word, weight=1.0)]
    assert scene.negative_prompt == word
    assert scene.keyframes[0].negative_prompt == word


def test_quoted_numbers_are_text(tmp_path: Path) -> None:
    scene = scene_from(tmp_path, 'negative_prompt: "12"\nkeyframes:\n  - frame: 0\n    prompt: "1984"\n')
    assert scene.negative_prompt == "12"
    assert scene.keyframes[0].prompt == [PromptPart(text="1984", weight=1.0)]


def test_true_and_false_are_booleans(tmp_path: Path) -> None:
    scene = scene_from(tmp_path, "t5: true\nkeyframes:\n  - frame: 0\n    prompt: a\n    hold: True\n")
    assert scene.t5 is True
    assert scene.keyframes[0].hold is True


# ---------------------------------------------------------------------------------------------
# Noise


def test_noise_shorthand_equals_mapping(tmp_path: Path) -> None:
    keyframes = (
        "keyframes:\n  - frame: 0\n    prompt: a\n    seed: 1\n  - frame: 8\n    prompt: b\n    seed: 2\n"
    )
    short = scene_from(tmp_path, "noise: travel\n" + keyframes, name="short.yaml")
    mapping = scene_from(tmp_path, "noise:\n  kind: travel\n" + keyframes, name="mapping.yaml")
    assert short.noise == mapping.noise
    assert short.noise.kind == "travel"
    assert [kf.seed for kf in short.keyframes] == [1, 2]


@pytest.mark.parametrize("kind", ["fixed", "per_frame"])
def test_noise_shorthands(tmp_path: Path, kind: str) -> None:
    scene = scene_from(tmp_path, f"noise: {kind}\n{TWO_KEYFRAMES}")
    assert scene.noise.kind == kind


def test_circle_noise(tmp_path: Path) -> None:
    scene = scene_from(
        tmp_path,
        """
        fps: 4
        noise: {kind: circle, seeds: [42, 1337], endpoint: true}
        walk: {prompt: cows in a field next to a windmill, frames: 64, step_size: 0}
        """,
    )
    assert scene.noise.kind == "circle"
    assert scene.noise.seeds == [42, 1337]
    assert scene.noise.endpoint is True
    assert scene.total_frames == 64


# ---------------------------------------------------------------------------------------------
# Walks and grids


def test_a_walk_built_with_model_validate_plans_its_frames(make_env: Any) -> None:
    """The timeline comes from the Scene itself: a walk built in code plans as the same walk loaded."""
    from pipeline.plan.planner import plan

    walk = {"walk": {"prompt": "a dog", "frames": 4, "step_size": 0.02}, "size": [64, 64], "steps": 2}
    built = Scene.model_validate(walk)
    assert (built.total_frames, built.keyframe_frames) == (4, [])
    loaded = parse_scene(json.dumps(walk), "scene.yaml")
    jobs = plan(built, make_env())
    assert [j.frame for j in jobs] == [0, 1, 2, 3]
    assert [j.key for j in jobs] == [j.key for j in plan(loaded, make_env())]


def test_walk_total_frames(tmp_path: Path) -> None:
    scene = scene_from(tmp_path, "walk:\n  prompt: a dog\n  frames: 64\n  step_size: 0.02\n")
    assert scene.walk is not None
    assert scene.walk.step_size == 0.02
    assert scene.walk.direction == "ones"
    assert scene.walk.direction_seed == 0
    assert scene.total_frames == 64
    assert scene.keyframe_frames == []


def test_grid_total_frames(tmp_path: Path) -> None:
    scene = scene_from(
        tmp_path,
        """
        grid:
          prompts: [a dog, a bowl of fruit, the eiffel tower, a skyscraper]
          rows: 4
          cols: 6
        """,
    )
    assert scene.grid is not None
    assert scene.total_frames == 24
    default = scene_from(tmp_path, "grid:\n  prompts: [a, b, c, d]\n", name="default_grid.yaml")
    assert default.total_frames == 64  # 8x8 by default


# ---------------------------------------------------------------------------------------------
# Outputs


def test_output_shorthand_strings_and_mappings(tmp_path: Path) -> None:
    scene = scene_from(
        tmp_path,
        TWO_KEYFRAMES
        + """
outputs:
  - dog_cat.mp4
  - {path: dog_cat.gif, rubber_band: true, loop: 2}
  - path: frames/
  - {path: sheet.png, cols: 4}
  - {path: clip.bin, kind: mp4, fps: 24}
""",
    )
    outs = scene.effective_outputs()
    assert outs == scene.outputs
    assert outs[0] == Output(path="dog_cat.mp4")
    assert (outs[1].path, outs[1].rubber_band, outs[1].loop) == ("dog_cat.gif", True, 2)
    assert [output_kind(o) for o in outs] == ["mp4", "gif", "frames", "grid", "mp4"]
    assert outs[3].cols == 4
    assert outs[4].fps == 24.0


def test_output_shorthand_equals_mapping(tmp_path: Path) -> None:
    short = scene_from(tmp_path, TWO_KEYFRAMES + "outputs: [a.gif]\n", name="short.yaml")
    mapping = scene_from(tmp_path, TWO_KEYFRAMES + "outputs: [{path: a.gif}]\n", name="mapping.yaml")
    assert short.outputs == mapping.outputs


def test_default_outputs_are_mp4_and_gif_named_after_the_scene(tmp_path: Path) -> None:
    scene = scene_from(tmp_path, TWO_KEYFRAMES, name="dog_cat.yaml")
    outs = scene.effective_outputs()
    assert [o.path for o in outs] == ["dog_cat.mp4", "dog_cat.gif"]
    assert [output_kind(o) for o in outs] == ["mp4", "gif"]
    assert all(o.rubber_band is False and o.fps is None for o in outs)


def test_default_outputs_of_a_grid_add_a_grid_image(tmp_path: Path) -> None:
    scene = scene_from(tmp_path, "grid:\n  prompts: [a, b, c, d]\n  rows: 2\n  cols: 3\n", name="four.yaml")
    outs = scene.effective_outputs()
    assert [o.path for o in outs] == ["four.mp4", "four.gif", "four_grid.png"]
    assert [output_kind(o) for o in outs] == ["mp4", "gif", "grid"]
    assert outs[2].cols == 3


def test_empty_outputs_list_is_kept(tmp_path: Path) -> None:
    scene = scene_from(tmp_path, TWO_KEYFRAMES + "outputs: []\n")
    assert scene.effective_outputs() == []


# ---------------------------------------------------------------------------------------------
# Paths are relative to the scene file, not to the working directory


def test_resolve_is_relative_to_the_scene_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    scene = scene_from(tmp_path / "project", TWO_KEYFRAMES)
    assert scene.resolve("inputs/dog.png") == (tmp_path / "project" / "inputs" / "dog.png").resolve()
    assert scene.resolve("../x.png") == (tmp_path / "x.png").resolve()


def test_input_files_are_found_beside_the_scene(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    make_png(project / "inputs" / "init.png")
    make_png(project / "inputs" / "mask.png")
    path = write_scene(
        project,
        """
        mode: inpaint
        init_image: inputs/init.png
        mask: inputs/mask.png
        strength: 0.8
        keyframes:
          - frame: 0
            prompt: a dog wearing a hat
        """,
    )
    # Loaded through a relative path from another working directory.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    scene = load_scene(Path("..") / "project" / "scene.yaml")
    assert scene.path == path.resolve()
    assert scene.resolve(scene.init_image or "") == (project / "inputs" / "init.png").resolve()
    assert scene.resolve(scene.mask or "").is_file()
    # The same scene read from the wrong folder (parse_scene without base_path) cannot find them.
    with pytest.raises(SceneError, match=r"file not found: 'inputs/init\.png'"):
        parse_scene(path.read_text(), "scene.yaml")


def test_outside_inputs_allowed_on_request(tmp_path: Path) -> None:
    make_png(tmp_path / "photos" / "dog.png")
    path = write_scene(tmp_path / "project", "mode: img2img\ninit_image: ../photos/dog.png\n" + TWO_KEYFRAMES)
    with pytest.raises(SceneError, match="outside the scene's folder"):
        load_scene(path)
    scene = load_scene(path, allow_outside_inputs=True)
    assert scene.resolve(scene.init_image or "") == (tmp_path / "photos" / "dog.png").resolve()


def test_modes_per_keyframe_with_held_inputs(tmp_path: Path) -> None:
    make_png(tmp_path / "inputs" / "init.png")
    make_png(tmp_path / "inputs" / "mask.png")
    scene = scene_from(
        tmp_path,
        """
        keyframes:
          - frame: 0
            prompt: a dog
          - frame: 12
            mode: img2img
            init_image: inputs/init.png
            strength: 0.5
          - frame: 24
            mode: inpaint
            mask: inputs/mask.png
          - frame: 36
            prompt: a cat
            hold: true
        """,
    )
    assert [kf.mode for kf in scene.keyframes] == [None, "img2img", "inpaint", None]
    assert scene.keyframes[1].strength == 0.5
    assert scene.keyframes[3].hold is True
    assert scene.total_frames == 37


def test_top_level_mode_with_init_image_from_the_first_keyframe(tmp_path: Path) -> None:
    make_png(tmp_path / "inputs" / "init.png")
    scene = scene_from(
        tmp_path,
        """
        mode: img2img
        strength: 0.5
        keyframes:
          - frame: 0
            prompt: a dog
            init_image: inputs/init.png
          - frame: 12
            prompt: a cat
        """,
    )
    assert scene.total_frames == 13


def test_learned_embeddings_and_loras(tmp_path: Path) -> None:
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "tom.bin").write_bytes(b"PK\x03\x04 a torch.save zip archive starts like this")
    shutil.copyfile(
        ROOT / "scenes" / "inputs" / "style_tiny.safetensors", tmp_path / "inputs" / "watercolor.safetensors"
    )
    scene = scene_from(
        tmp_path,
        """
        embeddings:
          - {path: inputs/tom.bin, token: <tom>}
        loras:
          - path: inputs/watercolor.safetensors
        keyframes:
          - frame: 0
            prompt: <tom> holding a tennis racquet
            lora: {watercolor: 0.8}
        """,
    )
    assert scene.embeddings[0].token == "<tom>"
    assert scene.lora_name(scene.loras[0]) == "watercolor"  # from the file name when not given
    assert scene.loras[0].scale == 1.0
    assert scene.keyframes[0].lora == {"watercolor": 0.8}


# ---------------------------------------------------------------------------------------------
# Models


def test_hugging_face_id_is_accepted_without_network(tmp_path: Path) -> None:
    scene = scene_from(tmp_path, "model: stabilityai/stable-diffusion-3-medium-diffusers\n" + TWO_KEYFRAMES)
    assert scene.model == "stabilityai/stable-diffusion-3-medium-diffusers"


def test_local_model_folder_with_model_index(tmp_path: Path) -> None:
    (tmp_path / "models" / "mine").mkdir(parents=True)
    (tmp_path / "models" / "mine" / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline"})
    )
    scene = scene_from(tmp_path, "model: ./models/mine\n" + TWO_KEYFRAMES)
    assert scene.model == "./models/mine"


def test_parse_scene_is_pure_and_positions_are_kept() -> None:
    """parse_scene needs no file; the scene it returns carries the derived frames."""
    scene = parse_scene(
        "fps: 10\nkeyframes:\n  - frame: 0\n    prompt: a\n  - frame: 1.5s\n    prompt: b\n", "inline.yaml"
    )
    assert scene.keyframe_frames == [0, 15]
    assert scene.total_frames == 16
    assert scene.name == "inline"
