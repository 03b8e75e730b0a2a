"""The render farm (``pipeline.render.farm``) on a local Ray cluster of 2 CPU workers, one thread each.

One cluster and one pool of workers serve the whole module (Ray and its workers take seconds to
start); every render here asks for the same pool (``--workers 2 --threads 1``). The frames of a
farm render are compared byte for byte with a render in this process at the same batch size and
thread count (float32 sums depend on the thread count, so both use one thread).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import pipeline
from pipeline.cli import main
from pipeline.render.loop import Progress
from pipeline.render.models import ModelError
from pipeline.store.cache import CacheDir
from tests.conftest import run_render

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

BATCH = 2
SCENE = """
model: tiny
size: [32, 32]
steps: 2
seed: 42
keyframes:
  - frame: 0
    prompt: "a dog in a field"
  - frame: 11
    prompt: "a cat in a field"
outputs:
  - out.gif
  - frames/
"""
FEEDBACK = """
model: tiny
size: [32, 32]
steps: 2
seed: 7
mode: feedback
init_image: inputs/start.png
strength: 0.6
zoom: 1.05
keyframes:
  - frame: 0
    prompt: "a castle on a hill"
  - frame: 5
    prompt: "a castle in the clouds"
"""


@pytest.fixture(scope="module")
def pool() -> Any:
    """The module's Ray cluster and its 2 workers (the pool the renders below ask for)."""
    import ray

    from pipeline.render import farm

    started = farm.farm_pool(2, None, "cpu", 1)
    yield started
    farm._POOLS.clear()
    ray.shutdown()


def _write(folder: Path, text: str) -> Path:
    from PIL import Image

    (folder / "inputs").mkdir(parents=True, exist_ok=True)
    # The feedback scene's init image: it reaches the workers as the bytes the driver hashed.
    Image.new("RGB", (48, 40), (200, 120, 40)).save(folder / "inputs" / "start.png")
    path = folder / "scene.yaml"
    path.write_text(text)
    return path


def _frames(cache: Path, keys: list[str]) -> list[bytes]:
    with CacheDir.open(cache) as store:
        return [store.frames.get(key) for key in keys]


def _keys(scene: Path) -> list[str]:
    return [job.key for job in pipeline.open(scene).plan()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """SCENE rendered in this process: its frames and outputs."""
    folder = tmp_path_factory.mktemp("local")
    scene = _write(folder / "scene", SCENE)
    report = run_render(scene, folder / "cache", "--batch-size", str(BATCH), "--threads", "1")
    assert report["workers"] is None
    keys = _keys(scene)
    out = scene.parent / "renders" / "scene"
    return {
        "frames": _frames(folder / "cache", keys),
        "encoded": report["embeddings_encoded"],
        "gif": (out / "out.gif").read_bytes(),
        "pngs": {p.name: p.read_bytes() for p in sorted((out / "frames").iterdir())},
    }


def _farm(scene: Path, cache: Path, progress: Any = None) -> pipeline.Report:
    session = pipeline.open(scene, workers=2, threads=1, batch_size=BATCH, cache_dir=cache)
    assert not session.problems
    return session.render(progress=progress)


def test_two_workers_give_the_frames_and_outputs_of_one_process(
    pool: Any, reference: dict[str, Any], tmp_path: Path
) -> None:
    scene = _write(tmp_path / "scene", SCENE)
    report = run_render(
        scene, tmp_path / "cache", "--batch-size", str(BATCH), "--workers", "2", "--threads", "1"
    )
    assert (report["rendered"], report["workers"], report["threads"]) == (12, 2, 1)
    # Each prompt (two, and the empty negative prompt) once, by one worker, stored by the driver.
    assert report["embeddings_encoded"] == reference["encoded"] == 3
    assert _frames(tmp_path / "cache", _keys(scene)) == reference["frames"]
    out = scene.parent / "renders" / "scene"
    assert (out / "out.gif").read_bytes() == reference["gif"]
    assert {p.name: p.read_bytes() for p in sorted((out / "frames").iterdir())} == reference["pngs"]
    # Nothing left to do: the next run renders nothing and starts no farm.
    again = run_render(scene, tmp_path / "cache", "--workers", "2", "--threads", "1")
    assert (again["rendered"], again["workers"]) == (0, None)


def test_a_worker_killed_mid_render_loses_only_its_batch(
    pool: Any, reference: dict[str, Any], tmp_path: Path
) -> None:
    scene = _write(tmp_path / "scene", SCENE)
    stored: list[str] = []
    killed: list[int] = []
    replaced = pool.replaced
    session: pipeline.Session | None = None

    def progress(p: Progress) -> None:
        stored.extend(p.keys)
        if stored and not killed and session is not None and session.farm is not None:
            busy = session.farm.busy_pids()
            if busy:  # kill -9 a worker with a batch in flight
                killed.append(busy[0])
                os.kill(busy[0], signal.SIGKILL)

    session = pipeline.open(scene, workers=2, threads=1, batch_size=BATCH, cache_dir=tmp_path / "cache")
    report = session.render(progress=progress)
    farm = session.farm
    assert killed and pool.replaced == replaced + 1
    assert killed[0] not in pool.pids()
    # Every frame stored once; sent twice only the killed batch's frames.
    assert Counter(stored) == Counter(_keys(scene)) and report.rendered == 12
    assert (farm.requeued, farm.sent) == (BATCH, 12 + BATCH)
    assert _frames(tmp_path / "cache", _keys(scene)) == reference["frames"]
    assert (scene.parent / "renders" / "scene" / "out.gif").read_bytes() == reference["gif"]


def test_a_hung_worker_is_replaced_and_its_batch_sent_elsewhere(
    pool: Any, reference: dict[str, Any], tmp_path: Path
) -> None:
    scene = _write(tmp_path / "scene", SCENE)
    stopped: list[int] = []
    replaced = pool.replaced
    session = pipeline.open(
        scene, workers=2, threads=1, batch_size=BATCH, cache_dir=tmp_path / "cache", worker_timeout=10
    )

    def progress(p: Progress) -> None:
        if p.keys and not stopped and (busy := session.farm.busy_pids()):
            stopped.append(busy[0])
            os.kill(busy[0], signal.SIGSTOP)  # hangs with its batch: no answer, no death

    try:
        report = session.render(progress=progress)
    finally:
        for pid in stopped:  # whatever happened, the stopped process must not outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert stopped and pool.replaced == replaced + 1 and report.rendered == 12
    assert (session.farm.requeued, session.farm.sent) == (BATCH, 12 + BATCH)
    assert _frames(tmp_path / "cache", _keys(scene)) == reference["frames"]


def test_feedback_frames_from_an_init_image_render_in_order_as_in_one_process(
    pool: Any, tmp_path: Path
) -> None:
    local = _write(tmp_path / "local", FEEDBACK)
    run_render(local, tmp_path / "cache1", "--batch-size", str(BATCH), "--threads", "1")
    scene = _write(tmp_path / "farm", FEEDBACK)
    stored: list[str] = []
    report = _farm(scene, tmp_path / "cache2", lambda p: stored.extend(p.keys))
    keys = _keys(scene)
    assert (report.rendered, report.workers) == (6, 2)
    assert stored == keys  # a frame is sent only once the frame before it is stored
    assert _frames(tmp_path / "cache2", keys) == _frames(tmp_path / "cache1", keys)


@pytest.fixture(scope="module")
def small_device(pool: Any) -> Any:
    """The module's pool with workers that run out of memory above some frames per call
    (``tests._farm_faults``; set with :func:`_out_of_memory_above`); its own workers again after."""
    from pipeline.render import farm
    from tests._farm_faults import SmallDeviceWorker

    own = pool.actor_class
    pool.actor_class = farm.remote_worker(pool.ray, SmallDeviceWorker)
    for actor in list(pool.actors):
        pool.replace(actor)
    yield pool
    pool.actor_class = own
    for actor in list(pool.actors):
        pool.replace(actor)


def _out_of_memory_above(pool: Any, max_jobs: int, kind: str) -> list[int]:
    """Every worker fails above ``max_jobs`` frames from now on; the frames of the calls that failed
    since the last time, all workers together."""
    failed = pool.ray.get([actor.out_of_memory_above.remote(max_jobs, kind) for actor in pool.actors])
    return sorted(n for worker in failed for n in worker)


@pytest.mark.parametrize("kind", ["torch", "runtime"])
def test_a_worker_out_of_memory_has_its_batch_sent_again_in_halves(
    kind: str,
    small_device: Any,
    reference: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pool = small_device
    _out_of_memory_above(pool, 2, kind)
    replaced = pool.replaced
    scene = _write(tmp_path / "scene", SCENE)
    stored: list[str] = []
    session = pipeline.open(scene, workers=2, threads=1, batch_size=4, cache_dir=tmp_path / "cache")
    report = session.render(progress=lambda p: stored.extend(p.keys))
    err = capsys.readouterr().err
    # Both first batches (4 frames, one per worker) fail; the message is said once, as in one process.
    assert _out_of_memory_above(pool, 1 << 30, kind) == [4, 4]
    assert err.count("out of memory") == 1, err
    assert "out of memory with 4 frames per batch; going on with 2" in err and "Traceback" not in err
    # Their halves are sent again and every later batch has 2 frames: 8 + 12 frames sent, no worker lost.
    assert (report.rendered, session.farm.sent, session.farm.requeued, pool.replaced) == (12, 20, 0, replaced)
    assert Counter(stored) == Counter(_keys(scene))
    # Rendered in batches of 2, as the reference: the same frames and outputs.
    assert _frames(tmp_path / "cache", _keys(scene)) == reference["frames"]
    assert (scene.parent / "renders" / "scene" / "out.gif").read_bytes() == reference["gif"]


def test_a_worker_out_of_memory_with_one_frame_is_the_error_of_one_process(
    small_device: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _out_of_memory_above(small_device, 0, "runtime")
    scene = _write(tmp_path / "scene", SCENE)
    options = [
        "--cache-dir",
        str(tmp_path / "cache"),
        "--batch-size",
        "2",
        "--workers",
        "2",
        "--threads",
        "1",
    ]
    with pytest.raises(SystemExit) as exc:
        main([str(scene), *options])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.count("out of memory with 2 frames per batch; going on with 1") == 1, err
    lines = [line for line in err.splitlines() if line.startswith(f"{scene}: ")]
    assert lines == [
        f"{scene}: out of memory rendering a single frame at 32x32: lower the size, use 'dtype: float16' "
        "on a GPU, or free memory used by other programs"
    ], err
    assert "Traceback" not in err
    failed = _out_of_memory_above(small_device, 1 << 30, "runtime")
    assert failed.count(2) == 2 and 1 in failed  # the first two batches, then a frame of one of them


def test_a_worker_with_another_model_is_refused(tmp_path: Path) -> None:
    from pipeline.render.farm_worker import RenderWorker

    scene = _write(tmp_path / "scene", SCENE)
    session = pipeline.open(scene, cache_dir=tmp_path / "cache")
    ref, env = session._resolve()
    job = {
        "ref": replace(ref, fingerprint={**ref.fingerprint, "unet": "0" * 64}),
        "model_spec": ref.spec,
        "model_base": str(scene.parent),
        "scene": session.scene,
        "libraries": env.libraries,
    }
    with pytest.raises(ModelError, match=r"not the model the frames were planned with \(its unet differ"):
        RenderWorker().load(job)


def test_workers_out_of_range_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scene = _write(tmp_path / "scene", SCENE)
    with pytest.raises(SystemExit) as exc:
        main([str(scene), "--cache-dir", str(tmp_path / "cache"), "--workers", "0", "--worker-timeout", "0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--workers: 0 is not allowed; use a whole number from 1 to 1024" in err
    assert "--worker-timeout: 0 is not allowed; use a number of seconds above 0" in err


@pytest.mark.parametrize("option", [["--workers", "2"], ["--ray", "auto"]])
def test_farm_without_ray_says_how_to_install_it(
    option: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    scene = _write(tmp_path / "scene", SCENE)
    with pytest.raises(SystemExit) as exc:
        main([str(scene), "--cache-dir", str(tmp_path / "cache"), *option])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f'{option[0]}: the render farm needs Ray: pip install -e ".[ray]"' in err
    assert not (tmp_path / "cache").exists()
