"""Tests for pipeline.plan.planner: tracks, curves, hold, scalars, noise kinds, walks, grids, feedback, keys.

Every scene here is planned with a hand-built RenderEnv (tests/conftest.py): no model, no disk.
Expected floats are literals; a recipe holds them rounded to 10 significant digits (pipeline.plan.keys).
"""

from __future__ import annotations

import gc
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import ClassVar

import pytest
from PIL import Image

import pipeline.plan.planner
from pipeline.plan.curves import ease_in_out_sine
from pipeline.plan.keys import KeyTemplate, canonical_json, key_of
from pipeline.plan.planner import Plan

ROOT = Path(__file__).resolve().parents[1]
# The smallest file that passes as LoRA weights (scene validation reads a safetensors header):
# one float32 tensor of one element, named as LoRA tensors are.
_LORA_HEADER = b'{"w.lora_A.weight":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
LORA_BYTES = len(_LORA_HEADER).to_bytes(8, "little") + _LORA_HEADER + bytes(4)

TWO_KEYS = """
seed: 3
keyframes:
  - {frame: 0, prompt: a dog}
  - {frame: 10, prompt: a cat, curve: "CURVE"}
"""


def texts(p: Plan, blend: list[list[object]]) -> list[tuple[str, float]]:
    """A conditioning blend as (prompt text, weight) pairs."""
    return [(p.text(str(k)), float(w)) for k, w in blend]  # type: ignore[arg-type]


def cond_texts(p: Plan, n: int) -> dict[str, object]:
    """Frame n's cond with embedding keys replaced by their texts (for readable asserts)."""
    cond = dict(p[n].recipe["cond"])
    for side in ("a", "b"):
        if side in cond:
            cond[side] = texts(p, cond[side])
    return cond


def keys(p: Plan) -> list[str]:
    return [j.key for j in p]


# -- keyframes and eased t -----------------------------------------------------------------------


def test_frame_on_a_keyframe_depends_on_that_keyframe_alone(plan_text):
    scene = """
    keyframes:
      - {frame: 0, prompt: a dog}
      - {frame: 10, prompt: PROMPT}
      - {frame: 20, prompt: a cow}
    """
    p = plan_text(textwrap.dedent(scene.replace("PROMPT", "a cat")))
    for n, text in ((0, "a dog"), (10, "a cat"), (20, "a cow")):
        cond = p[n].recipe["cond"]
        assert set(cond) == {"a"}, n
        assert texts(p, cond["a"]) == [(text, 1.0)]
        assert cond["a"] == [[_key_of_text(p, text), 1.0]]
    # In-between frames name both keyframes, t and the method.
    assert cond_texts(p, 15) == {"a": [("a cat", 1.0)], "b": [("a cow", 1.0)], "t": 0.5, "method": "slerp"}
    # Changing keyframe 10's prompt leaves the other keyframes' frames alone.
    q = plan_text(textwrap.dedent(scene.replace("PROMPT", "a fox")))
    assert q[0].key == p[0].key
    assert q[20].key == p[20].key
    assert q[10].key != p[10].key
    assert [n for n in range(21) if p[n].key != q[n].key] == list(range(1, 20))


def _key_of_text(p: Plan, text: str) -> str:
    (found,) = [k for k, v in p.embeddings.items() if v["text"] == text]
    return found


EASED_T = {
    "linear": {1: 0.1, 3: 0.3, 5: 0.5, 7: 0.7, 9: 0.9},
    "ease_in_quad": {1: 0.01, 2: 0.04, 5: 0.25, 7: 0.49, 9: 0.81},
    "ease_out_cubic": {1: 0.271, 5: 0.875, 9: 0.999},
    "ease_in_out_sine": {1: 0.02447174185, 2: 0.09549150281, 5: 0.5, 8: 0.9045084972},
    "cubic_bezier(0.42, 0, 0.58, 1)": {1: 0.01972245355, 3: 0.1873959067, 5: 0.5, 9: 0.9802775465},
    # back overshoots below 0 on purpose: t may be negative.
    "ease_in_back": {2: -0.04645056, 5: -0.0876975, 8: 0.29419776},
}


@pytest.mark.parametrize("curve", sorted(EASED_T))
def test_eased_t_literals(plan_text, curve):
    p = plan_text(TWO_KEYS.replace("CURVE", curve))
    assert len(p) == 11
    for n, t in EASED_T[curve].items():
        cond = p[n].recipe["cond"]
        assert cond["t"] == t, (curve, n, cond["t"])
        assert texts(p, cond["a"]) == [("a dog", 1.0)]
        assert texts(p, cond["b"]) == [("a cat", 1.0)]
    assert set(p[0].recipe["cond"]) == {"a"}
    assert set(p[10].recipe["cond"]) == {"a"}


def test_ease_in_out_sine_t_is_the_curve_value_rounded():
    # The planner's t for frame 2 of 0..10 is ease_in_out_sine(0.2), rounded to 10 significant digits.
    assert ease_in_out_sine(0.2) == 0.09549150281252627
    assert math.isclose(0.09549150281, ease_in_out_sine(0.2), rel_tol=1e-10)
    assert ease_in_out_sine(0.5) == 0.5


@pytest.mark.parametrize("curve", ["step", "hold"])
def test_step_and_hold_curves_keep_the_earlier_keyframe(plan_text, curve):
    p = plan_text(TWO_KEYS.replace("CURVE", curve))
    for n in range(10):
        assert cond_texts(p, n) == {"a": [("a dog", 1.0)]}, n
    assert cond_texts(p, 10) == {"a": [("a cat", 1.0)]}
    # Those frames are the same image as frame 0: same key.
    assert len(set(keys(p)[:10])) == 1


def test_scene_curve_is_the_default_for_keyframes_without_one(plan_text):
    p = plan_text(
        """
        curve: ease_in_quad
        keyframes:
          - {frame: 0, prompt: a dog}
          - {frame: 10, prompt: a cat}
          - {frame: 20, prompt: a cow, curve: linear}
        """
    )
    assert [p[n].recipe["cond"]["t"] for n in (1, 5, 7)] == [0.01, 0.25, 0.49]
    assert [p[n].recipe["cond"]["t"] for n in (11, 15, 17)] == [0.1, 0.5, 0.7]


def test_lerp_method_is_named_in_between_only(plan_text):
    p = plan_text(TWO_KEYS.replace("CURVE", "linear").replace("seed: 3", "interpolation: lerp"))
    assert p[4].recipe["cond"]["method"] == "lerp"
    assert "method" not in p[0].recipe["cond"]


# -- hold ----------------------------------------------------------------------------------------


def test_hold_keeps_prompt_and_scalars_until_the_next_keyframe(plan_text):
    p = plan_text(
        """
        guidance: 5
        keyframes:
          - {frame: 0, prompt: a dog, hold: true}
          - {frame: 4, prompt: a cat, guidance: 9}
          - {frame: 8, prompt: a cow, guidance: 1}
        """
    )
    guidance = [j.recipe["scalars"]["guidance"] for j in p]
    assert guidance == [5.0, 5.0, 5.0, 5.0, 9.0, 7.0, 5.0, 3.0, 1.0]
    for n in range(4):
        assert cond_texts(p, n) == {"a": [("a dog", 1.0)]}, n
    assert cond_texts(p, 4) == {"a": [("a cat", 1.0)]}
    assert [p[n].recipe["cond"]["t"] for n in (5, 6, 7)] == [0.25, 0.5, 0.75]
    assert cond_texts(p, 8) == {"a": [("a cow", 1.0)]}
    assert keys(p)[:4] == [p[0].key] * 4


def test_hold_on_a_middle_keyframe(plan_text):
    p = plan_text(
        """
        keyframes:
          - {frame: 0, prompt: a dog, guidance: 2}
          - {frame: 4, prompt: a cat, guidance: 6, hold: true}
          - {frame: 8, prompt: a cow, guidance: 10}
        """
    )
    assert [j.recipe["scalars"]["guidance"] for j in p] == [2.0, 3.0, 4.0, 5.0, 6.0, 6.0, 6.0, 6.0, 10.0]
    assert cond_texts(p, 2) == {"a": [("a dog", 1.0)], "b": [("a cat", 1.0)], "t": 0.5, "method": "slerp"}
    for n in range(4, 8):
        assert cond_texts(p, n) == {"a": [("a cat", 1.0)]}, n
    assert cond_texts(p, 8) == {"a": [("a cow", 1.0)]}


# -- scalars -------------------------------------------------------------------------------------


def test_scalar_tracks_pinned_per_frame(plan_text):
    # Guidance is set at 4 and 10 only: the top-level 5 is its value at frame 0; keyframes 8 and 12
    # (prompt only) are not on the guidance track, so 4 -> 10 is one segment with 10's curve.
    p = plan_text(
        """
        guidance: 5
        frames: 15
        keyframes:
          - {frame: 0, prompt: a dog}
          - {frame: 4, prompt: a cat, guidance: 9}
          - {frame: 8, prompt: a cow}
          - {frame: 10, guidance: 1, curve: ease_in_quad}
          - {frame: 12, prompt: a fox}
        """
    )
    guidance = [j.recipe["scalars"]["guidance"] for j in p]
    assert guidance == [
        5.0,
        6.0,
        7.0,
        8.0,
        9.0,
        8.777777778,
        8.111111111,
        7.0,
        5.444444445,
        3.444444445,
        1.0,
        1.0,
        1.0,
        1.0,
        1.0,
    ]
    # The prompt track ignores keyframe 10: 8 -> 12 is linear over 4 frames.
    assert [p[n].recipe["cond"].get("t") for n in (8, 9, 10, 11, 12, 13)] == [
        None,
        0.25,
        0.5,
        0.75,
        None,
        None,
    ]
    # After the last prompt keyframe, the last prompt.
    assert cond_texts(p, 14) == {"a": [("a fox", 1.0)]}
    # Guidance is 1 from frame 10: the negative branch cannot change pixels.
    assert ["neg" in j.recipe for j in p] == [True] * 10 + [False] * 5


def test_keyframe_at_frame_0_overrides_the_top_level_value(plan_text):
    p = plan_text(
        """
        guidance: 5
        keyframes:
          - {frame: 0, prompt: a dog, guidance: 2}
          - {frame: 2, prompt: a cat, guidance: 4}
        """
    )
    assert [j.recipe["scalars"]["guidance"] for j in p] == [2.0, 3.0, 4.0]


def test_top_level_value_is_frame_0_when_the_first_keyframe_is_later(plan_text):
    p = plan_text(
        """
        guidance: 3
        keyframes:
          - {frame: 2, prompt: a dog}
          - {frame: 4, prompt: a cat, guidance: 7}
        """
    )
    # Guidance: 3 at frame 0 (top level), 7 at frame 4.
    assert [j.recipe["scalars"]["guidance"] for j in p] == [3.0, 4.0, 5.0, 6.0, 7.0]
    # Before the prompt track's first keyframe its first value holds.
    for n in range(3):
        assert cond_texts(p, n) == {"a": [("a dog", 1.0)]}, n
    assert p[0].recipe["cond"] == p[2].recipe["cond"]


def test_value_never_written_at_the_top_level_holds_its_first_keyframe_value(plan_text):
    # No top-level guidance: frames 0-9 hold keyframe 10's 5 (as Deforum and Parseq do), rather than
    # easing from the built-in 7.5 into it.
    p = plan_text(
        """
        frames: 24
        keyframes:
          - {frame: 0, prompt: a dog}
          - {frame: 10, guidance: 5}
          - {frame: 20, guidance: 9}
        """
    )
    guidance = [j.recipe["scalars"]["guidance"] for j in p]
    assert guidance == [5.0] * 11 + [5.4, 5.8, 6.2, 6.6, 7.0, 7.4, 7.8, 8.2, 8.6] + [9.0] * 4
    # Written at the top level, even with its default value, it is the value at frame 0.
    written = plan_text(
        """
        guidance: 7.5
        frames: 11
        keyframes:
          - {frame: 0, prompt: a dog}
          - {frame: 10, guidance: 5}
        """
    )
    assert [j.recipe["scalars"]["guidance"] for j in written] == [
        7.5, 7.25, 7.0, 6.75, 6.5, 6.25, 6.0, 5.75, 5.5, 5.25, 5.0
    ]  # fmt: skip


def test_every_eased_value_holds_before_its_first_keyframe(plan_text, make_env, tmp_path):
    (tmp_path / "s.safetensors").write_bytes(LORA_BYTES)
    env = make_env(files={"s.safetensors": "lora-1"})
    p = plan_text(
        """
        mode: feedback
        noise: travel
        frames: 8
        loras: [{path: s.safetensors, name: s}]
        keyframes:
          - {frame: 0, prompt: a dog}
          - {frame: 4, negative_prompt: blurry, seed: 7, strength: 0.5, zoom: 1.1, angle: 3,
             translate_x: 2, translate_y: -2, lora: {s: 0.5}}
          - {frame: 6, seed: 9, zoom: 1.3, lora: {s: 1.0}}
        """,
        env,
        base_path=tmp_path / "s.yaml",
    )
    for n in range(5):  # frames 0-4: keyframe 4's values exactly
        r = p[n].recipe
        assert r["noise"] == {"seed": 7}, n
        assert r["scalars"] == {
            "guidance": 7.5,
            "strength": 0.5,
            "zoom": 1.1,
            "angle": 3.0,
            "translate_x": 2.0,
            "translate_y": -2.0,
            "lora": {"s": 0.5},
        }, n
        assert [(p.text(k), w) for k, w in r["neg"]["a"]] == [("blurry", 1.0)], n
        assert "b" not in r["neg"], n
    assert p[5].recipe["noise"] == {"seed": 7, "to": 9, "t": 0.5}
    assert (p[5].recipe["scalars"]["zoom"], p[5].recipe["scalars"]["lora"]) == (1.2, {"s": 0.75})
    assert p[7].recipe["scalars"]["zoom"] == 1.3


def test_modes_and_inputs_keep_the_top_level_value_until_a_keyframe_sets_them(plan_text, make_env, tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "init.png")
    p = plan_text(
        """
        frames: 4
        keyframes:
          - {frame: 0, prompt: a dog}
          - {frame: 2, mode: img2img, init_image: init.png, strength: 0.5}
        """,
        make_env(files={"init.png": "init-1"}),
        base_path=tmp_path / "s.yaml",
    )
    assert [j.recipe["mode"]["mode"] for j in p] == ["txt2img", "txt2img", "img2img", "img2img"]
    # strength is keyed only in img2img frames, where it is keyframe 2's.
    assert [j.recipe["scalars"].get("strength") for j in p] == [None, None, 0.5, 0.5]


def test_strength_is_keyed_only_in_modes_that_use_it(plan_text, make_env, tmp_path):
    txt = "strength: STRENGTH\nkeyframes:\n  - {frame: 0, prompt: a dog}\n  - {frame: 3, prompt: a cat}\n"
    a = plan_text(txt.replace("STRENGTH", "0.3"))
    b = plan_text(txt.replace("STRENGTH", "0.9"))
    assert keys(a) == keys(b)
    assert all(set(j.recipe["scalars"]) == {"guidance"} for j in a)

    Image.new("RGB", (8, 8)).save(tmp_path / "init.png")
    img = "mode: img2img\ninit_image: init.png\n" + txt
    env_files = {"init.png": "hash-of-init"}
    c = plan_text(img.replace("STRENGTH", "0.3"), make_env(files=env_files), base_path=tmp_path / "s.yaml")
    d = plan_text(img.replace("STRENGTH", "0.9"), make_env(files=env_files), base_path=tmp_path / "s.yaml")
    assert [j.recipe["scalars"] for j in c] == [{"guidance": 7.5, "strength": 0.3}] * 4
    assert c[0].recipe["mode"] == {"mode": "img2img", "init": "hash-of-init"}
    assert all(x != y for x, y in zip(keys(c), keys(d), strict=True))


@pytest.mark.parametrize(("guidance", "has_neg"), [(0.0, False), (1.0, False), (1.5, True), (7.5, True)])
def test_negative_branch_only_above_guidance_1(plan_text, guidance, has_neg):
    txt = f"guidance: {guidance}\nnegative_prompt: NEG\nkeyframes:\n  - {{frame: 0, prompt: a dog}}\n"
    a = plan_text(txt.replace("NEG", "blurry"))
    b = plan_text(txt.replace("NEG", "ugly"))
    assert ("neg" in a[0].recipe) is has_neg
    assert (a[0].key != b[0].key) is has_neg
    if has_neg:
        assert texts(a, a[0].recipe["neg"]["a"]) == [("blurry", 1.0)]


# -- noise ---------------------------------------------------------------------------------------


def _noise(plan_text, noise: str, frames: int = 5, extra: str = "") -> list[dict[str, object]]:
    p = plan_text(
        f"seed: 10\nnoise: {noise}\nframes: {frames}\nkeyframes:\n  - {{frame: 0, prompt: a dog}}\n{extra}"
    )
    return [j.recipe["noise"] for j in p]


def test_fixed_noise_is_one_seed(plan_text):
    assert _noise(plan_text, "fixed") == [{"seed": 10}] * 5
    assert _noise(plan_text, "{kind: fixed, seed: 99}") == [{"seed": 99}] * 5


def test_per_frame_noise_is_seed_plus_frame(plan_text):
    assert _noise(plan_text, "per_frame") == [
        {"seed": 10},
        {"seed": 11},
        {"seed": 12},
        {"seed": 13},
        {"seed": 14},
    ]


def test_travel_noise_between_keyframe_seeds(plan_text):
    p = plan_text(
        """
        noise: {kind: travel}
        seed: 7
        keyframes:
          - {frame: 0, prompt: a dog}
          - {frame: 4, seed: 100}
          - {frame: 6, seed: 200, curve: step}
          - {frame: 8, seed: 300, curve: ease_in_quad}
          - {frame: 12, prompt: a cat}
        """
    )
    assert [j.recipe["noise"] for j in p] == [
        {"seed": 7},
        {"seed": 7, "to": 100, "t": 0.25},
        {"seed": 7, "to": 100, "t": 0.5},
        {"seed": 7, "to": 100, "t": 0.75},
        {"seed": 100},
        {"seed": 100},
        {"seed": 200},
        {"seed": 200, "to": 300, "t": 0.25},
        {"seed": 300},
        {"seed": 300},
        {"seed": 300},
        {"seed": 300},
        {"seed": 300},
    ]


def test_circle_noise_without_endpoint_loops(plan_text):
    noise = _noise(plan_text, "{kind: circle, seeds: [3, 9]}")
    assert noise == [{"circle": [3, 9], "s": s} for s in (0.0, 0.2, 0.4, 0.6, 0.8)]


def test_circle_noise_with_endpoint_ends_on_the_first(plan_text):
    noise = _noise(plan_text, "{kind: circle, seeds: [3, 9], endpoint: true}")
    assert noise == [{"circle": [3, 9], "s": s} for s in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert _noise(plan_text, "{kind: circle, seeds: [3, 9], endpoint: true}", frames=1) == [
        {"circle": [3, 9], "s": 0.0}
    ]


def test_circle_noise_thirds_are_rounded(plan_text):
    noise = _noise(plan_text, "{kind: circle, seeds: [1, 2]}", frames=3)
    assert [x["s"] for x in noise] == [0.0, 0.3333333333, 0.6666666667]


# -- walk and grid -------------------------------------------------------------------------------


def test_walk_offsets_and_one_embedding(plan_text):
    p = plan_text("walk: {prompt: a dog, frames: 64, step_size: 0.01}")
    assert len(p) == 64
    (emb,) = {j.recipe["cond"]["a"][0][0] for j in p}
    assert p.text(emb) == "a dog"
    assert p[0].recipe["cond"] == {"a": [[emb, 1.0]], "walk": {"offset": 0.0, "direction": "ones"}}
    pinned = {1: 0.01, 3: 0.03, 29: 0.29, 57: 0.57, 63: 0.63}
    for n, offset in pinned.items():
        assert p[n].recipe["cond"]["walk"]["offset"] == offset
    for j in p:
        assert j.recipe["cond"]["walk"]["offset"] == round(j.frame * 0.01, 10)
        assert j.recipe["noise"] == {"seed": 0}
    assert len(set(keys(p))) == 64


def test_walk_direction_ones_vs_random(plan_text):
    ones = plan_text("walk: {prompt: a dog, frames: 4}")
    rnd = plan_text("walk: {prompt: a dog, frames: 4, direction: random, direction_seed: 5}")
    rnd6 = plan_text("walk: {prompt: a dog, frames: 4, direction: random, direction_seed: 6}")
    assert rnd[1].recipe["cond"]["walk"] == {"offset": 0.01, "direction": {"random": 5}}
    assert all(a != b for a, b in zip(keys(ones), keys(rnd), strict=True))
    assert all(a != b for a, b in zip(keys(rnd), keys(rnd6), strict=True))
    assert ones[1].recipe["cond"]["a"] == rnd[1].recipe["cond"]["a"]


def test_grid_row_major_u_v_and_corners(plan_text):
    p = plan_text("grid: {prompts: [top left, top right, bottom left, bottom right], rows: 3, cols: 4}")
    assert len(p) == 12
    corners = p[0].recipe["cond"]["grid"]
    assert [p.text(k) for k in corners] == ["top left", "top right", "bottom left", "bottom right"]
    us = [0.0, 0.3333333333, 0.6666666667, 1.0]
    vs = [0.0, 0.5, 1.0]
    for j in p:
        row, col = divmod(j.frame, 4)
        cond = {"grid": corners, "u": us[col], "v": vs[row], "method": "slerp"}
        if row == 1:  # method rows (the default): a middle row is a slice of the slerp of whole rows
            cond["whole_rows"] = 4
        assert j.recipe["cond"] == cond
        assert j.recipe["noise"] == {"seed": 0}
    assert len(set(keys(p))) == 12


def test_grid_methods_differ_only_in_middle_rows_and_only_with_slerp(plan_text):
    corners = "prompts: [top left, top right, bottom left, bottom right], rows: 4, cols: 3"
    rows = plan_text(f"grid: {{{corners}}}")
    cells = plan_text(f"grid: {{{corners}, method: cells}}")
    assert [n for n in range(12) if rows[n].key != cells[n].key] == [3, 4, 5, 6, 7, 8]
    assert all("whole_rows" not in j.recipe["cond"] for j in cells)
    assert [j.recipe["cond"].get("whole_rows") for j in rows] == [None] * 3 + [3] * 6 + [None] * 3
    # With lerp there is no angle: rows and cells are the same cells, and the same keys.
    lerp_rows = plan_text(f"interpolation: lerp\ngrid: {{{corners}}}")
    lerp_cells = plan_text(f"interpolation: lerp\ngrid: {{{corners}, method: cells}}")
    assert keys(lerp_rows) == keys(lerp_cells)
    assert all("whole_rows" not in j.recipe["cond"] for j in lerp_rows)


def test_grid_8x8_default_and_per_frame_noise(plan_text):
    fixed = plan_text("grid: {prompts: [a, b, c, d]}")
    assert len(fixed) == 64
    assert fixed[9].recipe["cond"]["u"] == 0.1428571429
    assert fixed[9].recipe["cond"]["v"] == 0.1428571429
    assert (fixed[63].recipe["cond"]["u"], fixed[63].recipe["cond"]["v"]) == (1.0, 1.0)
    assert (fixed[7].recipe["cond"]["u"], fixed[7].recipe["cond"]["v"]) == (1.0, 0.0)
    assert (fixed[56].recipe["cond"]["u"], fixed[56].recipe["cond"]["v"]) == (0.0, 1.0)
    assert {str(j.recipe["noise"]) for j in fixed} == {"{'seed': 0}"}
    per = plan_text("seed: 5\nnoise: per_frame\ngrid: {prompts: [a, b, c, d]}")
    assert [j.recipe["noise"]["seed"] for j in per] == list(range(5, 69))
    assert [j.recipe["cond"] for j in per] == [j.recipe["cond"] for j in fixed]


def test_single_row_or_column_grid(plan_text):
    p = plan_text("grid: {prompts: [a, b, c, d], rows: 1, cols: 3}")
    assert [(j.recipe["cond"]["u"], j.recipe["cond"]["v"]) for j in p] == [(0.0, 0.0), (0.5, 0.0), (1.0, 0.0)]


# -- blends, seconds, fps ------------------------------------------------------------------------


def test_weighted_blends_are_normalised(plan_text):
    p = plan_text(
        """
        keyframes:
          - {frame: 0, prompt: [{text: a dog, weight: 1}, {text: a cat, weight: 2}]}
          - {frame: 2, prompt: [{text: a dog, weight: 3}, {text: a cow, weight: 1}]}
        """
    )
    assert cond_texts(p, 0) == {"a": [("a dog", 0.3333333333), ("a cat", 0.6666666667)]}
    assert cond_texts(p, 1) == {
        "a": [("a dog", 0.3333333333), ("a cat", 0.6666666667)],
        "b": [("a dog", 0.75), ("a cow", 0.25)],
        "t": 0.5,
        "method": "slerp",
    }
    assert cond_texts(p, 2) == {"a": [("a dog", 0.75), ("a cow", 0.25)]}


def test_blend_weights_scale_free(plan_text):
    scene = "keyframes:\n  - {frame: 0, prompt: [{text: a dog, weight: W}, {text: a cat, weight: W}]}\n"
    one = plan_text(scene.replace("W", "1"))
    three = plan_text(scene.replace("W", "3.5"))
    assert one[0].key == three[0].key
    assert cond_texts(one, 0) == {"a": [("a dog", 0.5), ("a cat", 0.5)]}


def test_seconds_become_frames(plan_text):
    sec = plan_text("fps: 12\nkeyframes:\n  - {frame: 0, prompt: a dog}\n  - {frame: 2.5s, prompt: a cat}\n")
    num = plan_text("fps: 12\nkeyframes:\n  - {frame: 0, prompt: a dog}\n  - {frame: 30, prompt: a cat}\n")
    assert len(sec) == 31
    assert cond_texts(sec, 30) == {"a": [("a cat", 1.0)]}
    assert keys(sec) == keys(num)


def test_fps_does_not_change_keys_with_frame_numbers(plan_text):
    scene = "fps: FPS\nkeyframes:\n  - {frame: 0, prompt: a dog}\n  - {frame: 30, prompt: a cat}\n"
    assert keys(plan_text(scene.replace("FPS", "12"))) == keys(plan_text(scene.replace("FPS", "30")))


# -- feedback ------------------------------------------------------------------------------------

FEEDBACK = """
mode: MODE
frames: 35
keyframes:
  - {frame: 0, prompt: a dog}
  - {frame: 10, prompt: a cat}
  - {frame: 20, prompt: PROMPT, curve: step}
  - {frame: 30, prompt: a cow}
"""


def test_feedback_chains_each_frame_to_the_one_before(plan_text):
    p = plan_text(FEEDBACK.replace("MODE", "feedback").replace("PROMPT", "a fox"))
    assert p[0].recipe["mode"] == {"mode": "feedback", "prev": None}
    for n in range(1, 35):
        assert p[n].recipe["mode"]["prev"] == p[n - 1].key
    assert set(p[0].recipe["scalars"]) == {
        "guidance",
        "strength",
        "zoom",
        "angle",
        "translate_x",
        "translate_y",
    }


def test_feedback_edit_changes_every_later_frame_and_none_before(plan_text):
    def changed(mode: str) -> list[int]:
        a = plan_text(FEEDBACK.replace("MODE", mode).replace("PROMPT", "a fox"))
        b = plan_text(FEEDBACK.replace("MODE", mode).replace("PROMPT", "a wolf"))
        return [n for n in range(35) if a[n].key != b[n].key]

    # The step curve makes frame 20 the first that sees keyframe 20's prompt.
    assert changed("feedback") == list(range(20, 35))
    # Without feedback, frames from 30 on depend on keyframe 30 alone.
    assert changed("txt2img") == list(range(20, 30))


# -- embedding keys ------------------------------------------------------------------------------


def test_same_text_same_embedding_key_across_scenes(plan_text):
    a = plan_text(
        "steps: 5\nseed: 1\nkeyframes:\n  - {frame: 0, prompt: a dog}\n  - {frame: 3, prompt: a cat}\n"
    )
    b = plan_text(
        "guidance: 3\nframes: 9\nkeyframes:\n  - {frame: 0, prompt: a cow}\n  - {frame: 6, prompt: a dog}\n"
    )
    assert _key_of_text(a, "a dog") == _key_of_text(b, "a dog")
    assert _key_of_text(a, "a cat") != _key_of_text(a, "a dog")
    assert a[0].key != b[6].key  # same prompt, different scene settings


@pytest.mark.parametrize(
    ("component", "changes_embeddings"),
    [("text_encoder", True), ("tokenizer", True), ("unet", False), ("vae", False)],
)
def test_fingerprints_per_component(plan_text, make_env, component, changes_embeddings):
    scene = "keyframes:\n  - {frame: 0, prompt: a dog}\n  - {frame: 2, prompt: a cat}\n"
    env = make_env()
    other = make_env(fingerprint={**env.fingerprint, component: "something else"})
    a, b = plan_text(scene, env), plan_text(scene, other)
    assert (set(a.embeddings) != set(b.embeddings)) is changes_embeddings
    if not changes_embeddings:
        assert set(a.embeddings) == set(b.embeddings)
    assert all(x != y for x, y in zip(keys(a), keys(b), strict=True))


def test_embedding_table_holds_the_recipe_of_each_key(plan_text):
    p = plan_text("negative_prompt: blurry\nkeyframes:\n  - {frame: 0, prompt: a dog}\n")
    assert {v["text"] for v in p.embeddings.values()} == {"a dog", "blurry"}
    for k, recipe in p.embeddings.items():
        assert key_of(recipe) == k
        assert recipe["encoders"] == {"text_encoder": "te-1", "tokenizer": "tok-1"}


# -- size, purity, the keys' fast path -----------------------------------------------------------


def test_plan_of_100000_frames(plan_text):
    p = plan_text(
        """
        frames: 100000
        keyframes:
          - {frame: 0, prompt: a dog}
          - {frame: 50000, prompt: a cat}
          - {frame: 99999, prompt: a cow, curve: ease_in_out_sine}
        """
    )
    assert len(p) == 100000
    assert p[99999].frame == 99999


def test_planner_does_not_import_torch():
    script = textwrap.dedent(
        """
        import sys
        from pipeline.render.environment import RenderEnv
        from pipeline.plan.planner import plan
        from pipeline.scene.load import parse_scene
        env = RenderEnv(model="tiny", pipeline_class="StableDiffusionPipeline", family="sd",
                        fingerprint={"unet": "u"}, scheduler_config={})
        scene = parse_scene("keyframes:\\n  - {frame: 0, prompt: a dog}\\n  - {frame: 4, prompt: a cat}\\n", "s.yaml")
        assert len(plan(scene, env)) == 5
        print("LOADED", sorted(m for m in ("torch", "diffusers", "transformers", "numpy") if m in sys.modules))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "LOADED []" in out.stdout


VARIED = {
    "two keys": TWO_KEYS.replace("CURVE", "ease_in_out_sine"),
    "hold and scalars": """
        guidance: 5.5
        negative_prompt: blurry
        keyframes:
          - {frame: 0, prompt: a dog, hold: true}
          - {frame: 4, prompt: [{text: a cat, weight: 1}, {text: a fox, weight: 2}], guidance: 9.1}
          - {frame: 9, prompt: a cow, guidance: 1, negative_prompt: ugly, curve: "cubic_bezier(0.1, 0.7, 0.3, 1)"}
          - {frame: 13, guidance: 3.3, curve: ease_in_back}
        frames: 16
        """,
    "travel": """
        noise: travel
        keyframes:
          - {frame: 0, prompt: a dog, seed: 1}
          - {frame: 7, prompt: a cat, seed: 2, curve: ease_out_expo}
        """,
    "circle": "noise: {kind: circle, seeds: [4, 5]}\nframes: 7\nkeyframes:\n  - {frame: 0, prompt: a}\n",
    "walk": "walk: {prompt: a dog, frames: 30, step_size: 0.003, direction: random}",
    "grid": "noise: per_frame\ngrid: {prompts: [a, b, c, d], rows: 3, cols: 7}",
    "feedback": """
        mode: feedback
        zoom: 1.01
        angle: 0.5
        keyframes:
          - {frame: 0, prompt: a dog}
          - {frame: 6, prompt: a cat, zoom: 1.1, angle: -3, translate_x: 0.25, strength: 0.35}
        """,
    # The mode, its inputs, a LoRA scale and the negative branch (guidance crossing 1) all change.
    "modes change": """
        init_image: init.png
        mask: mask.png
        negative_prompt: blurry
        loras: [{path: style.safetensors, name: style, scale: 0.2}]
        keyframes:
          - {frame: 0, prompt: a dog, guidance: 0.5}
          - {frame: 5, mode: img2img, strength: 0.4, guidance: 3, lora: {style: 0.9}}
          - {frame: 9, mode: feedback, zoom: 1.05, prompt: a cat, curve: ease_in_back}
          - {frame: 14, mode: inpaint, guidance: 1, negative_prompt: ugly}
          - {frame: 18, mode: txt2img, prompt: a cow, lora: {style: 0}}
        frames: 22
        """,
    # Eased t within 1e-10 of 1 (ease_out_quint near frame 1000) or exactly 0 (step) rounds onto a
    # keyframe: those frames take one value whole, in the middle of a run of in-between frames.
    "rounds onto keyframes": """
        noise: travel
        keyframes:
          - {frame: 0, prompt: a dog, seed: 1}
          - {frame: 1000, prompt: a cat, seed: 2, guidance: 9, curve: ease_out_quint}
          - {frame: 1100, prompt: a cow, seed: 3, curve: step}
        frames: 1150
        """,
}


@pytest.fixture
def varied_plan(plan_text, make_env, tmp_path):
    """``varied_plan(name)``: plan a VARIED scene, with its input files in a temp folder."""
    Image.new("RGB", (8, 8)).save(tmp_path / "init.png")
    Image.new("L", (8, 8), 255).save(tmp_path / "mask.png")
    (tmp_path / "style.safetensors").write_bytes(LORA_BYTES)
    files = {"init.png": "init-hash", "mask.png": "mask-hash", "style.safetensors": "lora-hash"}
    return lambda name: plan_text(
        textwrap.dedent(VARIED[name]), make_env(files=files), base_path=tmp_path / "s.yaml"
    )


@pytest.mark.parametrize("name", sorted(VARIED))
def test_every_recipe_float_is_already_rounded(varied_plan, name):
    p = varied_plan(name)
    assert len(p) > 1
    for job in p:
        whole = {"base": p.base_key, "frame": job.recipe}
        assert canonical_json(whole) == canonical_json(whole, normalised=True), job.frame
        assert key_of(whole) == key_of(whole, normalised=True) == job.key, job.frame


def test_varied_scenes_reach_what_they_are_for(varied_plan):
    p = varied_plan("modes change")
    assert [p[n].recipe["mode"]["mode"] for n in (0, 5, 9, 13, 14, 18)] == [
        "txt2img", "img2img", "feedback", "feedback", "inpaint", "txt2img"
    ]  # fmt: skip
    assert p[10].recipe["mode"] == {"mode": "feedback", "init": "init-hash", "prev": p[9].key}
    assert p[14].recipe["mode"] == {"mode": "inpaint", "init": "init-hash", "mask": "mask-hash"}
    assert ["neg" in p[n].recipe for n in (0, 4, 5, 13, 14)] == [False, True, True, True, False]
    lora = [p[n].recipe["scalars"]["lora"]["style"] for n in (0, 3, 5, 7, 18)]
    assert lora[0] == 0.2 < lora[1] < lora[2] == 0.9 > lora[3] > lora[4] == 0.0
    q = varied_plan("rounds onto keyframes")
    whole = [n for n in range(1, 1150) if n not in (1000, 1100) and "b" not in q[n].recipe["cond"]]
    assert whole[0] < 1000 < whole[-1]  # some frames before 1000 round onto it, and the step after it
    assert q[999].recipe["cond"] == q[1000].recipe["cond"] and q[999].recipe["noise"] == {"seed": 2}
    assert q[999].key == q[1000].key  # guidance is keyed alike, so frame 999 is frame 1000's image


class _CountingTemplate(KeyTemplate):
    made: ClassVar[list[KeyTemplate]] = []

    def __init__(self, skeleton: object) -> None:
        super().__init__(skeleton)
        _CountingTemplate.made.append(self)


def test_frames_of_one_state_share_a_key_template(plan_text, monkeypatch):
    monkeypatch.setattr(pipeline.plan.planner, "KeyTemplate", _CountingTemplate)
    monkeypatch.setattr(_CountingTemplate, "made", [])
    p = plan_text("frames: 200\nkeyframes:\n  - {frame: 0, prompt: a dog}\n  - {frame: 100, prompt: a cat}\n")
    # Two states: between the keyframes, and on or after the last (frame 0 alone stays a one-off).
    assert len(_CountingTemplate.made) == 2
    assert all(j.key == key_of({"base": p.base_key, "frame": j.recipe}) for j in p)
    # A scene keyed at every frame: frames on keyframes with the same prompt share one template,
    # whatever their seeds and guidance (numbers, not state)...
    _CountingTemplate.made.clear()
    every = "".join(
        f"  - {{frame: {n}, prompt: p{n % 3}, seed: {n}, guidance: {n % 4 + 2}}}\n" for n in range(50)
    )
    q = plan_text("noise: travel\nkeyframes:\n" + every)
    assert len(_CountingTemplate.made) == 3
    assert all(j.key == key_of({"base": q.base_key, "frame": j.recipe}) for j in q)
    # ...and with a new prompt at every frame every state is new: no template is worth making.
    _CountingTemplate.made.clear()
    r = plan_text("keyframes:\n" + "".join(f"  - {{frame: {n}, prompt: p{n}}}\n" for n in range(50)))
    assert _CountingTemplate.made == []
    assert all(j.key == key_of({"base": r.base_key, "frame": j.recipe}) for j in r)


def test_a_key_template_that_disagrees_with_key_of_stops_the_plan(plan_text, monkeypatch):
    monkeypatch.setattr(KeyTemplate, "key", lambda self, values: "0" * 64)
    with pytest.raises(AssertionError, match="planner bug"):
        plan_text("keyframes:\n  - {frame: 0, prompt: a dog}\n  - {frame: 5, prompt: a cat}\n")


@pytest.mark.parametrize("enabled", [True, False])
def test_plan_leaves_the_garbage_collector_as_it_found_it(plan_text, monkeypatch, enabled):
    # The planner pauses the collector while it builds a plan (pipeline.gcpause).
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        plan_text("keyframes:\n  - {frame: 0, prompt: a dog}\n")
        assert gc.isenabled() is enabled

        def broken(*args: object) -> None:
            assert not gc.isenabled()
            raise RuntimeError("broken recipe")

        monkeypatch.setattr(pipeline.plan.planner._Frames, "recipe", broken)
        with pytest.raises(RuntimeError, match="broken recipe"):
            plan_text("keyframes:\n  - {frame: 0, prompt: a dog}\n")
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


@pytest.mark.parametrize(
    "scene",
    [
        "guidance: 7.123456789012345\nkeyframes:\n  - {frame: 0, prompt: a dog}\n",
        "mode: feedback\nangle: -0.0\nkeyframes:\n  - {frame: 0, prompt: a dog}\n",
        "keyframes:\n  - {frame: 0, prompt: a dog, guidance: 0.30000000000000004}\n",
    ],
    ids=["unrounded-top-level", "negative-zero", "unrounded-keyframe"],
)
def test_held_scalars_are_rounded_in_the_recipe(plan_text, scene):
    p = plan_text(scene)
    whole = {"base": p.base_key, "frame": p[0].recipe}
    assert p[0].key == key_of(whole)


@pytest.mark.parametrize(
    ("a", "b"),
    [("angle: -0.0", "angle: 0.0"), ("guidance: 7.1234567890123", "guidance: 7.123456789012")],
)
def test_values_equal_at_key_precision_give_one_key(plan_text, a, b):
    scene = "mode: feedback\nVALUE\nkeyframes:\n  - {frame: 0, prompt: a dog}\n"
    assert plan_text(scene.replace("VALUE", a))[0].key == plan_text(scene.replace("VALUE", b))[0].key


def test_held_lora_scale_is_rounded(plan_text, make_env, tmp_path):
    (tmp_path / "style.safetensors").write_bytes(LORA_BYTES)
    p = plan_text(
        "loras: [{path: style.safetensors, scale: 0.30000000000000004}]\n"
        "keyframes:\n  - {frame: 0, prompt: a dog}\n  - {frame: 2, prompt: a cat, lora: {style: 0.7}}\n",
        make_env(files={"style.safetensors": "lora-hash"}),
        base_path=tmp_path / "s.yaml",
    )
    assert p[1].recipe["scalars"]["lora"] == {"style": 0.5}  # the in-between frame is fine
    assert p[0].recipe["scalars"]["lora"] == {"style": 0.3}


def test_plan_is_a_sequence_of_jobs(plan_text):
    p = plan_text(TWO_KEYS.replace("CURVE", "linear"))
    assert len(p) == 11
    assert [j.frame for j in p] == list(range(11))
    assert p[-1].frame == 10
    assert p.base["steps"] == 25
    assert key_of(p.base) == p.base_key
