"""Hostile scene files are rejected before any model loads and before anything is written.

Each case runs the real CLI (a render, not ``--plan``) in a child process that then reports whether
torch, diffusers or transformers were imported: exit code 2, only ``FILE:LINE:COL: message`` lines on
stderr, no traceback, no cache directory and no render folder.
"""

from __future__ import annotations

import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from pipeline.scene.inputfiles import MAX_SCENE_BYTES
from pipeline.scene.load import load_scene
from pipeline.scene.problems import SceneError
from tests.reliability._helpers_inputs import ROOT, cli_probe

PROBLEM_LINE = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<message>.+)$")

BASE = """\
model: {model}
size: [32, 32]
steps: 2
mode: {mode}
init_image: {init}
{extra}keyframes:
  - {{frame: 0, prompt: a house}}
  - {{frame: 3, prompt: a barn}}
outputs: {outputs}
"""


def write_scene(
    folder: Path,
    *,
    init: str = "inputs/init.png",
    mode: str = "img2img",
    model: str = "tiny",
    extra: str = "",
    outputs: str = "[out.gif]",
) -> Path:
    inputs = folder / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    if not (inputs / "init.png").exists():
        Image.new("RGB", (32, 32), (120, 80, 40)).save(inputs / "init.png")
    scene = folder / "scene.yaml"
    scene.write_text(BASE.format(model=model, mode=mode, init=init, extra=extra, outputs=outputs))
    return scene


def outside_file(tmp_path: Path) -> Path:
    """An image outside the scene's folder (a sibling folder of it)."""
    other = tmp_path / "elsewhere"
    other.mkdir(exist_ok=True)
    path = other / "secret.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(path)
    return path


def check_rejected(scene: Path, tmp_path: Path, expect: str, *extra: str) -> list[str]:
    """Render ``scene``: exit 2, FILE:LINE:COL lines naming ``expect``, no model library, nothing written."""
    cache = tmp_path / "cache"
    before = sorted(p.relative_to(scene.parent) for p in scene.parent.rglob("*"))
    code, heavy, stdout, stderr = cli_probe(str(scene), "--cache-dir", str(cache), *extra)
    assert code == 2, stderr
    assert heavy == [], f"imported {heavy} before rejecting the scene"
    assert "Traceback" not in stdout + stderr
    assert stdout == ""
    lines = stderr.splitlines()
    assert lines
    for line in lines:
        m = PROBLEM_LINE.match(line)
        assert m, f"not a FILE:LINE:COL: line: {line!r}"
        assert m.group("file") == str(scene)
    assert any(expect in line for line in lines), stderr
    assert not cache.exists()
    assert sorted(p.relative_to(scene.parent) for p in scene.parent.rglob("*")) == before
    return lines


def check_accepted_for_plan(scene: Path, tmp_path: Path, *extra: str) -> None:
    code, heavy, stdout, stderr = cli_probe(
        str(scene), "--plan", "--cache-dir", str(tmp_path / "cache"), *extra
    )
    assert code == 0, stderr
    assert heavy == []
    assert "4 to render" in stdout, stdout


# -- inputs outside the scene's folder --------------------------------------------------------


def _absolute(tmp_path: Path, folder: Path) -> str:
    return str(outside_file(tmp_path))


def _dotdot(tmp_path: Path, folder: Path) -> str:
    outside_file(tmp_path)
    return "../elsewhere/secret.png"


def _symlink(tmp_path: Path, folder: Path) -> str:
    target = outside_file(tmp_path)
    (folder / "inputs").mkdir(parents=True, exist_ok=True)
    os.symlink(target, folder / "inputs" / "link.png")
    return "inputs/link.png"


OUTSIDE: dict[str, Callable[[Path, Path], str]] = {
    "absolute": _absolute,
    "dotdot": _dotdot,
    "symlink": _symlink,
}


@pytest.mark.parametrize("kind", list(OUTSIDE))
def test_input_outside_the_scene_folder_is_refused_unless_allowed(kind: str, tmp_path: Path) -> None:
    folder = tmp_path / "scene"
    init = OUTSIDE[kind](tmp_path, folder)
    scene = write_scene(folder, init=init)
    check_rejected(scene, tmp_path, "is outside the scene's folder")
    check_accepted_for_plan(scene, tmp_path, "--allow-outside-inputs")
    load_scene(scene, allow_outside_inputs=True)


@pytest.mark.parametrize("field", ["embeddings", "loras"])
def test_learned_weights_outside_the_scene_folder_are_refused(field: str, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / "weights.safetensors"
    outside.parent.mkdir()
    outside.write_bytes(b"x")
    extra = f"{field}:\n  - {{path: {outside}}}\n"
    scene = write_scene(tmp_path / "scene", mode="txt2img", extra=extra)
    check_rejected(scene, tmp_path, "is outside the scene's folder")


# -- outputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "outputs",
    [
        "[/tmp/sd_scenes_hostile.gif]",
        "[../escape.gif]",
        "[frames/../../escape.gif]",
        "[{path: ../up/, kind: frames}]",
    ],
)
def test_output_outside_the_render_folder_is_refused(outputs: str, tmp_path: Path) -> None:
    scene = write_scene(tmp_path / "scene", outputs=outputs)
    check_rejected(scene, tmp_path, "must be a relative path inside the scene's render folder")
    assert not Path("/tmp/sd_scenes_hostile.gif").exists()


OVER_INPUTS = {
    "image_input": "[inputs/init.png]",
    "frames_folder_holding_inputs": "[inputs/]",
    "the_scene_itself": "[{path: scene.yaml, kind: gif}]",
}


@pytest.mark.parametrize("name", list(OVER_INPUTS))
def test_output_over_an_input_is_refused_and_the_input_survives(name: str, tmp_path: Path) -> None:
    folder = tmp_path / "scene"
    scene = write_scene(folder, outputs=OVER_INPUTS[name])
    originals = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    code, heavy, stdout, stderr = cli_probe(
        str(scene), "--cache-dir", str(tmp_path / "cache"), "--out", str(folder)
    )
    assert code == 2, stderr
    assert heavy == []
    assert "Traceback" not in stdout + stderr
    assert "would overwrite" in stderr and str(scene) in stderr
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == originals


def test_output_over_an_input_is_a_scene_problem_before_anything_is_written(tmp_path: Path) -> None:
    folder = tmp_path / "scene"
    scene = write_scene(folder, outputs=OVER_INPUTS["image_input"])
    check_rejected(scene, tmp_path, "would overwrite", "--out", str(folder))


# -- hostile input files -------------------------------------------------------------------------


def _bomb(folder: Path) -> tuple[str, str]:
    # 20000 x 20000 at one bit per pixel: a 50 KB file that decodes to 400 megapixels.
    Image.new("1", (20000, 20000)).save(folder / "inputs" / "bomb.png")
    return "inputs/bomb.png", "decompression bomb"


def _bomb_warning_range(folder: Path) -> tuple[str, str]:
    # 12000 x 12000: over Pillow's warning threshold (89 Mpx), under its error threshold (179 Mpx).
    Image.new("1", (12000, 12000)).save(folder / "inputs" / "big.png")
    return "inputs/big.png", "decompression bomb"


def _too_wide(folder: Path) -> tuple[str, str]:
    Image.new("1", (9000, 8)).save(folder / "inputs" / "wide.png")
    return "inputs/wide.png", "at most 8192x8192 pixels"


def _not_an_image(folder: Path) -> tuple[str, str]:
    (folder / "inputs" / "notes.png").write_text("these are not pixels\n" * 20)
    return "inputs/notes.png", "not an image Pillow can read"


def _truncated_png(folder: Path) -> tuple[str, str]:
    path = folder / "inputs" / "cut.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "inputs/cut.png", "damaged"


def _directory(folder: Path) -> tuple[str, str]:
    (folder / "inputs" / "dir.png").mkdir()
    return "inputs/dir.png", "is a folder, not a regular file"


def _fifo(folder: Path) -> tuple[str, str]:
    os.mkfifo(folder / "inputs" / "pipe.png")  # opening it would block forever
    return "inputs/pipe.png", "is a named pipe, not a regular file"


def _empty(folder: Path) -> tuple[str, str]:
    (folder / "inputs" / "empty.png").write_bytes(b"")
    return "inputs/empty.png", "not an image Pillow can read"


BAD_IMAGES: dict[str, Callable[[Path], tuple[str, str]]] = {
    "decompression_bomb_20k": _bomb,
    "decompression_bomb_12k": _bomb_warning_range,
    "side_over_8192": _too_wide,
    "not_an_image": _not_an_image,
    "truncated_png": _truncated_png,
    "directory": _directory,
    "fifo": _fifo,
    "empty_file": _empty,
}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_init_image_is_refused(name: str, tmp_path: Path) -> None:
    folder = tmp_path / "scene"
    write_scene(folder)
    init, expect = BAD_IMAGES[name](folder)
    scene = write_scene(folder, init=init)
    lines = check_rejected(scene, tmp_path, expect)
    assert any(line.startswith(f"{scene}:5:") and init in line for line in lines), lines


def test_bad_mask_is_refused_too(tmp_path: Path) -> None:
    folder = tmp_path / "scene"
    write_scene(folder)
    mask, expect = _bomb(folder)
    scene = write_scene(folder, mode="inpaint", model="tiny-inpaint", extra=f"mask: {mask}\nstrength: 1.0\n")
    check_rejected(scene, tmp_path, expect)


def test_mask_of_another_size_than_the_image_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "scene"
    write_scene(folder)
    Image.new("L", (16, 16), 255).save(folder / "inputs" / "mask.png")
    scene = write_scene(
        folder, mode="inpaint", model="tiny-inpaint", extra="mask: inputs/mask.png\nstrength: 1.0\n"
    )
    lines = check_rejected(
        scene, tmp_path, "is 16x16 but the init image 'inputs/init.png' is 32x32; they must be the same size"
    )
    assert any(line.startswith(f"{scene}:4:") for line in lines), lines  # reported at the scene's 'mode'


def test_several_hostile_inputs_are_reported_at_once(tmp_path: Path) -> None:
    folder = tmp_path / "scene"
    write_scene(folder)
    bomb, _ = _bomb(folder)
    notes, _ = _not_an_image(folder)
    scene = write_scene(
        folder,
        init=bomb,
        extra="embeddings:\n  - {path: /etc/hostname}\n",
        outputs=f"[../x.gif, {{path: {notes}.gif}}]",
    )
    lines = check_rejected(scene, tmp_path, "decompression bomb")
    assert any("outside the scene's folder" in line for line in lines)
    assert any("must be a relative path" in line for line in lines)


# -- YAML bombs ------------------------------------------------------------------------------------

# About 1 KB; expanding its aliases would build 10**9 mapping entries.
ALIAS_BOMB = (
    "model: tiny\n"
    + "a0: &a0 {"
    + ", ".join(f"k{i}: lol" for i in range(10))
    + "}\n"
    + "".join(
        f"a{n}: &a{n} {{" + ", ".join(f"k{i}: *a{n - 1}" for i in range(10)) + "}\n" for n in range(1, 10)
    )
    + "keyframes:\n  - {frame: 0, prompt: *a9}\n"
)


def test_alias_bomb_is_rejected_fast(tmp_path: Path) -> None:
    assert 900 <= len(ALIAS_BOMB.encode()) <= 1500
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        with pytest.raises(SceneError) as info:
            load_scene(path)
        timings.append(time.perf_counter() - started)
    assert statistics.median(timings) < 0.1, timings
    messages = [p.message for p in info.value.problems]
    assert sum("YAML anchor" in m for m in messages) == 10
    assert sum("YAML alias" in m for m in messages) == 9 * 10 + 1
    check_rejected(path, tmp_path, "YAML alias")


@pytest.mark.parametrize("style", ["flow", "block"])
def test_nesting_bomb_is_one_located_problem_not_a_traceback(style: str, tmp_path: Path) -> None:
    # 5,000 levels in 10 KB: composing it recursively would overflow Python's stack.
    if style == "flow":
        deep = "[" * 5000 + "a" + "]" * 5000
        text = f"keyframes:\n  - {{frame: 0, prompt: {deep}}}\n"
        where = "2:"
    else:
        deep = "".join(" " * (4 + 2 * i) + "-\n" for i in range(5000))
        text = "keyframes:\n  - frame: 0\n    prompt:\n" + deep
        where = f"{3 + 30}:"  # the 30th '-' line is the 33rd level (after the top, keyframes, 1, prompt)
    scene = tmp_path / "scene.yaml"
    scene.write_text(text)
    lines = check_rejected(scene, tmp_path, "nests more than 32 levels")
    assert len(lines) == 1 and lines[0].startswith(f"{scene}:{where}"), lines


def test_corpus_and_these_cases_are_big_enough() -> None:
    corpus = list((ROOT / "tests" / "corpus").glob("*.yaml"))
    assert len(corpus) >= 40
    assert len(corpus) + len(BAD_IMAGES) + len(OUTSIDE) + len(OVER_INPUTS) >= 40


# -- scene paths that are not scene files ------------------------------------------------------------


def _run_limited(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python render.py ARGS`` with its address space capped at 8 GiB: a read that never ends fails, not the machine."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))

    return subprocess.run(
        [sys.executable, "render.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,  # a scene path that blocks (a named pipe) fails the test instead of hanging it
        preexec_fn=cap,
    )


def _dev_zero(tmp_path: Path) -> tuple[str, str]:
    return "/dev/zero", "is a character device, not a regular file"


def _named_pipe(tmp_path: Path) -> tuple[str, str]:
    os.mkfifo(tmp_path / "scene.yaml")  # nobody ever writes to it: opening it to read would block
    return str(tmp_path / "scene.yaml"), "is a named pipe, not a regular file"


def _folder(tmp_path: Path) -> tuple[str, str]:
    (tmp_path / "scene.yaml").mkdir()
    return str(tmp_path / "scene.yaml"), "is a folder, not a regular file"


def _over_the_limit(tmp_path: Path) -> tuple[str, str]:
    with open(tmp_path / "scene.yaml", "wb") as f:  # sparse: 64 MiB + 1 byte of NULs, no disk used
        f.truncate(MAX_SCENE_BYTES + 1)
    return str(
        tmp_path / "scene.yaml"
    ), "the scene file is 67,108,865 bytes; a scene file is a YAML text file of at most 64 MiB"


NOT_SCENE_FILES: dict[str, Callable[[Path], tuple[str, str]]] = {
    "dev_zero": _dev_zero,
    "named_pipe": _named_pipe,
    "folder": _folder,
    "over_64_mib": _over_the_limit,
}


@pytest.mark.parametrize("plan", [True, False], ids=["plan", "render"])
@pytest.mark.parametrize("name", list(NOT_SCENE_FILES))
def test_scene_path_that_is_not_a_scene_file_is_refused_at_once(
    name: str, plan: bool, tmp_path: Path
) -> None:
    scene, expect = NOT_SCENE_FILES[name](tmp_path)
    before = sorted(tmp_path.rglob("*"))
    cache = tmp_path / "cache"
    result = _run_limited(scene, "--cache-dir", str(cache), *(["--plan"] if plan else []))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{scene}:1:1: "), lines
    assert expect in lines[0], lines
    assert sorted(tmp_path.rglob("*")) == before  # no cache, no render folder


def test_a_scene_of_100000_keyframes_is_under_the_size_limit() -> None:
    """The limit is not too tight: a scene keyed at each of 100,000 frames, with eight values a keyframe."""
    prompt = "a detailed matte painting of a castle on a hill at sunset, volumetric light"
    keyframe = (
        '  - frame: {n}\n    prompt: "' + prompt + ' {n}"\n    negative_prompt: "blurry, low quality"\n'
        "    seed: {n}\n    guidance: 7.25\n    strength: 0.65\n    zoom: 1.0125\n    angle: -0.375\n"
        "    translate_x: 1.5\n    translate_y: -0.75\n    curve: ease_in_out_sine\n"
    )
    size = sum(len(keyframe.format(n=n)) for n in range(100_000))
    assert 25 * 2**20 < size < MAX_SCENE_BYTES / 2, size


# -- text that is not text, numbers that overflow: located problems, never a traceback -------------

CORPUS = ROOT / "tests" / "corpus"
# Each of these crashed the CLI with a traceback (UnicodeEncodeError, "embedded null byte",
# OverflowError, "a cache key cannot hold the non-finite number inf") before it was a scene problem.
NOT_TEXT_OR_NOT_FINITE = [
    "77_lone_surrogate_in_text.yaml",
    "78_nul_in_paths.yaml",
    "79_bezier_overflow.yaml",
    "80_walk_step_overflow.yaml",
    "81_prompt_weights_overflow.yaml",
    "82_motion_overflow.yaml",
    "83_lora_scale_overflow.yaml",
    "84_duration_overflow.yaml",
    "85_seconds_overflow.yaml",
    "86_output_loop_and_cols_too_big.yaml",
]


@pytest.mark.parametrize("name", NOT_TEXT_OR_NOT_FINITE)
def test_text_that_is_not_text_and_numbers_that_overflow_are_located(name: str, tmp_path: Path) -> None:
    from tests.test_scene_errors import make_inputs

    folder = tmp_path / "scene"
    folder.mkdir()
    make_inputs(folder)
    scene = folder / name
    scene.write_bytes((CORPUS / name).read_bytes())
    expected = [line for line in scene.read_text().splitlines() if line.startswith("# expect: ")]
    lines = check_rejected(scene, tmp_path, "")
    assert len(lines) == len(expected), lines
    for want, line in zip(expected, lines, strict=True):
        where, text = want.removeprefix("# expect: ").split(": ", 1)
        assert line.startswith(f"{scene}:{where}: ") and text in line, (want, line)


def test_a_5000_digit_number_is_a_located_problem(tmp_path: Path) -> None:
    # int() refuses more than 4300 digits with a ValueError; it is a bad frame, said in one short line.
    scene = write_scene(tmp_path / "scene", extra=f"seed: {'9' * 5000}\n")
    (line,) = check_rejected(scene, tmp_path, "seed: expected a whole number, got the text '99999")
    assert line.startswith(f"{scene}:6:7: ") and "(5000 characters)" in line and len(line) < 400


@pytest.mark.parametrize("field", ["model", "init_image", "mask"])
def test_a_path_too_long_for_the_file_system_is_a_located_problem(field: str, tmp_path: Path) -> None:
    extra = {"model": "", "init_image": "", "mask": f"mask: {'m' * 5000}.png\n"}[field]
    model = "x" * 5000 if field == "model" else "tiny-inpaint"
    init = "i" * 5000 + ".png" if field == "init_image" else "inputs/init.png"
    scene = write_scene(tmp_path / "scene", model=model, init=init, mode="inpaint", extra=extra)
    lines = check_rejected(scene, tmp_path, "is not a usable path (File name too long)")
    assert all(len(line) < 400 for line in lines), lines


# -- learned weights that are not weights ------------------------------------------------------------


def _text(path: Path) -> None:
    path.write_text("these are not weights\n")


def _truncated(path: Path) -> None:
    weights = (ROOT / "scenes" / "inputs" / "style_tiny.safetensors").read_bytes()
    path.write_bytes(weights[: len(weights) // 2])


def _empty_file(path: Path) -> None:
    path.write_bytes(b"")


NOT_WEIGHTS: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "text_safetensors": ("w.safetensors", _text, "its header length points beyond the end of the file"),
    "truncated_safetensors": ("w.safetensors", _truncated, "truncated?"),
    "empty_safetensors": ("w.safetensors", _empty_file, "too short for its 8-byte header length"),
    "text_bin": ("w.bin", _text, "not a weights file (neither safetensors nor a PyTorch file)"),
}


@pytest.mark.parametrize("field", ["embeddings", "loras"])
@pytest.mark.parametrize("name", list(NOT_WEIGHTS))
def test_learned_weights_that_are_not_weights_are_refused_before_any_model_loads(
    name: str, field: str, tmp_path: Path
) -> None:
    # Before, diffusers found out after the model had loaded: exit 1 with a loader's traceback text.
    filename, make, expect = NOT_WEIGHTS[name]
    folder = tmp_path / "scene"
    (folder / "inputs").mkdir(parents=True)
    make(folder / "inputs" / filename)
    entry = "{path: inputs/" + filename + (", token: '<tom>'}" if field == "embeddings" else ", name: w}")
    scene = write_scene(folder, mode="txt2img", extra=f"{field}:\n  - {entry}\n")
    (line,) = check_rejected(scene, tmp_path, expect)
    assert line.startswith(f"{scene}:7:12: 'inputs/{filename}': "), line


# -- the whole corpus through the command line -----------------------------------------------------

_EVERY_FILE = """
import contextlib, io, json, sys
from pipeline.cli import main
results = {}
for path in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main([path, '--cache-dir', sys.argv[2]])
            code = 0
        except SystemExit as exc:
            code = exc.code
        except BaseException as exc:  # what `python render.py` would show as a traceback
            code = 'traceback: ' + repr(exc)
    results[path] = {'code': code, 'stderr': err.getvalue(), 'stdout': out.getvalue()}
heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers', 'transformers'})
print(json.dumps({'results': results, 'heavy': heavy}))
"""


def test_every_corpus_file_is_exit_2_with_located_lines_and_writes_nothing(tmp_path: Path) -> None:
    """As the held-out corpus is run: each file rendered, exit 2, only FILE:LINE:COL lines, nothing written."""
    import json

    from tests.test_scene_errors import make_inputs

    folder = tmp_path / "corpus"
    folder.mkdir()
    for path in sorted(CORPUS.glob("*.yaml")):
        (folder / path.name).write_bytes(path.read_bytes())
    make_inputs(folder)
    before = sorted(folder.rglob("*"))
    files = [str(p) for p in sorted(folder.glob("*.yaml"))]
    cache = tmp_path / "cache"
    result = subprocess.run(
        [sys.executable, "-c", _EVERY_FILE, json.dumps(files), str(cache)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["heavy"] == []
    for path, got in report["results"].items():
        assert got["code"] == 2, (path, got)
        assert got["stdout"] == "", (path, got)
        lines = got["stderr"].splitlines()
        assert lines, path
        for line in lines:
            m = PROBLEM_LINE.match(line)
            assert m and m.group("file") == path, (path, line)
    assert len(report["results"]) == len(files) >= 100
    assert not cache.exists()
    assert sorted(folder.rglob("*")) == before
