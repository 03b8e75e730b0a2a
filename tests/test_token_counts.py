"""Token counts of long prompts are remembered in the cache's file-hash memo, so that a no-op re-run
plans without reading the tokenizer, with the same keys (pipeline.plan.prompts.token_counts)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import pipeline.plan.embeddings
import pipeline.plan.prompts
from pipeline.plan.planner import plan
from pipeline.render.environment import resolve_env
from pipeline.scene.load import load_scene

# 156 non-space characters but 38 tokens (the dog_cat example): not long, only counting tells.
SHORT = (
    "A cute dog in a beautiful field of lavander colorful flowers everywhere, perfect lighting, leica "
    "summicron 35mm f2.0, kodak portra 400, film grain"
)
LONG = "a dog on a hill, " + "cat " * 100  # 106 tokens


def _scene(folder: Path) -> Any:
    path = folder / "scene.yaml"
    path.write_text(
        f"model: tiny\nsize: [32, 32]\nsteps: 2\nframes: 3\nnegative_prompt: {LONG!r}\n"
        f"keyframes:\n  - {{frame: 0, prompt: {SHORT!r}}}\n  - {{frame: 2, prompt: a cat}}\n"
    )
    return load_scene(path)


def _no_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(folder: object) -> None:
        raise AssertionError("the tokenizer was read")

    monkeypatch.setattr(pipeline.plan.prompts, "load_tokenizer", refuse)
    monkeypatch.setattr(pipeline.plan.embeddings, "load_tokenizer", refuse)


def test_counts_are_remembered_and_keys_stay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scene = _scene(tmp_path)
    counted = plan(scene, resolve_env(scene, device="cpu"))  # no memo: the planner counts
    memo: dict[str, Any] = {}
    env = resolve_env(scene, device="cpu", memo=memo)
    assert env.token_counts == {SHORT: 38, LONG: 106}  # "a cat" may not be long: never counted
    assert sorted(v for k, v in memo.items() if k.startswith("tokens ")) == [38, 106]

    _no_tokenizer(monkeypatch)  # the next run: every count is in the memo
    again = plan(scene, resolve_env(scene, device="cpu", memo=dict(memo)))
    assert [j.key for j in again] == [j.key for j in counted]
    assert again.embeddings == counted.embeddings
    prompts = {r["text"]: "prompts" in r for r in again.embeddings.values()}
    assert prompts == {SHORT: False, LONG: True, "a cat": False}


def test_the_memo_is_what_decides(tmp_path: Path) -> None:
    scene = _scene(tmp_path)
    memo: dict[str, Any] = {}
    env = resolve_env(scene, device="cpu", memo=memo)
    for k in [k for k in memo if k.startswith("tokens ")]:
        memo[k] = 200  # as if every text were long
    wrong = resolve_env(scene, device="cpu", memo=memo)
    assert wrong.token_counts == {SHORT: 200, LONG: 200}
    by_text = {r["text"]: "prompts" in r for r in plan(scene, wrong).embeddings.values()}
    assert by_text[SHORT] is True
    # Counts belong to the env's tokenizer: without one the planner cannot count, whatever they say.
    assert plan(scene, replace(env, tokenizer=None)).embeddings != plan(scene, env).embeddings


def test_a_memo_entry_that_is_not_a_count_is_counted_again(tmp_path: Path) -> None:
    scene = _scene(tmp_path)
    memo: dict[str, Any] = {}
    resolve_env(scene, device="cpu", memo=memo)
    for k in [k for k in memo if k.startswith("tokens ")]:
        memo[k] = "38"  # the memo lives in the cache: untrusted
    assert resolve_env(scene, device="cpu", memo=memo).token_counts == {SHORT: 38, LONG: 106}


def test_a_no_op_rerun_never_reads_the_tokenizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import run_render

    scene = _scene(tmp_path)
    first = run_render(scene.path, tmp_path / "cache", "--frames", "0")
    assert first["rendered"] == 1
    _no_tokenizer(monkeypatch)
    again = run_render(scene.path, tmp_path / "cache", "--frames", "0")
    assert (again["rendered"], again["cached"]) == (0, 1)
