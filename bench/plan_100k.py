"""Planning speed: how long ``plan(scene, env)`` takes for a 100,000-frame scene.

The scene has three keyframes with prompts (the middle one a weighted blend of two texts),
``noise: travel`` with a seed on each keyframe, a guidance ramp (5 -> 9 -> 12) and eased curves
(scene default ``ease_in_out_sine``, the last keyframe ``ease_in_out_cubic``). It is written to a
temporary folder and loaded once with ``load_scene``. Then, in this process, median of 5 each:

- ``plan`` with a hand-built ``RenderEnv`` (the one ``tests/conftest.py`` uses);
- ``resolve_env`` for the embedded tiny model (no file-hash memo, so the model files are hashed
  every time, as on a first run) and ``plan`` with that env, timed together and apart;
- ``load_scene`` (YAML read and validation), for scale.

Then ``python render.py SCENE --plan --json > /dev/null`` end to end as a subprocess (interpreter
start, imports, validation, model fingerprint, planning and JSON printing; empty temp cache dir),
median of 3. Target from the issue: "a scene of 100,000 frames plans in about a second".

Finally the other extreme, a scene exported with a keyframe at every frame (as Parseq and
audio-reactive tools write them): 100,000 keyframes, each setting a prompt (one of seven), a seed
(``noise: travel``) and guidance. ``load_scene`` (also with PyYAML's pure-Python parser in place of
libyaml's) and ``plan``, median of 3 each.

    /work/venv/bin/python bench/plan_100k.py [--quick]      # --quick: 10,000 frames, 3 / 2 repeats

``--against FILE`` also times another planner module on both scenes, alternating with this one in
the same process, and prints the ratio (an older ``pipeline/plan/planner.py``, taken with
``git show REV:pipeline/plan/planner.py > /tmp/planner_old.py``; it must work with today's other modules).
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

import _common as c

from pipeline.plan.planner import plan
from pipeline.render.environment import RenderEnv, resolve_env
from pipeline.scene import yamlio
from pipeline.scene.core import load_scene

ENV = RenderEnv(
    model="tiny",
    pipeline_class="StableDiffusionPipeline",
    family="sd",
    fingerprint={"unet": "unet-1", "vae": "vae-1", "text_encoder": "te-1", "tokenizer": "tok-1"},
    scheduler_config={"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear"},
    device="cpu",
    dtype="float32",
    libraries={"torch": "2.4.0", "diffusers": "0.30.0", "transformers": "4.44.0"},
)

SCENE = """\
model: tiny
size: [64, 64]
steps: 8
frames: {frames}
seed: 1
noise: travel
guidance: 5
curve: ease_in_out_sine
negative_prompt: "blurry"
keyframes:
  - frame: 0
    prompt: "a dog in a field of flowers"
    seed: 11
  - frame: {mid}
    prompt: [{{text: "a wolf in the snow", weight: 2}}, {{text: "a fox in the snow"}}]
    seed: 22
    guidance: 9
  - frame: {last}
    prompt: "a cat on a sofa"
    seed: 33
    guidance: 12
    curve: ease_in_out_cubic
"""


def _against() -> Any | None:
    """The planner module named by ``--against FILE``, or None."""
    args = sys.argv[1:]
    if "--against" not in args:
        return None
    spec = importlib.util.spec_from_file_location("planner_against", args[args.index("--against") + 1])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["planner_against"] = module  # dataclasses look their module up while being made
    spec.loader.exec_module(module)
    return module


def _compare(other: Any, scenes: list[tuple[str, Any]], n: int) -> None:
    """Time ``other.plan`` and ``plan`` alternately on each scene; the same keys are required."""
    rows = []
    for name, scene in scenes:
        theirs, ours = other.plan(scene, ENV), plan(scene, ENV)
        assert [j.key for j in theirs] == [j.key for j in ours], f"{name}: the planners disagree"
        del theirs, ours
        t_other, t_ours = [], []
        for _ in range(n):
            t_other.append(c.timed(lambda scene=scene: other.plan(scene, ENV))[0])
            t_ours.append(c.timed(lambda scene=scene: plan(scene, ENV))[0])
        rows.append((name, n, c.median(t_other), c.median(t_ours), c.median(t_other) / c.median(t_ours)))
    c.table(["scene", "n", "--against median s", "this median s", "speed-up"], rows)


def main() -> None:
    frames = 10_000 if c.quick() else 100_000
    n_in, n_cli = (3, 2) if c.quick() else (5, 3)
    c.header(f"plan_100k: planning a {frames:,}-frame scene")
    with c.workdir() as d:
        path = c.write_scene(d, SCENE.format(frames=frames, mid=frames // 2, last=frames - 1), "plan100k")
        t_load = c.repeat(lambda: load_scene(path), n_in)
        scene = load_scene(path)
        p = plan(scene, ENV)
        assert len(p) == frames
        distinct = len({j.key for j in p})  # eased t within 1e-10 of a keyframe rounds onto it
        t_plan = c.repeat(lambda: plan(scene, ENV), n_in)
        t_env = c.repeat(lambda: resolve_env(scene, device="cpu"), n_in)
        t_both = c.repeat(lambda: plan(scene, resolve_env(scene, device="cpu")), n_in)
        cache = d / "cache"
        t_cli = [
            c.run_cli([path, "--plan", "--json", "--device", "cpu", "--cache-dir", cache])[0]
            for _ in range(n_cli)
        ]
        assert not cache.exists(), "--plan must not write a cache"

        every = "model: tiny\nnoise: travel\nkeyframes:\n" + "".join(
            f"  - {{frame: {n}, prompt: p{n % 7}, seed: {n}, guidance: {5 + n % 3}}}\n" for n in range(frames)
        )
        every_path = c.write_scene(d, every, "every_frame")
        n_every = 2 if c.quick() else 3
        t_every_load = c.repeat(lambda: load_scene(every_path), n_every)
        # The same with PyYAML's pure-Python parser, as where PyYAML has no libyaml.
        fast_parser, yamlio.CParser = yamlio.CParser, None
        t_every_load_py = c.repeat(lambda: load_scene(every_path), n_every)
        yamlio.CParser = fast_parser
        every_scene = load_scene(every_path)
        t_every_plan = c.repeat(lambda: plan(every_scene, ENV), n_every)

    rows = []
    for what, ts, per_frame in [
        ("load_scene (YAML + validation)", t_load, False),
        ("plan, hand-built RenderEnv", t_plan, True),
        ("resolve_env (tiny, no memo)", t_env, False),
        ("resolve_env + plan", t_both, True),
        ("render.py --plan --json > /dev/null (subprocess)", t_cli, True),
        ("keyed at every frame: load_scene", t_every_load, True),
        ("keyed at every frame: load_scene, Python YAML parser", t_every_load_py, True),
        ("keyed at every frame: plan", t_every_plan, True),
    ]:
        med = c.median(ts)
        rows.append((what, len(ts), med, min(ts), max(ts), frames / med if per_frame else "-"))
    c.table(["step", "n", "median s", "min s", "max s", "frames/s"], rows)
    print(f"{frames:,} frames, {distinct:,} distinct keys")
    other = _against()
    if other is not None:
        print()
        _compare(other, [("three keyframes", scene), ("keyed at every frame", every_scene)], n_every)


if __name__ == "__main__":
    main()
