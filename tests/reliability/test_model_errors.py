"""Model problems end with a message that says what to do, exit code 2 and no traceback.

Unknown Hugging Face ids offline, local model folders with a missing or a damaged weight file, and
running out of memory: a batch that does not fit is halved until it does; a single frame that does
not fit is an error.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from pipeline.render.modelfiles import check_model_spec
from pipeline.render.models import resolve_model
from pipeline.store.cache import CacheDir
from pipeline.store.records import claim_key
from tests.reliability._helpers_inputs import (
    EMBEDDED,
    ROOT,
    cached_frames,
    cli_probe,
    copy_model,
    max_diff,
    plan_of,
    render,
    render_ok,
)

SCENE = """\
model: {model}
size: [32, 32]
steps: 2
seed: 7
keyframes:
  - {{frame: 0, prompt: a lighthouse}}
  - {{frame: 7, prompt: a windmill}}
outputs: [out.gif]
"""


def write_scene(folder: Path, model: str = "tiny") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    scene = folder / "scene.yaml"
    scene.write_text(SCENE.format(model=model))
    return scene


def one_error_line(stderr: str, scene: Path) -> str:
    """The only line on stderr: ``SCENE: message``."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{scene}: "), lines[0]
    return lines[0]


def assert_nothing_rendered(folder: Path, cache: Path, *, embeddings: bool = False) -> None:
    """No frame cached, no output written (and no embedding, unless the model did load)."""
    assert not (folder / "renders").exists()
    if CacheDir.exists(cache):
        with CacheDir(cache) as c:
            assert len(c.frames) == 0
            assert embeddings or len(c.embeddings) == 0


# -- models that cannot be found or read --------------------------------------------------------


@pytest.mark.parametrize("plan", [False, True], ids=["render", "plan"])
def test_unknown_hub_id_offline(plan: bool, tmp_path: Path) -> None:
    scene = write_scene(tmp_path / "scene", model="nobody-here/no-such-model-xyz")
    (tmp_path / "hf").mkdir()
    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
    }
    args = [str(scene), "--cache-dir", str(tmp_path / "cache"), *(["--plan"] if plan else [])]
    code, heavy, stdout, stderr = cli_probe(*args, env=env)
    assert code == 2, stderr
    assert heavy == []  # found out without loading anything
    assert "Traceback" not in stdout + stderr
    line = one_error_line(stderr, scene)
    assert "cannot find model 'nobody-here/no-such-model-xyz'" in line
    assert "HF_HUB_OFFLINE is set" in line
    assert "download it once with network access, or point 'model:' at a local diffusers folder" in line
    assert_nothing_rendered(tmp_path / "scene", tmp_path / "cache")
    assert not any((tmp_path / "hf").rglob("*.json"))  # nothing was fetched


@pytest.mark.parametrize(
    "missing",
    [
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ],
)
def test_local_model_with_a_weight_file_missing(missing: str, tmp_path: Path) -> None:
    folder = tmp_path / "scene"
    copy_model(folder / "models" / "mine")
    (folder / "models" / "mine" / missing).unlink()
    scene = write_scene(folder, model="models/mine")
    code, heavy, stdout, stderr = cli_probe(str(scene), "--cache-dir", str(tmp_path / "cache"))
    assert code == 2, stderr
    assert heavy == []  # checked before loading
    assert "Traceback" not in stdout + stderr
    line = one_error_line(stderr, scene)
    component = missing.split("/")[0]
    assert (
        f"model 'models/mine' is incomplete: no weight file in {folder / 'models' / 'mine' / component}"
        in line
    )
    assert "re-download it" in line
    assert_nothing_rendered(folder, tmp_path / "cache")


@pytest.mark.slow
@pytest.mark.parametrize("keep", ["half", "header_only", "empty"])
def test_local_model_with_a_truncated_weight_file(
    keep: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "scene"
    copy_model(folder / "models" / "mine")
    weights = folder / "models" / "mine" / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    weights.write_bytes({"half": data[: len(data) // 2], "header_only": data[:header], "empty": b""}[keep])
    scene = write_scene(folder, model="models/mine")
    code, report = render(scene, tmp_path / "cache")
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert report is None
    assert "Traceback" not in captured.out + captured.err
    lines = [line for line in captured.err.splitlines() if line.startswith(f"{scene}: ")]
    assert len(lines) == 1, captured.err
    assert f"cannot load model 'models/mine' from {folder / 'models' / 'mine'}" in lines[0]
    assert "A weight file may be truncated or damaged: re-download the model" in lines[0]
    assert_nothing_rendered(folder, tmp_path / "cache")


@pytest.mark.slow
def test_truncated_weight_file_through_the_command_line(tmp_path: Path) -> None:
    """The same as a user sees it: one line, exit 2, no traceback."""
    folder = tmp_path / "scene"
    copy_model(folder / "models" / "mine")
    weights = folder / "models" / "mine" / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    scene = write_scene(folder, model="models/mine")
    code, _heavy, stdout, stderr = cli_probe(
        str(scene), "--cache-dir", str(tmp_path / "cache"), "-q", timeout=300
    )
    assert code == 2, stderr
    assert "Traceback" not in stdout + stderr
    line = one_error_line(stderr, scene)
    assert "cannot load model 'models/mine'" in line and "re-download the model" in line
    assert_nothing_rendered(folder, tmp_path / "cache")


# -- out of memory -------------------------------------------------------------------------------

OOM_MESSAGE = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity; 5.12 GiB already allocated)"


def _oom(kind: str) -> Exception:
    if kind == "runtime_error":
        return RuntimeError(OOM_MESSAGE)
    import torch

    return torch.cuda.OutOfMemoryError(OOM_MESSAGE)


def patch_denoise(monkeypatch: pytest.MonkeyPatch, kind: str, max_jobs: int) -> list[tuple[int, bool]]:
    """Make FrameRenderer.denoise run out of memory above ``max_jobs`` jobs; returns (jobs, ok) per call."""
    from pipeline.render.renderer import FrameRenderer

    original = FrameRenderer.denoise
    calls: list[tuple[int, bool]] = []

    def denoise(self: Any, jobs: Sequence[Any], latents: Any) -> Any:
        if len(jobs) > max_jobs:
            calls.append((len(jobs), False))
            raise _oom(kind)
        calls.append((len(jobs), True))
        return original(self, jobs, latents)

    monkeypatch.setattr(FrameRenderer, "denoise", denoise)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["runtime_error", "torch_oom_error"])
def test_out_of_memory_halves_the_batch_and_finishes(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    scene = write_scene(tmp_path / "scene")
    calls = patch_denoise(monkeypatch, kind, max_jobs=1)
    report = render_ok(scene, tmp_path / "cache", "--batch-size", "4")
    err = capsys.readouterr().err
    assert (report["rendered"], report["cached"]) == (8, 0)
    assert "out of memory with 4 frames per batch; going on with 2" in err
    assert "out of memory with 2 frames per batch; going on with 1" in err
    assert "Traceback" not in err
    assert sum(ok for _, ok in calls) == 8 and all(n == 1 for n, ok in calls if ok)
    # The smaller batch size is kept: the first batch of 4 and its two halves fail, nothing after them.
    assert [n for n, ok in calls if not ok] == [4, 2, 2]
    keys = [job.key for job in plan_of(scene)]
    frames = cached_frames(tmp_path / "cache", keys)
    assert (tmp_path / "scene" / "renders" / "scene" / "out.gif").is_file()

    # Each frame is what a run with one frame per batch (and no memory trouble) renders.
    monkeypatch.undo()
    reference = tmp_path / "reference"
    shutil.copytree(tmp_path / "scene", reference, ignore=shutil.ignore_patterns("renders", "report.json"))
    render_ok(reference / "scene.yaml", tmp_path / "cache1", "--batch-size", "1")
    assert max_diff(frames, cached_frames(tmp_path / "cache1", keys)) == 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["runtime_error", "torch_oom_error"])
def test_out_of_memory_for_a_single_frame_is_an_error(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "scene"
    scene = write_scene(folder)
    calls = patch_denoise(monkeypatch, kind, max_jobs=0)
    code, report = render(scene, tmp_path / "cache", "--batch-size", "2")
    err = capsys.readouterr().err
    assert code == 2, err
    assert report is None
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"{scene}: ")]
    assert len(lines) == 1, err
    assert re.search(
        r"out of memory rendering a single frame at 32x32: lower the size, use 'dtype: float16' on a GPU, "
        r"or free memory used by other programs",
        lines[0],
    ), lines[0]
    assert calls and not any(ok for _, ok in calls)
    assert_nothing_rendered(folder, tmp_path / "cache", embeddings=True)  # prompts were encoded before
    # The failed run leaves no claims behind: another process would not wait for these frames.
    keys = [job.key for job in plan_of(scene)]
    with CacheDir(tmp_path / "cache") as cache:
        assert not any(claim_key(key) in cache.records for key in keys)

    # Once memory is there again, the same command renders everything.
    monkeypatch.undo()
    again = render_ok(scene, tmp_path / "cache")
    assert (again["rendered"], again["cached"]) == (8, 0)


# -- known gaps ------------------------------------------------------------------------------------


@pytest.mark.parametrize("plan", [False, True], ids=["render", "plan"])
def test_local_model_with_a_damaged_scheduler_config(plan: bool, tmp_path: Path) -> None:
    folder = tmp_path / "scene"
    copy_model(folder / "models" / "mine")
    config = folder / "models" / "mine" / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text()[:40])
    scene = write_scene(folder, model="models/mine")
    args = [str(scene), "--cache-dir", str(tmp_path / "cache"), *(["--plan"] if plan else [])]
    code, heavy, stdout, stderr = cli_probe(*args)
    assert "Traceback" not in stdout + stderr
    assert code == 2, stderr
    assert heavy == []
    line = one_error_line(stderr, scene)
    assert "scheduler_config.json" in line and "re-download" in line


@pytest.mark.slow
def test_out_of_memory_while_loading_the_model_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import diffusers
    import torch

    def to(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise torch.cuda.OutOfMemoryError(OOM_MESSAGE)

    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "to", to)
    scene = write_scene(tmp_path / "scene")
    try:
        code, _report = render(scene, tmp_path / "cache")
    except Exception as exc:  # what the command line shows as a traceback
        pytest.fail(f"escaped the CLI: {type(exc).__name__}: {exc}")
    err = capsys.readouterr().err
    assert code == 2
    assert "out of memory" in err.lower()


def test_local_model_folder_named_like_an_embedded_one(tmp_path: Path) -> None:
    folder = tmp_path / "scene"
    copy_model(folder / "tiny-finetune")
    scene = write_scene(folder, model="tiny-finetune")
    code, heavy, stdout, stderr = cli_probe(str(scene), "--plan", "--cache-dir", str(tmp_path / "cache"))
    assert heavy == []
    assert code == 0, stderr
    assert "8 to render" in stdout


# -- --model: the checks and words of model:, and paths relative to the current folder ------------

OFFLINE = {"HF_HUB_OFFLINE": "1"}  # a typo must be caught before any network access


def cli_in(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python render.py ARGS`` run from ``cwd`` (not the project root), as a user would."""
    return subprocess.run(
        [sys.executable, str(ROOT / "render.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **OFFLINE},
    )


def test_model_option_folder_is_relative_to_the_current_folder(tmp_path: Path) -> None:
    """``--model ./mine`` is the folder in the current folder, even with another 'mine' beside the scene."""
    folder = tmp_path / "scene"
    write_scene(folder)
    copy_model(tmp_path / "mine")  # tiny: what --model ./mine names from tmp_path
    copy_model(folder / "mine", "tiny-sdxl")  # a different model of the same name beside the scene
    run = cli_in(tmp_path, "scene/scene.yaml", "--model", "./mine", "--plan", "--json", "--cache-dir", "c")
    assert run.returncode == 0, run.stderr
    keys = [row["key"] for row in json.loads(run.stdout)]
    same = folder / "same.yaml"
    same.write_text(SCENE.format(model="../mine"))  # the scene naming that folder itself
    assert keys == [job.key for job in plan_of(same)]
    beside = folder / "beside.yaml"
    beside.write_text(SCENE.format(model="mine"))
    assert keys != [job.key for job in plan_of(beside)]


def test_absolute_path_to_a_users_model_is_local_not_embedded(tmp_path: Path) -> None:
    copy_model(tmp_path / "mine")
    ref = resolve_model(str(tmp_path / "mine"), Path("/"))
    assert (ref.kind, ref.is_embedded) == ("local", False)
    # The project's own folder is embedded however it is named: its weights are the random ones.
    assert resolve_model(str(EMBEDDED / "tiny"), tmp_path).kind == "embedded"
    assert resolve_model("tiny", tmp_path).kind == "embedded"


@pytest.mark.slow
def test_no_random_weights_note_for_a_users_model_by_absolute_path(tmp_path: Path) -> None:
    copy_model(tmp_path / "mine")
    scene = tmp_path / "scene" / "scene.yaml"
    scene.parent.mkdir()
    scene.write_text(SCENE.format(model=tmp_path / "mine").replace("frame: 7", "frame: 1"))
    mine = cli_in(tmp_path, str(scene), "--cache-dir", "c", "--out", "o1")
    assert mine.returncode == 0, mine.stderr
    assert "RANDOM" not in mine.stderr
    tiny = cli_in(tmp_path, str(scene), "--cache-dir", "c", "--out", "o2", "--model", "tiny")
    assert tiny.returncode == 0, tiny.stderr
    assert "note: model 'tiny' is the embedded test model with RANDOM weights" in tiny.stderr


def test_model_option_typo_gets_the_words_of_a_scene_typo(tmp_path: Path) -> None:
    folder = tmp_path / "scene"
    scene = write_scene(folder)
    code, heavy, _out, err = cli_probe(
        str(scene), "--model", "tiny_sdxl", "--plan", "--cache-dir", str(tmp_path / "c"), env=OFFLINE
    )
    assert (code, heavy) == (2, [])
    message = (
        "'tiny_sdxl' is not an embedded model; did you mean 'tiny-sdxl'? "
        "embedded: demo, tiny, tiny-depth, tiny-inpaint, tiny-sd3, tiny-sdxl"
    )
    assert err.strip() == f"--model: {message}"
    typo = folder / "typo.yaml"
    typo.write_text(SCENE.format(model="tiny_sdxl"))
    code, heavy, _out, err = cli_probe(str(typo), "--plan", "--cache-dir", str(tmp_path / "c"), env=OFFLINE)
    assert (code, heavy) == (2, [])
    assert err.strip() == f"{typo}:1:8: model: {message}"


def test_model_option_that_cannot_render_the_scenes_mode_is_named(tmp_path: Path) -> None:
    """``--model tiny-inpaint`` on a txt2img scene: the message names that model, not the scene's."""
    scene = write_scene(tmp_path / "scene")
    code, heavy, _out, err = cli_probe(
        str(scene), "--model", "tiny-inpaint", "--plan", "--cache-dir", str(tmp_path / "c")
    )
    assert (code, heavy) == (2, [])
    assert err.strip() == (
        f"{scene}:1:1: mode txt2img is not possible with --model 'tiny-inpaint' "
        "(StableDiffusionInpaintPipeline); it renders: inpaint; "
        "the scene sets no 'mode', so it is txt2img, the default"
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tiny", None),
        ("owner/name", None),
        ("tiny-xl", "'tiny-xl' is not an embedded model; did you mean 'tiny-sdxl'? embedded: "),
        ("hello", "'hello' is neither an embedded model (demo, tiny, "),
        ("./nothere", "folder './nothere' not found (looked for "),
        ("a\0b", "'a\\x00b' is not a usable path ("),
        ("x" * 5000, "' is not a usable path ("),
    ],
)
def test_check_model_spec(spec: str, message: str | None, tmp_path: Path) -> None:
    found = check_model_spec(spec, tmp_path)
    if message is None:
        assert found is None
    else:
        assert found is not None and message in found, found
        assert found.isprintable() and len(found) < 400


def test_scene_model_that_cannot_render_the_default_mode_points_at_the_model_line(tmp_path: Path) -> None:
    scene = write_scene(tmp_path / "scene", model="tiny-inpaint")
    code, heavy, _out, err = cli_probe(str(scene), "--plan", "--cache-dir", str(tmp_path / "c"))
    assert (code, heavy) == (2, [])
    assert err.strip() == (
        f"{scene}:1:8: mode txt2img is not possible with model 'tiny-inpaint' "
        "(StableDiffusionInpaintPipeline); it renders: inpaint; "
        "the scene sets no 'mode', so it is txt2img, the default"
    )
