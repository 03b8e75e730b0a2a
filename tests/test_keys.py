"""Tests for pipeline.plan.keys (canonical JSON -> sha256) and for what goes into frame keys.

Pinned digests are literals: if one changes, every cache in the wild misses. Bump on purpose only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from pipeline.plan.keys import (
    SIGNIFICANT_DIGITS,
    KeyTemplate,
    Slot,
    canonical_json,
    file_digest,
    json_digest,
    key_of,
    round_float,
)
from pipeline.plan.planner import plan
from pipeline.render.environment import RenderEnv
from pipeline.scene.load import parse_scene

# -- canonical JSON ------------------------------------------------------------------------------


def test_sorted_compact_utf8():
    assert canonical_json({"b": 1, "a": [1.5, "x"], "c": {"z": None, "y": True}}) == (
        '{"a":[1.5,"x"],"b":1,"c":{"y":true,"z":null}}'
    )
    assert canonical_json("é ✓") == '"é ✓"'
    assert canonical_json((1, 2)) == canonical_json([1, 2]) == "[1,2]"


def test_significant_digits():
    assert SIGNIFICANT_DIGITS == 10
    assert canonical_json(1 / 3) == "0.3333333333"
    assert canonical_json(2 / 3) == "0.6666666667"
    assert canonical_json(123456.789012345) == "123456.789"
    assert canonical_json(1e20) == "1e+20"
    assert canonical_json(1 / 3e20) == "3.333333333e-21"
    assert canonical_json(0.5) == "0.5"
    assert canonical_json(7.0) == "7.0"
    # Integers are exact: never rounded.
    assert canonical_json(12345678901234567) == "12345678901234567"
    assert round_float(1.23456789012345) == 1.23456789
    assert round_float(-2.00000000004) == -2.0


def test_nested_floats_are_rounded():
    a = {"x": [0.1 + 0.2, {"y": 1 / 3}], "z": (0.7 * 3,)}
    b = {"x": [0.3, {"y": 0.3333333333}], "z": [2.1]}
    assert canonical_json(a) == canonical_json(b) == '{"x":[0.3,{"y":0.3333333333}],"z":[2.1]}'
    assert key_of(a) == key_of(b)


def test_point_one_plus_point_two_is_point_three():
    assert 0.1 + 0.2 != 0.3
    assert key_of(0.1 + 0.2) == key_of(0.3)
    assert key_of({"t": 0.1 + 0.2}) == key_of({"t": 0.3})


def test_negative_zero_is_zero():
    assert canonical_json(-0.0) == "0.0"
    assert key_of({"angle": -0.0}) == key_of({"angle": 0.0})
    assert key_of([-0.0, [-0.0]]) == key_of([0.0, [0.0]])
    assert math.copysign(1.0, round_float(-0.0)) == 1.0
    # A tiny negative value rounds to itself, not to -0.0 or 0.0.
    assert round_float(-1e-300) == -1e-300


def test_different_values_differ():
    assert key_of({"t": 0.3}) != key_of({"t": 0.3000001})
    assert key_of({"a": 1}) != key_of({"b": 1})
    assert key_of(["a", "b"]) != key_of(["b", "a"])
    assert key_of("1") != key_of(1)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    "wrap", [lambda v: v, lambda v: [1, v], lambda v: {"a": {"b": v}}], ids=["bare", "list", "dict"]
)
@pytest.mark.parametrize("normalised", [False, True])
def test_non_finite_numbers_are_rejected(bad, wrap, normalised):
    with pytest.raises(ValueError):
        key_of(wrap(bad), normalised=normalised)


def test_round_float_rejects_non_finite():
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="non-finite"):
            round_float(bad)


@pytest.mark.parametrize(
    "bad",
    [Path("a.png"), {1, 2}, frozenset(), b"bytes", object(), {1: "int key"}, {"a": [Path("x")]}, 1 + 2j],
    ids=["path", "set", "frozenset", "bytes", "object", "int-key", "nested-path", "complex"],
)
def test_non_json_types_raise_type_error(bad):
    with pytest.raises(TypeError):
        key_of(bad)


def test_bool_stays_bool():
    assert canonical_json(True) == "true"
    assert canonical_json({"x": False}) == '{"x":false}'
    assert key_of(True) != key_of(1)
    assert key_of(False) != key_of(0)
    assert key_of({"hold": True}) != key_of({"hold": 1})
    assert key_of([True]) != key_of([1.0])


def test_normalised_text_is_the_same_for_rounded_input():
    value = {"t": round_float(1 / 7), "s": [round_float(2 / 3), 3, "x", None, True]}
    assert canonical_json(value) == canonical_json(value, normalised=True)
    assert key_of(value) == key_of(value, normalised=True)


# -- pinned digests ------------------------------------------------------------------------------


def test_pinned_digests():
    assert (
        key_of({"a": 1, "b": [1.5, "x"]})
        == "253252306831c7a53e616d2fac19ec1f21555d2c739d3366d5fa6399d3cce7be"
    )
    assert key_of({"a": 1, "b": [1.5, "x"]}) == hashlib.sha256(b'{"a":1,"b":[1.5,"x"]}').hexdigest()
    assert key_of({"b": [1.5, "x"], "a": 1}) == key_of({"a": 1, "b": [1.5, "x"]})
    assert (
        key_of({"prompt": "a dog", "t": 0.25})
        == "457ff6d55c7a61849fa0bac8e47ba3fafdc748219ef8b46786a698a337e22776"
    )
    assert key_of({}) == "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    assert key_of("é") == "f2886017e9c7abacf804b54d64787dce2b611c9544ba21f3affdd126a6e50086"


# -- key templates -------------------------------------------------------------------------------

H = "608e00e319d2c83e85f435f765886f49fff183ec8b6b9c5a9ac7ed28019c7e87"


def _fill(skeleton: Any, values: tuple[Any, ...]) -> Any:
    """The skeleton with each Slot replaced by its value (the slow, obvious way)."""
    if isinstance(skeleton, Slot):
        return values[skeleton.index]
    if isinstance(skeleton, dict):
        return {k: _fill(v, values) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [_fill(v, values) for v in skeleton]
    return skeleton


# Slots given in an order other than the text's (sorted keys), nested, in lists, and unused.
TEMPLATES = {
    "frame": (
        {
            "base": H,
            "frame": {
                "scalars": {"guidance": Slot(0), "strength": Slot(3)},
                "noise": {"seed": 22, "to": 33, "t": Slot(2)},
                "cond": {"a": [[H, 0.5]], "b": [[H, 1.0]], "t": Slot(1), "method": "slerp"},
            },
        },
        [(9.09600576, 0.03200192008, 0.03200192008, 0.5), (1e-05, 1e20, -0.0 + 0.0, 7.0)],
    ),
    "ints and lists": (
        {"seed": Slot(1), "grid": [Slot(0), "x", [Slot(2)]]},
        [(1.5, 2**62 + 1, -3), (0.1, 0, 7)],
    ),
    "text slot": ({"mode": "feedback", "prev": Slot(0, text=True)}, [(H,), ('é " ✓',)]),
    "percent in fixed text": ({"lora": {"50%": Slot(0)}, "%s": "%r"}, [(0.25,), (3,)]),
    "unused slot": ({"t": Slot(1)}, [("not used", 0.5)]),
    "no slot": ({"a": [1, 2.5, None, True]}, [()]),
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_key_template_gives_the_key_of_the_filled_recipe(name):
    skeleton, cases = TEMPLATES[name]
    template = KeyTemplate(skeleton)
    for values in cases:
        filled = _fill(skeleton, values)
        assert template.key(values) == key_of(filled, normalised=True) == key_of(filled), values


def test_key_template_pinned_digest():
    t = KeyTemplate({"prompt": "a dog", "t": Slot(0)})
    assert t.key((0.25,)) == "457ff6d55c7a61849fa0bac8e47ba3fafdc748219ef8b46786a698a337e22776"


@pytest.mark.parametrize(
    ("skeleton", "error"),
    [
        ({"a": Slot(0), "b": Slot(0)}, ValueError),  # one index twice
        ({"a": "\ue000"}, ValueError),  # the marker in the fixed text
        ({"a": Path("x"), "t": Slot(0)}, TypeError),  # not JSON data
        ({"a": math.nan, "t": Slot(0)}, ValueError),
    ],
    ids=["slot-twice", "marker-in-text", "path", "nan"],
)
def test_key_template_refuses_what_it_cannot_fill_exactly(skeleton, error):
    with pytest.raises(error):
        KeyTemplate(skeleton)


def test_file_digest_is_sha256_of_content(tmp_path):
    f = tmp_path / "init.png"
    f.write_bytes(b"hello")
    assert file_digest(str(f)) == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert file_digest(str(f), chunk=2) == file_digest(str(f))


PINNED_ENV = RenderEnv(
    model="tiny",
    pipeline_class="StableDiffusionPipeline",
    family="sd",
    fingerprint={"text_encoder": "te-a", "tokenizer": "tok-a", "unet": "unet-a", "vae": "vae-a"},
    scheduler_config={"_class_name": "PNDMScheduler", "num_train_timesteps": 1000},
    device="cpu",
    dtype="float32",
    libraries={"torch": "2.4.0", "diffusers": "0.30.0", "transformers": "4.44.0", "tokenizers": "0.20.0"},
)
PINNED_SCENE = """
size: [64, 64]
steps: 4
guidance: 7.0
seed: 42
keyframes:
  - {frame: 0, prompt: a dog}
  - {frame: 10, prompt: a cat, curve: ease_in_out_sine}
"""


def test_pinned_frame_and_embedding_keys():
    p = plan(parse_scene(PINNED_SCENE, "pinned.yaml"), PINNED_ENV)
    # Re-pinned when embedding keys gained diffusers and tokenizers (both make embedding bytes) and
    # the base names the scheduler by its resolved class and config instead of its spelling.
    dog = "6f12f5961f96ab2ee54d8c42417e070ad01f00f1ddd74c1fcb8780096c72b30f"
    assert p.text(dog) == "a dog"
    assert canonical_json(p.embeddings[dog]) == (
        '{"clip_skip":0,"device":"cpu","dtype":"float32","encoders":{"text_encoder":"te-a","tokenizer":"tok-a"},'
        '"family":"sd","kind":"embedding","learned":[],'
        '"libraries":{"diffusers":"0.30.0","tokenizers":"0.20.0","torch":"2.4.0","transformers":"4.44.0"},'
        '"t5":false,"text":"a dog","v":1}'
    )
    assert canonical_json(p.base) == (
        '{"clip_skip":0,"device":"cpu","dtype":"float32","family":"sd","kind":"frame","learned":[],'
        '"libraries":{"diffusers":"0.30.0","tokenizers":"0.20.0","torch":"2.4.0","transformers":"4.44.0"},'
        '"loras":[],"model":{"text_encoder":"te-a","tokenizer":"tok-a","unet":"unet-a","vae":"vae-a"},'
        '"pipeline":"StableDiffusionPipeline",'
        '"scheduler":{"class":"PNDMScheduler","config":{"num_train_timesteps":1000}},'
        '"size":[64,64],"steps":4,"t5":false,"v":1}'
    )
    assert p.base_key == "00d2d8607b435b29e5d30730e9835e3d96b6d543d0bc32399b71f22f796a318f"
    assert p[0].recipe["cond"] == {"a": [[dog, 1.0]]}
    assert p[0].key == "50931b814b3b6c3e54d77986a66ed59f81cbfbaaf6a4e88f42d32d3a7da2a8c8"
    assert p[5].recipe["cond"]["t"] == 0.5
    assert p[5].key == "e080ebf8645c1db876ebbe0e7d1d444ca647d410881121fb94643b2e1519ab6b"


@pytest.mark.parametrize("library", ["torch", "transformers", "diffusers", "tokenizers"])
def test_embedding_key_holds_every_library_that_makes_its_bytes(library):
    # diffusers' encode_prompt (layer choice, padding, textual inversion) and the tokenizers library
    # (token ids) make embedding bytes too: an upgrade must not reuse an old embedding.
    scene = parse_scene(PINNED_SCENE, "pinned.yaml")
    before = plan(scene, PINNED_ENV)
    libraries = {**PINNED_ENV.libraries, library: "99.0"}
    after = plan(scene, dataclasses.replace(PINNED_ENV, libraries=libraries))
    assert set(before.embeddings).isdisjoint(after.embeddings)
    assert all(a.key != b.key for a, b in zip(before, after, strict=True))


def test_embedding_key_ignores_libraries_that_never_touch_it():
    scene = parse_scene(PINNED_SCENE, "pinned.yaml")
    libraries = {**PINNED_ENV.libraries, "pillow": "13.0.0"}
    after = plan(scene, dataclasses.replace(PINNED_ENV, libraries=libraries))
    assert set(after.embeddings) == set(plan(scene, PINNED_ENV).embeddings)


# -- what a frame key depends on -----------------------------------------------------------------

BASE_SCENE = """
size: [64, 64]
steps: 4
guidance: 7.0
seed: 42
fps: 12
negative_prompt: blurry
keyframes:
  - {frame: 0, prompt: a dog}
  - {frame: 4, prompt: a cat}
outputs:
  - out.mp4
  - {path: out.gif, rubber_band: false, loop: 0}
"""
OUTPUTS = "outputs:\n  - out.mp4\n  - {path: out.gif, rubber_band: false, loop: 0}\n"
IMG2IMG = "mode: img2img\ninit_image: init.png\nstrength: 0.5\n"
ALL = frozenset(range(5))
BETWEEN = frozenset({1, 2, 3})

# (id, lines added to the scene before and after, scene text replacements, env changes,
#  frames whose key must change; empty = no key may change)
CASES: list[tuple[str, str, dict[str, str], dict[str, Any], frozenset[int]]] = [
    ("prompt-last", "", {"prompt: a cat": "prompt: a cow"}, {}, frozenset({1, 2, 3, 4})),
    ("prompt-first", "", {"prompt: a dog": "prompt: a wolf"}, {}, frozenset({0, 1, 2, 3})),
    ("negative_prompt", "", {"blurry": "ugly"}, {}, ALL),
    ("seed", "", {"seed: 42": "seed: 43"}, {}, ALL),
    # Frame 0 of per_frame noise is seed 42 + 0: the same latent as fixed seed 42.
    ("noise-kind", "", {"seed: 42": "seed: 42\nnoise: per_frame"}, {}, frozenset({1, 2, 3, 4})),
    ("steps", "", {"steps: 4": "steps: 5"}, {}, ALL),
    ("guidance", "", {"guidance: 7.0": "guidance: 6.5"}, {}, ALL),
    ("size", "", {"[64, 64]": "[64, 72]"}, {}, ALL),
    ("scheduler", "", {"steps: 4": "steps: 4\nscheduler: ddim"}, {}, ALL),
    ("clip_skip", "", {"steps: 4": "steps: 4\nclip_skip: 1"}, {}, ALL),
    ("interpolation", "", {"steps: 4": "steps: 4\ninterpolation: lerp"}, {}, BETWEEN),
    ("keyframe-curve", "", {"prompt: a cat}": "prompt: a cat, curve: ease_in_quad}"}, {}, BETWEEN),
    ("scene-curve", "", {"steps: 4": "steps: 4\ncurve: ease_out_sine"}, {}, BETWEEN),
    ("unet", "", {}, {"fingerprint": {"unet": "unet-2"}}, ALL),
    ("vae", "", {}, {"fingerprint": {"vae": "vae-2"}}, ALL),
    ("text_encoder", "", {}, {"fingerprint": {"text_encoder": "te-2"}}, ALL),
    ("tokenizer", "", {}, {"fingerprint": {"tokenizer": "tok-2"}}, ALL),
    ("pipeline_class", "", {}, {"pipeline_class": "StableDiffusionImg2ImgPipeline"}, ALL),
    ("model-scheduler-config", "", {}, {"scheduler_config": {"beta_schedule": "scaled_linear"}}, ALL),
    ("device", "", {}, {"device": "cuda"}, ALL),
    ("dtype", "", {}, {"dtype": "float16"}, ALL),
    ("torch-version", "", {}, {"libraries": {"torch": "2.5.0"}}, ALL),
    ("diffusers-version", "", {}, {"libraries": {"diffusers": "0.31.0"}}, ALL),
    ("transformers-version", "", {}, {"libraries": {"transformers": "4.45.0"}}, ALL),
    ("img2img-init-image", IMG2IMG, {}, {"files": {"init.png": "init-2"}}, ALL),
    ("img2img-strength", IMG2IMG, {"strength: 0.5": "strength: 0.6"}, {}, ALL),
    # Output-only settings: never in a frame key.
    ("fps", "", {"fps: 12": "fps: 24"}, {}, frozenset()),
    ("output-path", "", {"out.mp4": "elsewhere/movie.mp4"}, {}, frozenset()),
    ("output-format", "", {"  - out.mp4": "  - frames/"}, {}, frozenset()),
    ("output-kind", "", {"{path: out.gif,": "{path: out.gif, kind: mp4,"}, {}, frozenset()),
    ("rubber_band", "", {"rubber_band: false": "rubber_band: true"}, {}, frozenset()),
    ("loop", "", {"loop: 0": "loop: 3"}, {}, frozenset()),
    ("output-fps", "", {"loop: 0": "loop: 0, fps: 30"}, {}, frozenset()),
    ("no-outputs", "", {OUTPUTS: ""}, {}, frozenset()),
    ("model-name", "", {}, {"model": "another/name", "model_kind": "hub"}, frozenset()),
    ("txt2img-strength", "", {"steps: 4": "steps: 4\nstrength: 0.2"}, {}, frozenset()),
    (
        "txt2img-unused-init-image",
        "init_image: init.png\n",
        {},
        {"files": {"init.png": "init-2"}},
        frozenset(),
    ),
]


def _apply(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


def _env(**changes: Any) -> RenderEnv:
    fields: dict[str, Any] = {
        "model": "tiny",
        "pipeline_class": "StableDiffusionPipeline",
        "family": "sd",
        "fingerprint": {"unet": "unet-1", "vae": "vae-1", "text_encoder": "te-1", "tokenizer": "tok-1"},
        "scheduler_config": {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000},
        "libraries": {"torch": "2.4.0", "diffusers": "0.30.0", "transformers": "4.44.0"},
        "files": {"init.png": "init-1"},
    }
    for name, value in changes.items():
        # Dict fields change one entry: one component's fingerprint, one library's version.
        fields[name] = {**fields[name], **value} if isinstance(fields.get(name), dict) else value
    return RenderEnv(**fields)


def _keys(text: str, env: RenderEnv, folder: Path) -> list[str]:
    Image.new("RGB", (8, 8)).save(folder / "init.png")  # a real image: scene validation opens it
    return [j.key for j in plan(parse_scene(text, "s.yaml", base_path=folder / "s.yaml"), env)]


@pytest.mark.parametrize(
    ("prefix", "replacements", "env_changes", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_frame_key_sensitivity(tmp_path, prefix, replacements, env_changes, expected):
    before = _keys(prefix + BASE_SCENE, _env(), tmp_path)
    after = _keys(_apply(prefix + BASE_SCENE, replacements), _env(**env_changes), tmp_path)
    assert len(before) == len(after) == 5
    assert {n for n in range(5) if before[n] != after[n]} == set(expected)


def test_every_pixel_relevant_env_field_is_in_the_base(make_env):
    # The base recipe is what frames share: it must name each fact from the environment.
    scene = parse_scene(BASE_SCENE, "s.yaml")
    base = plan(scene, make_env()).base
    assert base["model"] == make_env().fingerprint
    assert base["size"] == [64, 64]
    assert base["steps"] == 4
    assert base["libraries"] == make_env().libraries
    assert (base["device"], base["dtype"]) == ("cpu", "float32")
    assert "fps" not in base and "outputs" not in base


# -- what a frame key must NOT depend on: edits that change no pixel re-render nothing ------------

RESTATE = """
size: [64, 64]
steps: 4
negative_prompt: blurry
keyframes:
  - {frame: 0, prompt: a dog, guidance: 5}
  - {frame: 6, prompt: a cat, guidance: 9}
  - {frame: 12, guidance: 7}
frames: 16
"""


def _plan_keys(text: str, env: RenderEnv | None = None) -> list[str]:
    return [j.key for j in plan(parse_scene(text, "s.yaml"), env or _env())]


@pytest.mark.parametrize(
    "edit",
    [
        # The prompt in force (a cat) restated at the next keyframe: a cat -> a cat is a cat.
        ("{frame: 12, guidance: 7}", "{frame: 12, prompt: a cat, guidance: 7}"),
        # The same, as a blend with the same normalised weights.
        ("{frame: 12, guidance: 7}", "{frame: 12, prompt: [{text: a cat, weight: 3}], guidance: 7}"),
        # The negative prompt in force restated.
        ("{frame: 12, guidance: 7}", "{frame: 12, negative_prompt: blurry, guidance: 7}"),
    ],
    ids=["prompt", "prompt-blend-weights", "negative-prompt"],
)
def test_restating_the_value_in_force_changes_no_key(edit):
    old, new = edit
    assert _plan_keys(_apply(RESTATE, {old: new})) == _plan_keys(RESTATE)


def test_restating_a_blend_with_the_same_normalised_weights_changes_no_key():
    two = "prompt: [{text: a dog, weight: 1}, {text: a cat, weight: 1}]"
    same = "prompt: [{text: a dog, weight: 5}, {text: a cat, weight: 5}]"
    held = RESTATE.replace("prompt: a cat", two)  # the blend is in force from frame 6 on
    restated = held.replace("{frame: 12, guidance: 7}", "{frame: 12, " + same + ", guidance: 7}")
    assert _plan_keys(restated) == _plan_keys(held)
    # A real change of prompt still changes the frames between (and after).
    changed = _plan_keys(
        RESTATE.replace("{frame: 12, guidance: 7}", "{frame: 12, prompt: a cow, guidance: 7}")
    )
    before = _plan_keys(RESTATE)
    assert [n for n in range(16) if changed[n] != before[n]] == list(range(7, 16))


def test_a_blend_from_a_prompt_to_itself_is_that_prompt_whole():
    text = RESTATE.replace("{frame: 12, guidance: 7}", "{frame: 12, prompt: a cat, guidance: 7}")
    jobs = plan(parse_scene(text, "s.yaml"), _env())
    assert jobs[9].recipe["cond"] == jobs[12].recipe["cond"] == jobs[6].recipe["cond"]
    assert "t" not in jobs[9].recipe["cond"]
    assert jobs[3].recipe["cond"]["t"] == 0.5  # dog -> cat still blends


TRAVEL = """
size: [64, 64]
steps: 4
noise: travel
keyframes:
  - {frame: 0, prompt: a dog, seed: 5}
  - {frame: 4, prompt: a cat}
  - {frame: 8, prompt: a cow}
frames: 10
"""


def test_repeating_a_travel_seed_changes_no_key():
    # Seed 5 is in force everywhere; restating it at frame 4 travels 5 -> 5, which is seed 5.
    repeated = TRAVEL.replace("{frame: 4, prompt: a cat}", "{frame: 4, prompt: a cat, seed: 5}")
    assert _plan_keys(repeated) == _plan_keys(TRAVEL)
    jobs = plan(parse_scene(repeated, "s.yaml"), _env())
    assert [j.recipe["noise"] for j in jobs] == [{"seed": 5}] * 10
    # A new seed there does change the frames that travel towards it and away from it.
    moved = TRAVEL.replace("{frame: 4, prompt: a cat}", "{frame: 4, prompt: a cat, seed: 6}")
    jobs = plan(parse_scene(moved, "s.yaml"), _env())
    assert jobs[2].recipe["noise"] == {"seed": 5, "to": 6, "t": 0.5}
    changed = [
        n for n, (a, b) in enumerate(zip(_plan_keys(moved), _plan_keys(TRAVEL), strict=True)) if a != b
    ]
    assert changed == list(range(1, 10))


PNDM_CONFIG = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "skip_prk_steps": True}


def test_naming_the_scheduler_the_model_already_uses_changes_no_key():
    env = _env(scheduler_config=PNDM_CONFIG)
    named = BASE_SCENE.replace("steps: 4", "steps: 4\nscheduler: pndm")
    assert _plan_keys(named, env) == _plan_keys(BASE_SCENE, env)
    # Another sampler, or PNDM with settings the model's own does not have, is another key.
    ddim = BASE_SCENE.replace("steps: 4", "steps: 4\nscheduler: ddim")
    assert set(_plan_keys(ddim, env)).isdisjoint(_plan_keys(BASE_SCENE, env))
    prk = _env(scheduler_config={**PNDM_CONFIG, "skip_prk_steps": False})
    assert set(_plan_keys(named, prk)).isdisjoint(_plan_keys(BASE_SCENE, prk))


def test_json_digest_is_content_not_layout():
    data = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"], "x": 1.5}
    assert (
        json_digest(data)
        == hashlib.sha256(
            b'{"_class_name":"StableDiffusionPipeline","unet":["diffusers","UNet2DConditionModel"],"x":1.5}'
        ).hexdigest()
    )
    assert json_digest(data) != json_digest({**data, "x": 2})
    assert json_digest(data) != json_digest(dict(reversed(list(data.items()))))  # order is kept


def test_reindenting_model_index_json_changes_no_fingerprint(tmp_path):
    import json
    import shutil

    from pipeline.render.modelfiles import EMBEDDED_DIR
    from pipeline.render.models import resolve_model

    folder = tmp_path / "model"
    shutil.copytree(EMBEDDED_DIR / "tiny", folder)
    before = resolve_model("model", tmp_path).fingerprint
    index = folder / "model_index.json"
    data = json.loads(index.read_text())
    index.write_text(json.dumps(data, indent=7) + "\n\n")  # another layout, the same content
    assert resolve_model("model", tmp_path).fingerprint == before
    data["scheduler"] = ["diffusers", "DDIMScheduler"]  # another content
    index.write_text(json.dumps(data, indent=2))
    assert resolve_model("model", tmp_path).fingerprint["model_index"] != before["model_index"]
