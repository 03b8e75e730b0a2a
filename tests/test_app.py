"""The public Python API (``pipeline.open`` and its ``Session``), ``python -m pipeline`` and CLI basics.

Renders use the embedded ``tiny`` model at 32x32 with 2 steps. A counting renderer wraps the real one
(``RenderSetup.default()``), so what it counts is what the real path rendered.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import pipeline
from pipeline import paths
from pipeline.app import InputError, Progress
from pipeline.scene.problems import Problem
from tests.conftest import CountingRenderer as Counting

ROOT = Path(__file__).resolve().parent.parent

MORPH: dict[str, Any] = {
    "model": "tiny",
    "size": [32, 32],
    "steps": 2,
    "seed": 3,
    "guidance": 7.0,
    "keyframes": [
        {"frame": 0, "prompt": "a dog in a field"},
        {"frame": 5, "prompt": "a cat in a field", "guidance": 5.0},
    ],
    "outputs": ["out.gif", "frames/"],
}
WALK: dict[str, Any] = {
    "model": "tiny",
    "size": [32, 32],
    "steps": 2,
    "walk": {"prompt": "a dog", "frames": 4, "step_size": 0.5},
    "outputs": ["walk.gif"],
}


def _open(source: Any, tmp_path: Path, **kw: Any) -> pipeline.Session:
    return pipeline.open(source, base_dir=tmp_path, cache_dir=tmp_path / "cache", device="cpu", **kw)


def test_the_package_exports_the_api() -> None:
    for name in pipeline._API:  # every name the package lists resolves
        assert name in dir(pipeline)
        assert getattr(pipeline, name) is not None
    assert {"open", "Session", "Report", "Progress", "InputError", "RenderError", "Problem"} <= set(
        pipeline._API
    )
    with pytest.raises(AttributeError):
        pipeline.no_such_name  # noqa: B018 - the lookup is what is tested


def test_a_dict_a_string_and_a_file_give_the_same_plan(tmp_path: Path) -> None:
    import yaml

    text = yaml.safe_dump(MORPH)
    (tmp_path / "m.yaml").write_text(text)
    from_dict = _open(MORPH, tmp_path).plan()
    from_text = _open(text, tmp_path).plan()
    from_file = _open(tmp_path / "m.yaml", tmp_path).plan()
    assert len(from_dict) == 6
    assert [j.key for j in from_dict] == [j.key for j in from_text] == [j.key for j in from_file]


def test_a_dict_built_walk_plans_its_frames_and_renders_them(tmp_path: Path) -> None:
    session = _open(WALK, tmp_path, name="walk")
    assert session.problems == []
    p = session.plan()
    assert [j.frame for j in p] == [0, 1, 2, 3]
    assert len({j.key for j in p}) == 4  # each step of the walk is another frame
    counting = Counting()
    report = session.render(renderer=counting)
    assert (report.frames, report.rendered, report.cached) == (4, 4, 0)
    assert counting.keys == [j.key for j in p]
    images = session.frames()
    assert [im.size for im in images] == [(32, 32)] * 4
    assert (tmp_path / "renders" / "walk" / "walk.gif").is_file()


def test_a_counting_renderer_sees_exactly_the_frames_the_plan_says(tmp_path: Path) -> None:
    first = _open(MORPH, tmp_path)
    first.render()
    assert all(f.cached for f in first.status())

    edited = {**MORPH, "keyframes": [MORPH["keyframes"][0], {**MORPH["keyframes"][1], "guidance": 6.0}]}
    session = _open(edited, tmp_path)
    status = session.status()
    to_render = [f.key for f in status if not f.cached]
    # The guidance edit at frame 5 eases in from frame 0's value: frames 1-5 change, frame 0 does not.
    assert [f.frame for f in status if not f.cached] == [1, 2, 3, 4, 5]
    assert all(f.status.startswith("changed: guidance") for f in status if not f.cached)
    counting = Counting()
    events: list[Progress] = []
    report = session.render(renderer=counting, progress=events.append)
    assert sorted(counting.keys) == sorted(to_render)
    assert (report.rendered, report.cached) == (5, 1)
    stored = [k for e in events for k in e.keys]
    assert sorted(stored) == sorted(to_render)  # each stored frame is told once, with its key
    assert [e.stage for e in events][-1] == "outputs" and events[-1].done == events[-1].total == 6
    assert {e.stage for e in events[:-1]} == {"frames"}
    assert all(f.cached for f in session.status())
    # A third run renders nothing and never builds a renderer.
    again = _open(edited, tmp_path).render(renderer=lambda setup: pytest.fail("nothing to render"))
    assert (again.rendered, again.cached) == (0, 6)


def test_an_injected_renderer_object_is_used_as_is(tmp_path: Path) -> None:
    from PIL import Image

    class Flat:
        encoded = 0

        def __init__(self) -> None:
            self.calls = 0

        def render_batch(self, jobs: list[Any]) -> list[Any]:
            self.calls += 1
            return [Image.new("RGB", (32, 32), (10, 20, 30))] * len(jobs)

    flat = Flat()
    session = _open(WALK, tmp_path)
    report = session.render(renderer=flat)
    assert report.rendered == 4 and flat.calls >= 1
    assert session.frames()[2].getpixel((5, 5)) == (10, 20, 30)


def test_problems_are_the_located_problems_the_cli_prints(tmp_path: Path) -> None:
    bad = {**MORPH, "steps": 0, "fsp": 3}
    session = _open(bad, tmp_path)
    problems = session.problems
    assert all(isinstance(p, Problem) for p in problems)
    messages = [p.message for p in problems]
    assert any("steps" in m for m in messages) and any("unknown key 'fsp'" in m for m in messages)
    assert all(str(p).startswith("<dict scene>:") for p in problems)
    with pytest.raises(InputError) as exc:
        session.plan()
    assert exc.value.problems == problems
    assert not (tmp_path / "cache").exists()  # nothing written


def test_option_problems_and_an_unknown_model_are_problems_too(tmp_path: Path) -> None:
    session = pipeline.open(MORPH, base_dir=tmp_path, device="tpu", batch_size=0)
    assert [str(p).split(":")[0] for p in session.problems] == ["--device", "--batch-size"]
    unknown = _open({**MORPH, "model": "./no-such-folder"}, tmp_path)
    assert len(unknown.problems) == 1 and "no-such-folder" in str(unknown.problems[0])


def test_frames_before_rendering_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(pipeline.RenderError, match="render the scene first"):
        _open(WALK, tmp_path).frames()


def test_python_dash_m_pipeline_works_like_render_py(tmp_path: Path) -> None:
    scene = tmp_path / "s.yaml"
    import yaml

    scene.write_text(yaml.safe_dump(MORPH))
    for cmd in ([sys.executable, "-m", "pipeline"], [sys.executable, "render.py"]):
        done = subprocess.run(
            [*cmd, str(scene), "--plan", "--cache-dir", str(tmp_path / "c")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().endswith("0 cached, 6 to render")


def test_help_version_and_usage_lines() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "render.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
        )

    short = run("-h")
    assert short.returncode == 0 and "Usage: python render.py" in short.stdout
    render_help = run("render", "--help").stdout
    assert "SCENE_FILE" in render_help and "{scene_file}" not in render_help
    assert "<bool>" not in render_help and "--allow-outside-inputs" in render_help
    version = run("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"sd-scenes {pipeline.__version__}"
    module = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert module.returncode == 0 and "Usage: python -m pipeline.cli" in module.stdout


def test_the_data_stages_import_no_torch() -> None:
    """Every module of scene/, plan/, store/, outputs/ and audio/, the mode table, the API and the
    CLI import without torch (a no-op re-run and --plan never pay for it)."""
    light = [
        "pipeline",
        "pipeline.app",
        "pipeline.cli",
        "pipeline.modes",
        "pipeline.plantable",
        "pipeline.api_base",
    ]
    for package in ("scene", "plan", "store", "outputs", "audio"):
        light += [f"pipeline.{package}.{f.stem}" for f in sorted((ROOT / "pipeline" / package).glob("*.py"))]
    assert len(light) > 40  # the packages were found
    code = (
        f"import sys, importlib; [importlib.import_module(m) for m in {light!r}]; import pipeline; pipeline.open; "
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_no_module_is_over_about_450_lines() -> None:
    """Issue 9's house rule: a module a newcomer can read in one sitting (450 lines, give or take ten)."""
    sizes = {
        str(f.relative_to(ROOT)): len(f.read_text().splitlines()) for f in (ROOT / "pipeline").rglob("*.py")
    }
    assert len(sizes) > 60
    over = {f: n for f, n in sizes.items() if n > 460}
    assert not over, over


def test_default_cache_is_the_checkout_folder_or_the_user_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    assert paths.in_checkout()
    assert paths.default_cache_dir() == ROOT / "cache"
    monkeypatch.setattr(paths, "in_checkout", lambda: False)
    import platformdirs

    installed = paths.default_cache_dir()
    assert installed == Path(platformdirs.user_cache_dir("sd-scenes", appauthor=False))
    assert "site-packages" not in str(installed)


def test_first_run_bootstrap_decides_where_to_run() -> None:
    from pipeline.bootstrap import action

    # Inside .venv: run when the set-up matches pyproject/constraints/setup.sh, else set up again.
    assert action(in_venv=True, has_deps=True, current=True) == "run"
    assert action(in_venv=True, has_deps=True, current=False) == "setup"
    assert action(in_venv=True, has_deps=False, current=True) == "setup"
    # Elsewhere: the user's own environment with the dependencies is left alone.
    assert action(in_venv=False, has_deps=True, current=False) == "run"
    assert action(in_venv=False, has_deps=False, current=True) == "exec"
    assert action(in_venv=False, has_deps=False, current=False) == "setup"


def test_the_setup_stamp_is_the_same_digest_in_python_and_in_the_shell() -> None:
    from pipeline.bootstrap import setup_digest

    shell = subprocess.run(
        ["bash", "-c", "cat pyproject.toml constraints.txt setup.sh | sha256sum | cut -d' ' -f1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert shell.stdout.strip() == setup_digest()
    assert "sd-scenes-setup" in (ROOT / "setup.sh").read_text()
    assert "sd-scenes-setup" in (ROOT / "test.sh").read_text()


def test_no_file_cites_a_document_that_is_not_in_the_repository() -> None:
    # The sources are named by their titles (the Keras example, the Hugging Face course ...).
    files = [ROOT / "README.md", *sorted((ROOT / "scenes").glob("*.yaml"))]
    assert [f.name for f in files if "seeds.md" in f.read_text()] == []


def test_threads_are_set_for_cpu_renders_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from pipeline.cpu import choose_threads

    assert choose_threads(None) is None  # tests/conftest.py sets OMP_NUM_THREADS: it is obeyed
    monkeypatch.delenv("OMP_NUM_THREADS")

    before = torch.get_num_threads()
    try:
        report = _open(WALK, tmp_path, threads=1).render()
        assert report.threads == 1 and torch.get_num_threads() == 1
        # auto: the physical cores not busy with other work, at least 1 and at most all of them
        from pipeline.cpu import free_cores

        auto = _open(WALK, tmp_path / "auto").render()
        assert auto.threads is not None and 1 <= auto.threads <= (os.cpu_count() or 1)
        assert 1 <= free_cores() <= (os.cpu_count() or 1)
        cached = _open(WALK, tmp_path, threads=1).render()
        assert cached.threads is None  # nothing rendered: torch was not touched
    finally:
        torch.set_num_threads(before)
    bad = _open(WALK, tmp_path, threads=-1).problems
    assert [str(p).split(":")[0] for p in bad] == ["--threads"]


def test_output_option_and_model_problems_come_in_one_report(tmp_path: Path) -> None:
    bad = {**MORPH, "model": "tiny-inpaint", "outputs": ["f/", "f/frame_00000.png"]}
    problems = [str(p) for p in _open(bad, tmp_path, batch_size=0).problems]
    assert any("--batch-size" in p for p in problems)
    assert any("f/frame_00000.png" in p for p in problems)  # inside the frames folder f/
    assert any("mode txt2img is not possible" in p for p in problems)  # the model check ran too


def test_a_session_rendered_again_after_an_input_edit_uses_the_new_content(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "in.png")
    scene = {**WALK, "mode": "img2img", "init_image": "in.png", "strength": 0.5}
    session = _open(scene, tmp_path)
    first = session.render()
    assert first.rendered == 4
    Image.new("RGB", (32, 32), (30, 30, 200)).save(tmp_path / "in.png")
    again = session.render()  # the same session: re-planned with the edited image
    assert (again.rendered, again.cached) == (4, 0)
    assert _open(scene, tmp_path).render().rendered == 0  # and those frames are the new image's


def test_a_scene_built_through_its_constructor_has_its_timeline(make_env: Any) -> None:
    import pydantic

    from pipeline.plan.planner import plan
    from pipeline.scene.core import Scene

    morph = Scene.model_validate({"keyframes": [{"frame": 0, "prompt": "a"}, {"frame": 4, "prompt": "b"}]})
    assert (morph.total_frames, morph.keyframe_frames) == (5, [0, 4])
    assert [j.frame for j in plan(morph, make_env())] == [0, 1, 2, 3, 4]
    walk = Scene(walk={"prompt": "a dog", "frames": 3})
    assert len(plan(walk, make_env())) == 3  # it planned 0 frames without a word before
    with pytest.raises(pydantic.ValidationError, match="increasing frame order"):
        Scene.model_validate({"keyframes": [{"frame": 3, "prompt": "a"}, {"frame": 1, "prompt": "b"}]})


def test_only_the_random_embedded_models_get_the_random_weights_note() -> None:
    from pipeline.render.models import resolve_model

    assert resolve_model("tiny", ROOT).has_random_weights
    demo = resolve_model("demo", ROOT)
    assert demo.is_embedded and not demo.has_random_weights  # trained: it draws its prompts
