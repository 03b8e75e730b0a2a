"""Every invalid scene is a SceneError listing EVERY problem as ``FILE:LINE:COL: message``.

The cases live in ``tests/corpus/NN_short_name.yaml``: each is one realistic mistake (or a few at
once), and starts with the problems it must produce::

    # expect: 7:11: keyframe 1, hold: expected true or false, got the text 'yes'
    # extra-ok            (optional: further problems beyond the expected ones are fine)
    # xfail: bug: ...     (optional: documents a known bug; the test is a strict xfail)

Each ``# expect:`` line must be matched by a problem at exactly that line and column whose message
contains the text after it (case-sensitive), and there must be no other problem unless the file says
``# extra-ok``. The corpus is copied into a temporary folder next to generated input images, so that
cases that need an existing file (an init image for an inpaint case whose mask is missing) reach the
rule they are about.
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.scene.core import Scene
from pipeline.scene.load import load_scene, parse_scene
from pipeline.scene.modelrules import check_against_model
from pipeline.scene.problems import Problem, SceneError

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).resolve().parent / "corpus"
CORPUS_FILES = sorted(CORPUS.glob("*.yaml"))

_EXPECT = re.compile(r"^# expect: (\d+):(\d+): (.*)$")
_NAME = re.compile(r"^\d{2,3}_[a-z0-9_]+\.yaml$")
# One line of the CLI's stderr for an invalid scene.
_PROBLEM_LINE = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<message>.+)$")


@dataclass(frozen=True)
class Expect:
    line: int
    col: int
    text: str

    def matches(self, problem: Problem) -> bool:
        return problem.line == self.line and problem.col == self.col and self.text in problem.message

    def __str__(self) -> str:
        return f"{self.line}:{self.col}: {self.text}"


@dataclass(frozen=True)
class Case:
    name: str
    expects: tuple[Expect, ...]
    extra_ok: bool
    xfail: str | None


def read_case(path: Path) -> Case:
    """The header of a corpus file: its leading comment lines (ASCII even where the body is not UTF-8)."""
    expects: list[Expect] = []
    extra_ok = False
    xfail: str | None = None
    for raw in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        if not raw.startswith("#"):
            break
        m = _EXPECT.match(raw)
        if m:
            expects.append(Expect(int(m.group(1)), int(m.group(2)), m.group(3)))
        elif raw.startswith("# extra-ok"):
            extra_ok = True
        elif raw.startswith("# xfail:"):
            xfail = raw.removeprefix("# xfail:").strip()
    return Case(path.name, tuple(expects), extra_ok, xfail)


CASES = [read_case(p) for p in CORPUS_FILES]


def _param(case: Case) -> object:
    marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
    return pytest.param(case, id=case.name.removesuffix(".yaml"), marks=marks)


def make_inputs(folder: Path) -> None:
    """The files that corpus scenes refer to: tiny PNGs, a LoRA, files that are not weights, a non-model folder."""
    from PIL import Image

    inputs = folder / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    for name, color in (("init", (200, 120, 40)), ("mask", (255, 255, 255)), ("depth", (90, 90, 90))):
        Image.new("RGB", (16, 16), color).save(inputs / f"{name}.png")
    shutil.copyfile(ROOT / "scenes" / "inputs" / "style_tiny.safetensors", inputs / "style.safetensors")
    shutil.copyfile(ROOT / "scenes" / "inputs" / "tom_tiny.safetensors", inputs / "tom.safetensors")
    # Files named as weights that are not: a text file, a header cut short, a .bin that is text.
    (inputs / "notes.safetensors").write_text("these are not weights\n")
    weights = (ROOT / "scenes" / "inputs" / "tom_tiny.safetensors").read_bytes()
    (inputs / "cut.safetensors").write_bytes(weights[: len(weights) - 16])
    (inputs / "notes.bin").write_text("these are not weights either\n")
    (inputs / "not_a_model").mkdir(exist_ok=True)
    (inputs / "not_a_model" / "config.json").write_text("{}\n")


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the corpus beside generated inputs (paths in scenes are relative to the scene file)."""
    folder = tmp_path_factory.mktemp("scenes") / "corpus"
    folder.mkdir()
    for path in CORPUS_FILES:
        shutil.copyfile(path, folder / path.name)
    make_inputs(folder)
    return folder


def _show(problems: list[Problem]) -> str:
    return "\n".join(f"  {p.line}:{p.col}: {p.message}" for p in problems) or "  (none)"


# ---------------------------------------------------------------------------------------------
# The corpus itself


def test_corpus_is_big_enough_and_well_formed() -> None:
    assert len(CORPUS_FILES) >= 45
    numbers = [int(p.name.split("_")[0]) for p in CORPUS_FILES]
    assert len(set(numbers)) == len(numbers), "two corpus files share a number"
    for path, case in zip(CORPUS_FILES, CASES, strict=True):
        assert _NAME.match(path.name), f"{path.name}: name it NN_short_name.yaml"
        assert case.expects, f"{path.name}: starts with no '# expect: LINE:COL: text' line"
    # Reporting every problem at once is the point: several files have more than one.
    assert sum(len(c.expects) >= 2 for c in CASES if not c.xfail) >= 3
    # Nothing in the corpus directory is large except the alias bomb, which is about 1 KB.
    assert all(p.stat().st_size < 2048 for p in CORPUS_FILES)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_corpus_file_reports_every_expected_problem(case: Case, corpus_dir: Path) -> None:
    path = corpus_dir / case.name
    with pytest.raises(SceneError) as info:
        load_scene(path)
    problems = info.value.problems
    missing = [e for e in case.expects if not any(e.matches(p) for p in problems)]
    assert not missing, (
        f"{case.name}: expected problems not reported:\n"
        + "\n".join(f"  {e}" for e in missing)
        + f"\nreported:\n{_show(problems)}"
    )
    if not case.extra_ok:
        extra = [p for p in problems if not any(e.matches(p) for e in case.expects)]
        assert not extra, f"{case.name}: unexpected problems:\n{_show(extra)}"
    # Every problem names the file as given, and the error's text is one FILE:LINE:COL line per problem.
    assert all(p.file == str(path) for p in problems)
    assert str(info.value).splitlines() == [f"{path}:{p.line}:{p.col}: {p.message}" for p in problems]
    assert all("\n" not in p.message for p in problems)
    assert problems == sorted(problems, key=lambda p: (p.line, p.col))


# ---------------------------------------------------------------------------------------------
# Specific behaviours


def test_not_utf8_is_a_scene_error_not_a_crash(corpus_dir: Path) -> None:
    # 65_not_utf8 is an xfail for its position; whatever the position, it must be a SceneError.
    with pytest.raises(SceneError, match="not UTF-8 text"):
        load_scene(corpus_dir / "65_not_utf8.yaml")


def test_missing_scene_file_is_a_scene_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(SceneError) as info:
        load_scene(path)
    assert [(p.line, p.col) for p in info.value.problems] == [(1, 1)]
    assert "scene file not found" in info.value.problems[0].message


def test_alias_bomb_reports_every_anchor_and_alias() -> None:
    text = (CORPUS / "08_alias_bomb.yaml").read_text()
    assert 900 <= len(text.encode()) <= 1500  # the classic ~1 KB "billion laughs"
    with pytest.raises(SceneError) as info:
        parse_scene(text, "bomb.yaml")
    messages = [p.message for p in info.value.problems]
    assert sum("YAML anchor" in m for m in messages) == 9
    assert sum("YAML alias" in m for m in messages) == 8 * 9 + 1


def test_alias_bomb_is_rejected_fast() -> None:
    """Aliases are refused while composing, before anything is expanded: 9**9 strings are never built."""
    text = (CORPUS / "08_alias_bomb.yaml").read_text()
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        with pytest.raises(SceneError):
            parse_scene(text, "bomb.yaml")
        timings.append(time.perf_counter() - started)
    assert max(timings) < 0.5, timings
    assert statistics.median(timings) < 0.1, timings


def test_python_tag_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = f'steps: !!python/object/apply:os.system ["touch {marker}"]\nkeyframes:\n  - frame: 0\n    prompt: a\n'
    with pytest.raises(SceneError, match="YAML tag"):
        parse_scene(text, "tag.yaml")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# The command line: exit code 2, FILE:LINE:COL lines, no traceback, nothing written


CLI_CASES = [
    "05_duplicate_top_key.yaml",
    "08_alias_bomb.yaml",
    "22_empty_file.yaml",
    "36_strength_out_of_range.yaml",
    "49_mask_missing.yaml",
    "69_many_problems_at_once.yaml",
]


def _run_cli(scene: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "render.py", str(scene), "--cache-dir", str(cache), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _check_cli_rejects(scene: Path, tmp_path: Path, *extra: str) -> list[str]:
    cache = tmp_path / "cache"
    result = _run_cli(scene, cache, *extra)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines
    for line in lines:
        m = _PROBLEM_LINE.match(line)
        assert m, f"not a FILE:LINE:COL: line: {line!r}"
        assert m.group("file") == str(scene)
    # Nothing was written: no cache, no render folder beside the scene.
    assert not cache.exists()
    folder = scene.parent if scene.is_absolute() else ROOT / scene.parent
    assert not (folder / "renders").exists()
    return lines


@pytest.mark.parametrize("plan", [True, False], ids=["plan", "render"])
@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_rejects_invalid_scene(name: str, plan: bool, tmp_path: Path) -> None:
    shutil.copyfile(CORPUS / name, tmp_path / name)
    make_inputs(tmp_path)
    scene = tmp_path / name
    lines = _check_cli_rejects(scene, tmp_path, *(["--plan"] if plan else []))
    # Every problem is printed, one line each, in the same order and words as load_scene's.
    with pytest.raises(SceneError) as info:
        load_scene(scene)
    assert lines == [str(p) for p in info.value.problems]
    assert len(lines) == len(info.value.problems) >= 1


def test_cli_scene_problems_and_option_problems_together(tmp_path: Path) -> None:
    name = "36_strength_out_of_range.yaml"
    shutil.copyfile(CORPUS / name, tmp_path / name)
    make_inputs(tmp_path)
    cache = tmp_path / "cache"
    result = _run_cli(tmp_path / name, cache, "--device", "tpu")
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 3
    assert lines[-1].startswith("--device: 'tpu' is not allowed")
    assert not cache.exists()


def test_cli_loads_no_model_for_an_invalid_scene(tmp_path: Path) -> None:
    """Checking a scene imports neither torch nor diffusers (no model can load)."""
    name = "69_many_problems_at_once.yaml"
    shutil.copyfile(CORPUS / name, tmp_path / name)
    code = (
        "import sys\n"
        "from pipeline.cli import main\n"
        "try:\n"
        f"    main([{str(tmp_path / name)!r}, '--cache-dir', {str(tmp_path / 'cache')!r}])\n"
        "except SystemExit as exc:\n"
        "    print('exit', exc.code)\n"
        "print('heavy', sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers', 'transformers'}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert "exit 2" in result.stdout, result.stdout + result.stderr
    assert "heavy []" in result.stdout
    assert not (tmp_path / "cache").exists()
    assert not (tmp_path / "renders").exists()


def test_cli_control_character_is_exit_2(tmp_path: Path) -> None:
    name = "63_control_character.yaml"
    shutil.copyfile(CORPUS / name, tmp_path / name)
    _check_cli_rejects(tmp_path / name, tmp_path, "--plan")


def test_cli_names_the_file_as_given(tmp_path: Path) -> None:
    """A relative scene path (from the project root) is echoed as given, and nothing is written beside it."""
    relative = Path("tests") / "corpus" / "05_duplicate_top_key.yaml"
    renders_before = (CORPUS / "renders").exists()
    lines = _check_cli_rejects(relative, tmp_path, "--plan")
    assert lines == [f"{relative}:6:1: duplicate key 'steps' (first set at line 4); each key may appear once"]
    assert (CORPUS / "renders").exists() == renders_before


@pytest.mark.parametrize(
    "line",
    [
        "scheduler: " + "y" * 100_000,
        "x" * 100_000 + ": 1",
        "curve: " + "c" * 100_000,
        "seed: " + "9" * 4000,
        "mode: img2img\ninit_image: " + "d/" * 2000 + "i.png",
        "outputs: [" + "o" * 100_000 + ".webm]",
    ],
    ids=["scheduler", "key", "curve", "number", "path", "output"],
)
def test_a_long_value_is_shortened_in_its_message(line: str) -> None:
    """One readable line per problem: a 100,000-character value is not echoed whole."""
    with pytest.raises(SceneError) as info:
        parse_scene(
            f"{line}\nkeyframes:\n  - frame: 0\n    prompt: a dog\n", "long.yaml", base_path=ROOT / "x.yaml"
        )
    assert info.value.problems
    assert all(len(p.message) < 800 for p in info.value.problems), [
        len(p.message) for p in info.value.problems
    ]


def test_a_scene_file_over_the_size_limit_is_refused_without_reading_it(tmp_path: Path) -> None:
    from pipeline.scene.inputfiles import MAX_SCENE_BYTES

    path = tmp_path / "huge.yaml"
    with open(path, "wb") as f:  # sparse: no disk is used
        f.truncate(MAX_SCENE_BYTES + 1)
    with pytest.raises(SceneError) as info:
        load_scene(path)
    (problem,) = info.value.problems
    assert (problem.line, problem.col) == (1, 1)
    assert (
        problem.message
        == "the scene file is 67,108,865 bytes; a scene file is a YAML text file of at most 64 MiB"
    )


def test_a_folder_as_the_scene_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SceneError) as info:
        load_scene(tmp_path)
    (problem,) = info.value.problems
    assert (
        problem.message
        == f"the scene file {tmp_path} is a folder, not a regular file; a scene file is a YAML text file of at most 64 MiB"
    )


def test_a_utf16_scene_says_so(tmp_path: Path) -> None:
    path = tmp_path / "utf16.yaml"
    path.write_bytes("keyframes:\n  - {frame: 0, prompt: a dog}\n".encode("utf-16"))
    with pytest.raises(SceneError) as info:
        load_scene(path)
    (problem,) = info.value.problems
    assert (problem.line, problem.col) == (1, 1)
    assert (
        problem.message
        == "the scene file is not UTF-8 text (byte 0xff; it starts like UTF-16); save it as UTF-8"
    )


# ---------------------------------------------------------------------------------------------
# Learned embeddings against the model's tokenizer and text encoder (check_against_model)


def _embedding_scene(tmp_path: Path, token: str, vectors: int = 32) -> Scene:
    import numpy as np
    from safetensors.numpy import save_file

    (tmp_path / "inputs").mkdir(exist_ok=True)
    save_file({"<tom>": np.zeros((1, vectors), np.float32)}, str(tmp_path / "inputs" / "tom.safetensors"))
    text = f"embeddings:\n  - {{path: inputs/tom.safetensors, token: {token!r}}}\nkeyframes:\n  - {{frame: 0, prompt: a}}\n"
    return parse_scene(text, "emb.yaml", base_path=tmp_path / "emb.yaml")


@pytest.mark.parametrize(
    ("token", "vectors", "expect"),
    [
        ("dog", 32, "2:43: embedding 1: the token 'dog' is already a word of the tokenizer of model 'tiny'"),
        (
            "<tom>",
            768,
            "2:12: embedding 1: its vectors have 768 values, the text encoder of model 'tiny' takes 32",
        ),
    ],
)
def test_learned_embedding_that_the_model_would_refuse(
    tmp_path: Path, token: str, vectors: int, expect: str
) -> None:
    """diffusers refuses these when the model loads (a traceback, after the model loaded); now before."""
    scene = _embedding_scene(tmp_path, token, vectors)
    tiny = ROOT / "pipeline" / "embedded" / "tiny"
    problems = check_against_model(
        scene, pipeline_class="StableDiffusionPipeline", family="sd", components={}, folder=tiny
    )
    (problem,) = problems
    assert f"{problem.line}:{problem.col}: {problem.message}".startswith(expect), problem


def test_a_new_token_of_the_right_width_passes(tmp_path: Path) -> None:
    scene = _embedding_scene(tmp_path, "<tom>")
    tiny = ROOT / "pipeline" / "embedded" / "tiny"
    assert (
        check_against_model(
            scene, pipeline_class="StableDiffusionPipeline", family="sd", components={}, folder=tiny
        )
        == []
    )
