"""Typed views of a frame's recipe (pipeline.plan.recipe): they read back every field the planner writes."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest
from PIL import Image

from pipeline.plan.recipe import Cond, ModeSpec, Noise, Recipe
from tests.test_planner import LORA_BYTES, VARIED


def _cond(c: Cond) -> dict[str, Any]:
    if c.kind == "grid":
        d: dict[str, Any] = {"grid": list(c.corners), "u": c.u, "v": c.v, "method": c.method}
        if c.whole_rows is not None:
            d["whole_rows"] = c.whole_rows
        return d
    if c.kind == "walk":
        return {"a": c.a, "walk": {"offset": c.walk_offset, "direction": c.walk_direction}}
    if c.kind == "morph":
        return {"a": c.a, "b": c.b, "t": c.t, "method": c.method}
    return {"a": c.a}


def _noise(n: Noise) -> dict[str, Any]:
    if n.kind == "circle":
        return {"circle": list(n.circle), "s": n.s}
    if n.kind == "travel":
        return {"seed": n.seed, "to": n.to, "t": n.t}
    return {"seed": n.seed}


def _mode(m: ModeSpec) -> dict[str, Any]:
    d: dict[str, Any] = {"mode": m.name}
    d.update((k, v) for k, v in (("init", m.init), ("mask", m.mask), ("depth", m.depth)) if v is not None)
    if m.name == "feedback":
        d["prev"] = m.prev
    return d


def rebuilt(r: Recipe) -> dict[str, Any]:
    """The recipe dict, made from nothing but what the view says."""
    d = {
        "cond": _cond(r.cond),
        "noise": _noise(r.noise),
        "scalars": {**r.scalars, **({"lora": dict(r.lora)} if r.lora else {})},
        "mode": _mode(r.mode),
    }
    if r.neg is not None:
        d["neg"] = _cond(r.neg)
    return d


@pytest.fixture
def planned(plan_text, make_env, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "init.png")
    Image.new("L", (8, 8), 255).save(tmp_path / "mask.png")
    (tmp_path / "style.safetensors").write_bytes(LORA_BYTES)
    files = {"init.png": "init-hash", "mask.png": "mask-hash", "style.safetensors": "lora-hash"}
    return lambda name: plan_text(
        textwrap.dedent(VARIED[name]), make_env(files=files), base_path=tmp_path / "s.yaml"
    )


def test_views_read_back_every_recipe(planned) -> None:
    kinds: set[tuple[str, str]] = set()
    for name in sorted(VARIED):
        p = planned(name)
        for job in p:
            r = job.view
            assert rebuilt(r) == job.recipe, (name, job.frame)
            assert r.all_scalars == job.recipe["scalars"]
            assert r.guidance == job.recipe["scalars"]["guidance"]
            assert set(r.embedding_keys()) <= set(p.embeddings)
            assert r.mode.starts_chain == (r.mode.name == "feedback" and r.mode.prev is None)
            kinds |= {("cond", r.cond.kind), ("noise", r.noise.kind), ("mode", r.mode.name)}
            kinds |= {("neg", r.neg.kind)} if r.neg is not None else set()
    assert kinds >= {
        *(("cond", k) for k in ("prompt", "morph", "walk", "grid")),
        *(("noise", k) for k in ("seed", "travel", "circle")),
        *(("mode", k) for k in ("txt2img", "img2img", "inpaint", "feedback")),
        ("neg", "morph"),
    }


def test_a_view_copies_nothing(planned) -> None:
    job = planned("modes change")[12]
    r = job.view
    assert r.raw is job.recipe and r.cond.raw is job.recipe["cond"] and r.noise.raw is job.recipe["noise"]
    assert r.cond.a is job.recipe["cond"]["a"]
    assert r.lora == {"style": job.recipe["scalars"]["lora"]["style"]} and "lora" not in r.scalars
    assert job.view == r and job.view is not r  # made on demand, equal by content
    with pytest.raises(TypeError):
        hash(r)


def test_views_of_hand_written_recipes() -> None:
    r = Recipe(
        {
            "cond": {
                "grid": ["k1", "k2", "k3", "k4"],
                "u": 0.5,
                "v": 0.25,
                "method": "rows",
                "whole_rows": 4,
            },
            "noise": {"circle": [3, 4], "s": 0.125},
            "scalars": {"guidance": 7.5},
            "mode": {"mode": "depth2img", "depth": "estimated", "init": "h"},
        }
    )
    assert (r.cond.kind, r.cond.corners, r.cond.whole_rows, r.cond.embedding_keys()) == (
        "grid",
        ["k1", "k2", "k3", "k4"],
        4,
        ["k1", "k2", "k3", "k4"],
    )
    assert (r.noise.kind, r.noise.circle, r.noise.s) == ("circle", (3, 4), 0.125)
    assert (r.mode.name, r.mode.depth, r.mode.prev, r.mode.inputs()) == (
        "depth2img",
        "estimated",
        None,
        {"mode": "depth2img", "depth": "estimated", "init": "h"},
    )
    assert r.neg is None and r.lora == {} and r.guidance == 7.5
    morph = Cond({"a": [["x", 1.0]], "b": [["y", 0.5], ["z", 0.5]], "t": 0.3, "method": "lerp"})
    assert (morph.kind, morph.t, morph.method, morph.embedding_keys()) == (
        "morph",
        0.3,
        "lerp",
        ["x", "y", "z"],
    )
    assert Noise({"seed": 7, "to": 9, "t": 0.5}).kind == "travel" and Noise({"seed": 7}).to is None
