"""Deforum schedule strings, the formulas in them, and the shared prompt parts (prefix and suffix).

Both become ordinary keyframes when the scene loads (``pipeline.scene.scheduled`` and
``pipeline.scene.core``); these tests plan scenes with the hand-built env of tests/conftest.py (no
model) and compare keys and values with scenes written as keyframes, or with values computed here by
hand.
"""

from __future__ import annotations

import math
import time

import pytest
import yaml

from pipeline.outputs.record import resolved_scene
from pipeline.plan.keys import round_float
from pipeline.scene.core import join_prompt
from pipeline.scene.load import parse_scene
from pipeline.scene.problems import SceneError
from pipeline.scene.schedules import EvalError, ScheduleError, parse_schedule, schedule_values


def guidance(plan) -> list[float]:
    return [j.recipe["scalars"]["guidance"] for j in plan]


# -- schedules plan as keyframes -----------------------------------------------------------------


def test_a_schedule_plans_the_same_keys_as_the_equivalent_keyframes(plan_text) -> None:
    scheduled = plan_text(
        """
guidance: "0:(7.5), 30:(9.0), 40: (4)"
keyframes:
  - {frame: 0, prompt: a dog}
  - {frame: 20, prompt: a cat}
  - {frame: 47, prompt: a cow}
"""
    )
    written = plan_text(
        """
keyframes:
  - {frame: 0, prompt: a dog, guidance: 7.5}
  - {frame: 20, prompt: a cat}
  - {frame: 30, guidance: 9.0}
  - {frame: 40, guidance: 4}
  - {frame: 47, prompt: a cow}
"""
    )
    assert len(scheduled) == 48
    assert [j.key for j in scheduled] == [j.key for j in written]
    assert guidance(scheduled)[:31:10] == [7.5, 8.0, 8.5, 9.0]
    assert guidance(scheduled)[40:] == [4.0] * 8  # after the last point, the last value holds


def test_a_schedule_is_linear_whatever_the_curves_and_holds(plan_text) -> None:
    # Deforum interpolates linearly; the scene's curve and a keyframe's curve or hold at a point of
    # the schedule ease the prompts, not the scheduled value.
    p = plan_text(
        """
curve: ease_in_quad
guidance: "0:(2), 4:(6), 8:(10)"
keyframes:
  - {frame: 0, prompt: a dog, hold: true}
  - {frame: 4, prompt: a cat, curve: ease_out_expo}
  - {frame: 8, prompt: a cow}
"""
    )
    assert guidance(p) == [2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]


def test_before_the_first_point_its_value_holds_and_points_make_the_scene_longer(plan_text) -> None:
    p = plan_text('guidance: "3:(5), 5:(9)"\nkeyframes:\n  - {frame: 0, prompt: a dog}\n')
    assert guidance(p) == [5.0, 5.0, 5.0, 5.0, 7.0, 9.0]


# -- formulas ------------------------------------------------------------------------------------


def test_a_formula_is_evaluated_at_every_frame_as_computed_by_hand(plan_text) -> None:
    p = plan_text(
        """
guidance: "0:(7 + 2*sin(2*pi*t/24)), 12:(3), 16: (max_f - t + 0.5)"
keyframes:
  - {frame: 0, prompt: a dog}
  - {frame: 19, prompt: a cat}
"""
    )
    want = [7 + 2 * math.sin(2 * math.pi * t / 24) for t in range(12)]
    # A plain number at 12, linear to the value of the formula that starts at frame 16 (max_f = 19).
    want += [3.0, 3.125, 3.25, 3.375]
    want += [19 - t + 0.5 for t in range(16, 20)]
    assert guidance(p)[:12] == [round_float(v) for v in want[:12]]
    assert guidance(p)[12:] == want[12:]


def test_a_formula_without_t_holds_until_the_next_point_as_in_deforum(plan_text) -> None:
    # Deforum evaluates any point that is not a plain number at every frame up to the next point.
    p = plan_text('guidance: "0:(2*3), 4:(10)"\nkeyframes:\n  - {frame: 0, prompt: a dog}\n')
    assert guidance(p) == [6.0, 6.0, 6.0, 6.0, 10.0]


def test_formulas_know_numbers_t_and_the_listed_functions_only() -> None:
    [point] = parse_schedule(
        "0:(abs(-2) + floor(2.7) + ceil(0.2) + sqrt(16) + exp(0) + log(e) + 7 % 4 + 2**3)"
    )
    assert schedule_values([point], 1) == [(0, 2 + 2 + 1 + 4 + 1 + 1 + 3 + 8, point)]
    for text, offset, words in [
        ("0:(__import__('os'))", 3, "unknown function '__import__'"),
        ("0:(t.real)", 3, "attributes not allowed"),
        ("0:((1).__class__)", 3, "attributes not allowed"),
        ("0:(open)", 3, "unknown name 'open'"),
        ("0:([1][0])", 3, "indexing not allowed"),
        ("0:(1 if t else 2)", 3, "if/else not allowed"),
        ("0:(t > 1)", 3, "comparisons not allowed"),
        ("0:('a')", 3, "'a' is not a number"),
        ("0:(1 +)", 6, "not a formula"),
        ("0:(" + "-" * 40 + "1)", 36, "nested too deeply"),
        ("0:(" + "-" * 990 + "1)", 36, "nested too deeply"),
        ("0:(" + "(" * 300 + "1" + ")" * 300 + ")", 202, "too many nested parentheses"),
        ("0:(" + "1+" * 600 + "1)", 3, "at most 1000"),
    ]:
        with pytest.raises(ScheduleError) as info:
            parse_schedule(text)
        assert (info.value.offset, words in info.value.message) == (offset, True), info.value.message


def test_hostile_formulas_fail_fast_at_the_operation() -> None:
    start = time.process_time()
    for text, offset, words in [
        ("0:(9**9**9**9)", 6, "too large"),
        ("0:(1/(t-3))", 3, "division by zero at frame 3"),
        ("0:(t % 0)", 3, "division by zero at frame 0"),
        ("0:(2 + sqrt(t - 2))", 7, "sqrt() is not defined for -2"),
        ("0:(exp(1000))", 3, "exp() of 1000 is too large"),
        ("0:((-8) ** 0.5)", 3, "is not a real number"),
    ]:
        with pytest.raises(EvalError) as info:
            schedule_values(parse_schedule(text), 10)
        assert (info.value.offset, words in info.value.message) == (offset, True), info.value.message
    assert time.process_time() - start < 5  # not a timing assert on speed: a guard against a hang


# -- located problems ----------------------------------------------------------------------------

BASE = "keyframes:\n  - {frame: 0, prompt: a dog}\n  - {frame: 9, prompt: a cat}\n"


@pytest.mark.parametrize(
    ("line", "where", "words"),
    [
        ('guidance: "0:(7.5), 30 (9)"', (1, 24), "guidance: expected ':' after frame 30"),
        ("guidance: 0:(7.5), 5:9", (1, 22), "expected '(' after '5:'"),
        ("guidance: '0:(7.5), 5:(9'", (1, 23), "the '(' opened here is never closed"),
        ('guidance: "0:(1), 0:(2)"', (1, 19), "frame 0 repeats frame 0"),
        ('zoom: "0:(1 + foo*t)"', (1, 15), "zoom: unknown name 'foo'"),
        ('angle: "0:(0), 4:(1/(t-6))"', (1, 19), "angle: division by zero at frame 6 (t = 6)"),
        (
            'strength: "0:(0.5), 5:(1.5)"',
            (1, 24),
            "strength: the value at frame 5 is 1.5; allowed: from 0 to 1",
        ),
        ('zoom: "0:(1 - t/4)"', (1, 11), "zoom: the value at frame 4 is 0; allowed: over 0 to 100"),
        (
            'guidance: "0:(7), 12:(9)"\nframes: 10',
            (1, 19),
            "frame 12 is beyond the end; the scene has 10 frames",
        ),
        (
            'guidance: "0:(7), 99999999:(9)"',
            (1, 19),
            "frame 99999999 makes the scene 100000000 frames long; at most 1000000",
        ),
    ],
)
def test_a_bad_schedule_is_a_problem_at_its_column(line: str, where: tuple[int, int], words: str) -> None:
    with pytest.raises(SceneError) as info:
        parse_scene(line + "\n" + BASE, "s.yaml")
    found = [(p.line, p.col, p.message) for p in info.value.problems]
    assert any((ln, col) == where and words in msg for ln, col, msg in found), found


def test_a_value_given_by_a_schedule_and_a_keyframe_is_a_problem_at_the_keyframe() -> None:
    with pytest.raises(SceneError) as info:
        parse_scene('guidance: "0:(7)"\nkeyframes:\n  - {frame: 0, prompt: a, guidance: 5}\n', "s.yaml")
    [p] = info.value.problems
    assert (p.line, p.col) == (3, 37)
    assert "guidance is also given by the schedule on line 1; set it in one place" in p.message


def test_a_schedule_in_a_walk_scene_is_a_problem() -> None:
    with pytest.raises(SceneError) as info:
        parse_scene('guidance: "0:(7), 3:(8)"\nwalk: {prompt: a dog, frames: 4}\n', "s.yaml")
    assert [(p.line, p.col) for p in info.value.problems] == [(1, 12)]


def test_a_problem_elsewhere_is_still_reported_with_a_bad_schedule() -> None:
    with pytest.raises(SceneError) as info:
        parse_scene('guidance: "0:(7"\nsteps: 0\n' + BASE, "s.yaml")
    assert [(p.line, p.col) for p in info.value.problems] == [(1, 14), (2, 8)]


def test_a_written_scene_with_schedules_plans_the_same_keys_when_loaded_back(plan_text) -> None:
    text = 'guidance: "0:(7), 6:(9 + sin(t))"\nprompt_suffix: ", oil"\n' + BASE
    scene = parse_scene(text, "s.yaml")
    again = yaml.safe_dump(resolved_scene(scene), sort_keys=False)
    assert [j.key for j in plan_text(again)] == [j.key for j in plan_text(text)]


# -- prompt prefix and suffix --------------------------------------------------------------------


def test_join_prompt_adds_one_space_except_before_punctuation() -> None:
    assert join_prompt("A cute", "dog", ", film grain") == "A cute dog, film grain"
    assert join_prompt("A cute ", "dog", " in snow") == "A cute dog in snow"
    assert join_prompt("", "dog", "") == "dog"
    assert join_prompt("masterpiece,", "dog", "; 4k") == "masterpiece, dog; 4k"


def test_prefix_and_suffix_are_joined_into_every_prompt_and_keyed_as_written(plan_text) -> None:
    joined = plan_text(
        """
prompt_prefix: "A cute"
prompt_suffix: ", film grain"
keyframes:
  - {frame: 0, prompt: dog}
  - {frame: 4, prompt: [{text: cat, weight: 2}, {text: cow}]}
  - {frame: 6, prompt_suffix: ", oil painting"}
  - {frame: 8, prompt: owl, prompt_prefix: "A tiny"}
"""
    )
    written = plan_text(
        """
keyframes:
  - {frame: 0, prompt: "A cute dog, film grain"}
  - {frame: 4, prompt: [{text: "A cute cat, film grain", weight: 2}, {text: "A cute cow, film grain"}]}
  - {frame: 6, prompt: [{text: "A cute cat, oil painting", weight: 2}, {text: "A cute cow, oil painting"}]}
  - {frame: 8, prompt: "A tiny owl, oil painting"}
"""
    )
    assert [j.key for j in joined] == [j.key for j in written]
    assert sorted(joined.text(k) for k in joined.embeddings)[1:3] == [
        "A cute cat, film grain",
        "A cute cat, oil painting",
    ]


def test_prefix_and_suffix_join_a_walk_and_a_grid(plan_text) -> None:
    walk = plan_text("prompt_prefix: A\nwalk: {prompt: dog, frames: 2}\n")
    assert [walk.text(k) for k in walk.embeddings if walk.text(k)] == ["A dog"]
    grid = plan_text("prompt_suffix: ', 4k'\ngrid: {prompts: [a, b, c, d], rows: 2, cols: 2}\n")
    assert sorted(grid.text(k) for k in grid.embeddings if grid.text(k)) == [
        "a, 4k",
        "b, 4k",
        "c, 4k",
        "d, 4k",
    ]


def test_the_plot_marks_the_written_keyframes_not_those_a_formula_made() -> None:
    scene = parse_scene('zoom: "0:(1 + 0.01*t)"\n' + BASE, "s.yaml")
    assert scene.keyframe_frames == list(range(10))
    assert scene.written_keyframe_frames == [0, 9]


# The smallest file that passes as LoRA weights (as in test_planner.py).
_LORA_HEADER = b'{"w.lora_A.weight":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
LORA_BYTES = len(_LORA_HEADER).to_bytes(8, "little") + _LORA_HEADER + bytes(4)


def test_a_lora_scale_schedule_plans_as_keyframe_scales(plan_text, make_env, tmp_path) -> None:
    (tmp_path / "style.safetensors").write_bytes(LORA_BYTES)
    base, env = tmp_path / "s.yaml", make_env(files={"style.safetensors": "lora-1"})
    scheduled = plan_text(
        'loras:\n  - {path: style.safetensors, scale: "0:(0), 4:(1), 6:(0.5)"}\n' + BASE, env, base_path=base
    )
    written = plan_text(
        "loras:\n  - {path: style.safetensors}\n"
        "keyframes:\n  - {frame: 0, prompt: a dog, lora: {style: 0}}\n  - {frame: 4, lora: {style: 1}}\n"
        "  - {frame: 6, lora: {style: 0.5}}\n  - {frame: 9, prompt: a cat}\n",
        env,
        base_path=base,
    )
    assert [j.key for j in scheduled] == [j.key for j in written]
    assert [j.recipe["scalars"]["lora"]["style"] for j in scheduled][:5] == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(SceneError) as info:
        parse_scene(
            'loras:\n  - {path: style.safetensors, scale: "0:(0), 4:(1000)"}\n' + BASE,
            "s.yaml",
            base_path=base,
        )
    assert [(p.line, p.col, p.message) for p in info.value.problems] == [
        (2, 49, "loras 1, scale: the value at frame 4 is 1000; allowed: from -100 to 100")
    ]


def test_a_schedule_where_none_is_taken_says_which_values_take_one() -> None:
    with pytest.raises(SceneError) as info:
        parse_scene('steps: "0:(20), 10:(30)"\n' + BASE, "s.yaml")
    [p] = info.value.problems
    assert (p.line, p.col) == (1, 8)
    assert p.message.endswith(
        "this looks like a Deforum schedule; 'steps' takes none (schedules are for guidance, strength, zoom, "
        "angle, translate_x, translate_y and a LoRA's scale)"
    )
