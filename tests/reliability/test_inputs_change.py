"""An input that changes during a run never leaves a frame under a key that does not describe it.

Keys are computed when the run is planned, from the content of every input then; frames are made
later. Each test renders a scene through the Python API and changes one input (init image, mask, a
weight file of a local model folder, a LoRA file, a learned-embedding file) from the render's
``on_start`` hook, which runs exactly in that window: after planning, before the model loads. The
change is placed by the injected hook, not by timing, so every case is deterministic.

The rule checked: afterwards the cache holds no frame whose pixels differ from a cold render of its
key, and a render that would have read other bytes than the planned ones stops with
an error (``InputChanged``, exit 1 from the CLI) before storing anything made from them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from pipeline import app
from pipeline.plan.planner import plan
from pipeline.render.environment import resolve_env
from pipeline.render.modelfiles import InputChanged
from pipeline.scene.load import load_scene
from pipeline.store.cache import CacheDir
from tests.reliability._helpers_inputs import (
    ROOT,
    cached_frames,
    copy_model,
    decode,
    folder_frames,
    render_ok,
    scene_in,
)

# One frame per kind of input, in render order: frame 0 reads the model, the learned embedding and
# the LoRA; frame 1 the init image; frame 2 the mask. So a swap of the init image lands after frame
# 0 was stored, and a swap of the mask after frames 0 and 1.
SCENE = """\
model: models/tiny
size: [32, 32]
steps: 2
seed: 5
embeddings:
  - {path: inputs/tom_tiny.safetensors, token: "<tom>"}
loras:
  - {path: inputs/style_tiny.safetensors, name: style, scale: 0.8}
keyframes:
  - {frame: 0, prompt: "a cartoon of <tom>"}
  - {frame: 1, prompt: a red barn, mode: img2img, init_image: inputs/landscape.png, strength: 0.6}
  - {frame: 2, prompt: a blue lake, mode: inpaint, mask: inputs/house_mask.png, strength: 0.9}
outputs: [frames/]
"""
FRAMES = 3
UNET = "models/tiny/unet/diffusion_pytorch_model.safetensors"


def make_folder(folder: Path) -> Path:
    scene = scene_in(folder, SCENE)
    copy_model(folder / "models" / "tiny")
    return scene


def _flip(path: Path) -> None:
    with Image.open(path) as im:
        flipped = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    flipped.save(path)  # in place: same file, other content


def _scale_tensors(factor: float, shift: float = 0.0) -> Callable[[Path], None]:
    def change(path: Path) -> None:
        tensors = {k: v * factor + shift for k, v in load_file(path).items()}
        save_file(tensors, path)

    return change


def _truncate(path: Path) -> None:
    """Half a file, as a copy over it that is still being written when the model loads."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# kind -> (file changed, how). Every change gives a valid file of the same shape: only its pixels differ.
CHANGES: dict[str, tuple[str, Callable[[Path], None]]] = {
    "init_image": ("inputs/landscape.png", _flip),
    "mask": ("inputs/house_mask.png", _flip),
    "model_weights": (UNET, _scale_tensors(0.5)),
    # Loading fails on it: still 'changed during the run' (exit 1), not 'damaged, re-download' (exit 2).
    "model_weights_half_copied": (UNET, _truncate),
    "lora": ("inputs/style_tiny.safetensors", _scale_tensors(4.0)),
    "embedding": ("inputs/tom_tiny.safetensors", _scale_tensors(1.0, shift=0.5)),
}


def render_planned_then_changed(scene_path: Path, cache_dir: Path, change: Callable[[], None]) -> str:
    """Render through the Python API (the CLI's own path), with ``change`` run by its ``on_start``
    hook: after the frames' keys were computed, before the model loads or any input is read.
    Returns the error a failed run reports (the CLI prints it and exits 1), or '' if it finished."""
    session = app.open(
        scene_path,
        cache_dir=cache_dir,
        out_dir=cache_dir.parent / "out",
        device="cpu",
        batch_size=1,
        threads=1,
    )
    try:
        session.render(on_start=lambda setup: change())
    except app.RenderError as exc:
        return str(exc)
    return ""


@pytest.fixture(scope="module")
def cold(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """Frame key -> pixels of a cold render of the unchanged scene, in a fresh cache."""
    folder = tmp_path_factory.mktemp("cold")
    scene = make_folder(folder)
    render_ok(scene, folder / "cache", "--out", str(folder / "out"), "--threads", "1")
    keys = [job.key for job in plan(load_scene(scene), resolve_env(load_scene(scene), device="cpu"))]
    assert len(set(keys)) == FRAMES
    return dict(zip(keys, cached_frames(folder / "cache", keys), strict=True))


def assert_cache_matches_cold(cache_dir: Path, cold: dict[str, np.ndarray]) -> int:
    """Every frame in the cache is a frame of the planned scene with the pixels of its cold render."""
    with CacheDir(cache_dir) as cache:
        held = list(cache.frames.present(list(cold)))
        total = len(cache.frames)
    assert total == len(held), "the cache holds frames under keys the plan does not have"
    for key, pixels in zip(held, cached_frames(cache_dir, held), strict=True):
        assert np.array_equal(pixels, cold[key]), f"frame {key[:12]} differs from a cold render of its key"
    return len(held)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CHANGES))
def test_input_changed_after_planning_stores_no_wrong_frame(
    kind: str, tmp_path: Path, cold: dict[str, np.ndarray]
) -> None:
    scene = make_folder(tmp_path)
    rel, how = CHANGES[kind]
    stopped = render_planned_then_changed(scene, tmp_path / "cache", lambda: how(tmp_path / rel))
    # The rule first: whatever happened, no frame in the cache differs from a cold render of its key.
    stored = assert_cache_matches_cold(tmp_path / "cache", cold)
    # The run stopped at the first read of the changed file, with a message that names it ...
    assert "changed during the run" in stopped and Path(rel).name in stopped, stopped
    # ... and the frames made before that file was needed are kept (and are right).
    assert stored == {"init_image": 1, "mask": 2}.get(kind, 0)


@pytest.mark.slow
def test_model_file_replaced_and_put_back_during_the_run_stops_it(
    tmp_path: Path, cold: dict[str, np.ndarray]
) -> None:
    """A weight file swapped and put back may have been read in between: content alone cannot tell,
    so the file's stamp (ctime moves on every write or rename) must be the one hashed when planning."""
    scene = make_folder(tmp_path)
    weights = tmp_path / UNET
    keep = tmp_path / "unet.orig"
    shutil.copy2(weights, keep)

    def swap_and_put_back() -> None:
        _scale_tensors(0.5)(weights)
        shutil.copy2(keep, weights)  # same bytes again, as when planned

    stopped = render_planned_then_changed(scene, tmp_path / "cache", swap_and_put_back)
    assert re.search(
        r"model 'models/tiny': .*diffusion_pytorch_model\.safetensors changed during the run", stopped
    )
    assert assert_cache_matches_cold(tmp_path / "cache", cold) == 0


@pytest.mark.slow
def test_image_changed_and_put_back_before_it_is_read_renders_right(
    tmp_path: Path, cold: dict[str, np.ndarray]
) -> None:
    """Images are checked by content when read: the planned bytes are what is decoded, so no stop."""
    scene = make_folder(tmp_path)
    image = tmp_path / "inputs" / "landscape.png"
    original = image.read_bytes()

    def change_and_restore() -> None:
        _flip(image)
        image.write_bytes(original)

    assert render_planned_then_changed(scene, tmp_path / "cache", change_and_restore) == ""
    assert assert_cache_matches_cold(tmp_path / "cache", cold) == FRAMES


@pytest.mark.slow
def test_run_again_after_the_change_renders_the_right_frames(
    tmp_path: Path, cold: dict[str, np.ndarray]
) -> None:
    """The issue's reproduction: the init image is swapped during a run and restored; the next run
    must render what is missing and give the frames of a cold render (it said '0 rendered' before)."""
    scene = make_folder(tmp_path)
    image = tmp_path / "inputs" / "landscape.png"
    original = image.read_bytes()
    stopped = render_planned_then_changed(scene, tmp_path / "cache", lambda: _flip(image))
    assert "input 'inputs/landscape.png' changed during the run" in stopped
    image.write_bytes(original)
    report = render_ok(scene, tmp_path / "cache", "--out", str(tmp_path / "out"), "--threads", "1")
    assert (report["rendered"], report["cached"]) == (FRAMES - 1, 1)
    frames = folder_frames(tmp_path / "out" / "frames")
    assert all(np.array_equal(f, cold[k]) for f, k in zip(frames, cold, strict=True))
    # And with the changed image kept, the next run plans from it: new keys for the frames it feeds.
    _flip(image)
    report = render_ok(scene, tmp_path / "cache", "--out", str(tmp_path / "out2"), "--threads", "1")
    assert (report["rendered"], report["cached"]) == (2, 1)


def test_input_changed_is_a_failure_of_the_run_not_of_the_scene() -> None:
    """Exit 1 (like a full disk), not 2: the scene is fine, and running again resumes."""
    assert issubclass(InputChanged, OSError)


def test_decode_is_of_the_planned_bytes(tmp_path: Path) -> None:
    """The renderer's input image is decoded from bytes whose hash is the planned digest."""
    scene_path = make_folder(tmp_path)
    scene = load_scene(scene_path)
    env = resolve_env(scene, device="cpu")
    from pipeline.render.environment import read_input

    digest = env.files["inputs/landscape.png"]
    data = read_input(scene, env.files, digest)
    assert data == (tmp_path / "inputs" / "landscape.png").read_bytes()
    assert decode(data).shape == (512, 512, 3)
    _flip(tmp_path / "inputs" / "landscape.png")
    with pytest.raises(InputChanged, match=r"input 'inputs/landscape\.png' changed during the run"):
        read_input(scene, env.files, digest)


# A child process: HF_HUB_OFFLINE is read when huggingface_hub is imported.
_HUB_CHILD = """
import json, sys
from pathlib import Path
from pipeline.render.models import load_pipeline, resolve_model
ref = resolve_model("someone/tiny", Path("."))
Path(sys.argv[1]).write_text(sys.argv[2])  # the branch moves on after planning
pipe = load_pipeline(ref, device="cpu", dtype="float32")
weight = pipe.unet.state_dict()["conv_in.weight"].flatten()[0].item()
print(json.dumps({"planned": ref.fingerprint["unet"], "weight": weight}))
"""


@pytest.mark.slow
def test_hub_model_loads_the_commit_its_keys_name(tmp_path: Path) -> None:
    """A Hugging Face model is keyed by the commit found when planning; a newer commit of the branch
    that arrives before the weights load (another process downloaded it) must not be what renders."""
    repo = tmp_path / "hub" / "models--someone--tiny"
    old, new = "1" * 40, "2" * 40
    for commit, factor in ((old, 1.0), (new, 0.5)):
        snapshot = repo / "snapshots" / commit
        copy_model(snapshot)
        _scale_tensors(factor)(snapshot / "unet" / "diffusion_pytorch_model.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(old)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path),
        "HF_HUB_CACHE": str(tmp_path / "hub"),
    }
    run = subprocess.run(
        [sys.executable, "-c", _HUB_CHILD, str(repo / "refs" / "main"), new],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["planned"] == f"hub:someone/tiny@{old}"
    planned = load_file(repo / "snapshots" / old / "unet" / "diffusion_pytorch_model.safetensors")
    assert (
        found["weight"] == planned["conv_in.weight"].flatten()[0].item() != 0
    )  # not the newer commit's half
