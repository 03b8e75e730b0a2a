"""Shared fixtures: a hand-built RenderEnv and planning of scene text, with no model and no disk."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.plan.planner import Plan, plan
from pipeline.render.environment import RenderEnv
from pipeline.scene.load import parse_scene

ENV_DEFAULTS: dict[str, Any] = {
    "model": "tiny",
    "pipeline_class": "StableDiffusionPipeline",
    "family": "sd",
    "fingerprint": {"unet": "unet-1", "vae": "vae-1", "text_encoder": "te-1", "tokenizer": "tok-1"},
    "scheduler_config": {
        "_class_name": "PNDMScheduler",
        "num_train_timesteps": 1000,
        "beta_schedule": "linear",
    },
    "device": "cpu",
    "dtype": "float32",
    "libraries": {"torch": "2.4.0", "diffusers": "0.30.0", "transformers": "4.44.0"},
}


@pytest.fixture
def make_env() -> Callable[..., RenderEnv]:
    """``make_env(device="cuda", ...)``: the default test env with some fields replaced."""

    def make(**changes: Any) -> RenderEnv:
        return RenderEnv(**{**ENV_DEFAULTS, **changes})

    return make


@pytest.fixture
def plan_text(make_env: Callable[..., RenderEnv]) -> Callable[..., Plan]:
    """``plan_text(yaml_text, env=None, base_path=None)``: validate scene text and plan it."""

    def run(text: str, env: RenderEnv | None = None, *, base_path: Path | None = None) -> Plan:
        scene = parse_scene(text, "scene.yaml", base_path=base_path)
        return plan(scene, env or make_env())

    return run


def run_render(scene: Path, cache: Path, *extra: str, progress: Any = None) -> dict[str, Any]:
    """Render ``scene`` through the real CLI in this process; returns its ``--report`` JSON.

    ``progress`` is handed to the API (``pipeline.cli.main(progress=...)``)."""
    import json

    from pipeline.cli import main

    report = scene.parent / "report.json"
    with pytest.raises(SystemExit) as exc:
        main(
            [str(scene), "--cache-dir", str(cache), "--report", str(report), "-q", *extra], progress=progress
        )
    assert exc.value.code in (0, None), f"render exited with {exc.value.code}"
    return json.loads(report.read_text())


def pytest_configure(config: pytest.Config) -> None:
    """One CPU thread for torch, here and in every child process the tests start.

    float32 reductions are summed in a thread-dependent order, so a frame's pixels can differ by 1
    level between thread counts, and a feedback chain amplifies that frame after frame
    (``bench/feedback_drift.py``). One thread makes the suite give the same numbers on any machine
    size. This runs before the test modules are imported; torch is set directly in case a plugin
    imported it already.
    """
    import sys

    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu`` tests run only where CUDA is there; ``network`` tests only with SD_SCENES_NETWORK=1."""
    import importlib.util
    import os

    has_cuda = False
    if importlib.util.find_spec("torch") is not None and any(
        item.get_closest_marker("gpu") for item in items
    ):
        import torch

        has_cuda = torch.cuda.is_available()
    for item in items:
        if item.get_closest_marker("gpu") and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if item.get_closest_marker("network") and os.environ.get("SD_SCENES_NETWORK") != "1":
            item.add_marker(pytest.mark.skip(reason="needs a model download; set SD_SCENES_NETWORK=1"))


class CountingRenderer:
    """A renderer factory for ``Session.render(renderer=...)``: wraps the real renderer (so the real
    path renders) and records every frame key it is asked for, in order."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def __call__(self, setup: Any) -> Any:
        real = setup.default()
        outer = self

        class Wrapped:
            @property
            def encoded(self) -> int:
                return real.encoded

            def render_batch(self, jobs: list[Any]) -> list[Any]:
                outer.keys += [job.key for job in jobs]
                return real.render_batch(jobs)

        return Wrapped()
