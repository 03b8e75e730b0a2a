"""The render farm: one scene rendered by many GPUs (or CPU workers), on one machine or a cluster,
through Ray, with the same exact cache as a single-process render.

The driver keeps its planner, its cache and its claims (``pipeline.render.loop.Renders``); the farm
is the renderer it drives, with ``submit(batch) -> Future`` and a ``capacity`` of one batch per
worker. Workers are Ray actors (``pipeline.render.farm_worker``) that load the model once per
render and never touch the cache folder::

    pool = farm_pool(workers=2, address=None, device="cpu")      # a local Ray cluster, 2 workers
    renderer = FarmRenderer(pool, setup)                         # every worker loads the model
    future = renderer.submit(batch)                               # -> PNG bytes per job, verified

A batch ships its jobs (keys and recipes), the prompt embeddings it needs (each encoded once, by one
worker, and stored by the driver) and, for feedback frames, the previous frame's PNG; input files
travel once per render as the bytes that were hashed. Faults: a worker that dies (kill -9, a lost
machine) loses its batch in flight, which goes to another worker, and is replaced; a batch that
runs past ``timeout_s`` has its worker killed and replaced, and goes elsewhere the same way.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import io
import itertools
import os
import queue
import sys
import threading
from concurrent.futures import CancelledError, Future
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.cpu import free_cores
from pipeline.plan.planner import FrameJob
from pipeline.render.environment import read_input

RAY_HINT = 'the render farm needs Ray: pip install -e ".[ray]"  (or: pip install "ray[default]")'
# A batch that has not come back after this long has a hung worker (a first batch on a GPU includes
# its warm-up). --worker-timeout changes it.
DEFAULT_TIMEOUT_S = 900.0
# A batch whose worker dies this many times is not the workers' fault: the render stops.
MAX_TRIES = 3
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class FarmError(RuntimeError):
    """The farm cannot start (``option``: the option at fault, an exit 2) or go on (no worker left, a
    batch that kills every worker it meets)."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


def ray_missing() -> str | None:
    """The install hint when Ray is not installed, else None (checked without importing it)."""
    return RAY_HINT if importlib.util.find_spec("ray") is None else None


def farm_problems(workers: int | None, address: str | None, timeout_s: float | None) -> list[tuple[str, str]]:
    """(option, what is wrong) for each farm option that cannot be used; [] when all can."""
    problems = []
    if workers is not None and not 1 <= workers <= 1024:
        problems.append(("--workers", f"{workers} is not allowed; use a whole number from 1 to 1024"))
    if timeout_s is not None and not timeout_s > 0:
        problems.append(
            ("--worker-timeout", f"{timeout_s:g} is not allowed; use a number of seconds above 0")
        )
    if (workers is not None or address is not None) and (hint := ray_missing()) is not None:
        problems.append(("--ray" if workers is None else "--workers", hint))
    return problems


def verify_png(data: Any, size: tuple[int, int]) -> bytes:
    """``data`` if it is a whole PNG of ``size`` (checked chunk by chunk, CRCs included), else an error."""
    from PIL import Image

    if not isinstance(data, bytes) or not data.startswith(PNG_SIGNATURE):
        raise FarmError("a render worker sent back something that is not a PNG")
    with Image.open(io.BytesIO(data)) as image:
        if image.size != size:
            raise FarmError(f"a render worker sent back a {image.size} frame; the scene is {size}")
        image.verify()
    return data


class Pool:
    """Render workers on a Ray cluster: started once per process and reused by every render."""

    def __init__(self, workers: int | None, address: str | None, device: str, threads: int | None) -> None:
        import ray

        self.ray = ray
        self.address = address
        self.device = device
        if not ray.is_initialized():
            # Workers import this package from where the driver does (a checkout, an editable install).
            path = os.pathsep.join(
                [str(Path(__file__).resolve().parents[2]), *filter(None, [os.environ.get("PYTHONPATH")])]
            )
            options: dict[str, Any] = {
                "include_dashboard": False,
                "logging_level": "ERROR",
                "log_to_driver": False,
                "runtime_env": {"env_vars": {"PYTHONPATH": path}},
            }
            if address is None:
                # A cluster of our own, even where 'ray start' left one to join (that is --ray).
                options.update(address="local", num_cpus=os.cpu_count() or 1)
            else:
                options["address"] = address
            try:
                ray.init(**options)
            except Exception as exc:  # ConnectionError, a malformed address...
                where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
                raise FarmError(
                    f"cannot start or join {where}: {type(exc).__name__}: {str(exc)[:300]}"
                    + (
                        " (start it with 'ray start --head'; its address is printed there)" if address else ""
                    ),
                    option="--ray" if address else "--workers",
                ) from None
            atexit.register(ray.shutdown)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        cpus = int(resources.get("CPU", 1))
        if device == "cuda":
            self.workers = workers or gpus
            if self.workers > gpus:
                raise FarmError(
                    f"{self.workers} render workers need a GPU each; there are {gpus}", option="--workers"
                )
            self.actor_options: dict[str, Any] = {"num_gpus": 1, "num_cpus": 0 if address is None else 1}
            self.threads: int | None = threads
        else:
            nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
            self.workers = workers or nodes
            if address is None:
                # Here the threads are shared out by us (Ray would hold back a worker past the cores).
                self.threads = threads or max(1, free_cores() // self.workers)
                self.actor_options = {"num_cpus": 0}
            else:
                if self.workers > cpus:
                    raise FarmError(
                        f"{self.workers} render workers need a core each; the cluster has {cpus}",
                        option="--workers",
                    )
                # Ray places the workers by the cores each asks for, spread over the machines.
                self.threads = threads or max(1, cpus // self.workers)
                self.actor_options = {"num_cpus": min(self.threads, cpus // self.workers)}
        from pipeline.render.farm_worker import RenderWorker

        self.actor_class = remote_worker(ray, RenderWorker)
        self.actors = [self._start() for _ in range(self.workers)]
        self.replaced = 0  # workers replaced after dying or hanging (the fault tests read it)
        self.lock = threading.Lock()

    def _start(self) -> Any:
        return self.actor_class.options(**self.actor_options).remote(self.threads)

    def replace(self, actor: Any) -> Any:
        """Kill ``actor`` (if it still runs) and start a new worker in its place."""
        with self.lock:
            with contextlib.suppress(Exception):  # already gone
                self.ray.kill(actor, no_restart=True)
            fresh = self._start()
            self.actors = [fresh if a is actor else a for a in self.actors]
            self.replaced += 1
            return fresh

    def shutdown(self) -> None:
        """End every worker (the Ray cluster stays up for the next pool)."""
        for actor in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor, no_restart=True)
        self.actors = []

    def pids(self) -> list[int]:
        """The process id of each worker (for the fault tests: kill -9 one)."""
        return [info["pid"] for info in self.ray.get([a.info.remote() for a in self.actors])]


def remote_worker(ray: Any, body: type) -> Any:
    """The Ray actor class of a worker body (:class:`~pipeline.render.farm_worker.RenderWorker`):
    one batch at a time; a dead worker is replaced by the farm, not restarted by Ray (a restart
    would retry its batch behind our back)."""
    return ray.remote(max_restarts=0, max_task_retries=0, max_concurrency=1)(body)


_POOLS: dict[tuple[Any, ...], Pool] = {}


def farm_pool(workers: int | None, address: str | None, device: str, threads: int | None = None) -> Pool:
    """The pool of ``workers`` render workers (None: one per GPU, or per machine for CPU workers) on
    the local Ray cluster (``address`` None, started here) or the cluster at ``address``. Kept for the
    process: a second render (``--watch``, a notebook, the tests) finds its workers started."""
    key = (workers, address, device, threads)
    if key not in _POOLS:
        for other in list(_POOLS):  # one pool at a time: its workers hold the cores (or GPUs)
            _POOLS.pop(other).shutdown()
        _POOLS[key] = Pool(workers, address, device, threads)
    return _POOLS[key]


class FarmRenderer:
    """The batch renderer that the render loop drives when rendering on a farm (see the module doc)."""

    _ids = itertools.count()

    def __init__(self, pool: Pool, setup: Any, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.pool = pool
        self.ray = pool.ray
        self.scene = setup.scene
        self.plan = setup.plan
        self.cache = setup.cache
        self.timeout_s = timeout_s
        self.load_timeout_s = max(timeout_s, DEFAULT_TIMEOUT_S)  # a big checkpoint, a cold disk
        self.encoded = 0  # embeddings the workers encoded for this render
        self.sent = 0  # frames sent to workers, a batch sent again counted again
        self.requeued = 0  # frames whose batch was lost with its worker and sent to another one
        self.size = (self.scene.width, self.scene.height)
        ref = setup.ref
        local = ref.kind in ("local", "file")
        self.job: dict[str, Any] = {
            "id": f"{os.getpid()}-{next(self._ids)}",
            "scene": self.scene,
            "plan": replace(self.plan, jobs=[]),  # what every frame shares; the jobs travel by batch
            "ref": ref,
            # A folder or checkpoint by its absolute path; an embedded model or hub id by name.
            "model_spec": str(ref.checkpoint if ref.kind == "file" else ref.folder) if local else ref.spec,
            "model_base": str(self.scene.base_dir),
            "libraries": dict(setup.env.libraries),
            "device": setup.env.device,
            "dtype": setup.env.dtype,
            # Each input once, read and checked here: a worker elsewhere needs only the model.
            "inputs": {h: read_input(self.scene, self.plan.files, h) for h in set(self.plan.files.values())},
        }
        self._job_ref = self.ray.put(self.job)
        self._idle: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._shipped: dict[Any, set[str]] = {}  # embedding keys each worker holds
        self._starting = 0  # replacement workers loading the model
        self._closed = False
        self.capacity = self.workers = pool.workers
        loads = {actor: actor.load.remote(self._job_ref) for actor in pool.actors}
        self._pids: dict[Any, int] = {}  # each loaded worker's process id
        self._busy: set[Any] = set()  # workers with a batch in flight
        for actor, pending in loads.items():
            try:
                # A model error stops the render (exit 2). A load may take longer than a batch.
                self._pids[actor] = self._get(pending, actor, self.load_timeout_s)["pid"]
            except _WorkerLost:
                continue  # its replacement joins once loaded
            self._idle.put(actor)

    def busy_pids(self) -> list[int]:
        """Process ids of the workers rendering a batch now (the fault tests kill one)."""
        with self._lock:
            return [self._pids[a] for a in self._busy if a in self._pids]

    # The loop's side: submit a batch, get a future of its PNGs.
    def render_batch(self, jobs: list[FrameJob]) -> list[bytes]:
        return self.submit(jobs).result()

    def submit(self, jobs: list[FrameJob]) -> Future[list[bytes]]:
        """Send a batch to the next free worker; the future holds its verified PNG bytes in order.
        Embeddings and previous frames are read here, in the driver's thread, from its cache."""
        keys = list(dict.fromkeys(k for job in jobs for k in job.view.embedding_keys()))
        present = self.cache.embeddings.present(keys)
        if missing := [k for k in keys if k not in present]:
            self._encode(missing)
        embeddings = {k: self.cache.embeddings.get(k) for k in keys}
        previous = {}
        for job in jobs:
            prev = job.view.mode.prev
            if prev is not None and (blob := self.cache.frames.get(prev)) is not None:
                previous[prev] = blob
        future: Future[list[bytes]] = Future()
        batch = {"jobs": list(jobs), "embeddings": embeddings, "previous": previous}
        threading.Thread(target=self._dispatch, args=(batch, future), name="farm batch", daemon=True).start()
        return future

    def close(self) -> None:
        """Stop replacing workers for this render; the pool's workers stay for the next one."""
        self._closed = True

    # The workers' side: one thread per batch in flight, each waiting on its worker.
    def _take(self) -> Any:
        """The next free worker (waiting for one); FarmError when none is left."""
        while True:
            if self._closed:
                raise CancelledError  # the render stopped (Ctrl-C, an error): send nothing more
            try:
                return self._idle.get(timeout=1.0)
            except queue.Empty:
                with self._lock:
                    alive = self._starting or len(self.pool.actors)
                if not alive:
                    raise FarmError("no render worker is left") from None

    def _encode(self, keys: list[str]) -> None:
        """Encode embeddings the cache lacks, on one worker, and store them: each is encoded once."""
        for _ in range(MAX_TRIES):
            actor = self._take()
            try:
                blobs = self._get(actor.encode.remote(self.job["id"], keys), actor)
            except _WorkerLost:
                continue
            except Exception:
                self._idle.put(actor)  # the worker raised: free for the next call
                raise
            self._shipped.setdefault(actor, set()).update(blobs)
            self._idle.put(actor)
            for key, blob in blobs.items():
                self.cache.embeddings.put(key, blob)
            self.encoded += len(blobs)
            return
        raise FarmError(f"encoding {len(keys)} prompt embeddings lost {MAX_TRIES} render workers")

    def _dispatch(self, batch: dict[str, Any], future: Future[list[bytes]]) -> None:
        jobs = batch["jobs"]
        try:
            for _ in range(MAX_TRIES):
                actor = self._take()
                held = self._shipped.setdefault(actor, set())
                sent = {
                    **batch,
                    "embeddings": {k: v for k, v in batch["embeddings"].items() if k not in held},
                }
                with self._lock:
                    self.sent += len(jobs)
                    self._busy.add(actor)
                try:
                    pngs = self._get(actor.render.remote(self.job["id"], sent), actor)
                except _WorkerLost as lost:
                    with self._lock:
                        self.requeued += len(jobs)
                    print(
                        f"a render worker was lost ({lost}); its {len(jobs)} frames go to another",
                        file=sys.stderr,
                    )
                    continue
                except Exception:
                    # The worker raised (out of memory, a frame it cannot render): the loop decides
                    # what follows, and the worker is free for the next batch.
                    with self._lock:
                        self._busy.discard(actor)
                    self._idle.put(actor)
                    raise
                held.update(sent["embeddings"])
                with self._lock:
                    self._busy.discard(actor)
                self._idle.put(actor)
                if len(pngs) != len(jobs):
                    raise FarmError(f"a render worker sent {len(pngs)} frames for a batch of {len(jobs)}")
                future.set_result([verify_png(png, self.size) for png in pngs])
                return
            raise FarmError(
                f"frames {jobs[0].frame}..{jobs[-1].frame} lost {MAX_TRIES} render workers in a row; "
                "stopping (the frames finished so far are cached)"
            )
        except BaseException as exc:  # handed to the loop, which raises it
            future.set_exception(exc)

    def _get(self, pending: Any, actor: Any, timeout_s: float | None = None) -> Any:
        """The result of a worker's call. A worker that died or ran past the timeout is replaced
        (the replacement loads this render's model, then takes batches) and :class:`_WorkerLost`
        raised; an error the worker raised (a model that differs) is raised as it is."""
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        try:
            return self.ray.get(pending, timeout=timeout_s or self.timeout_s)
        except RayActorError as exc:
            why = f"{type(exc).__name__}"
        except GetTimeoutError:
            why = f"no answer in {self.timeout_s:g} s"
        except RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise
        self._shipped.pop(actor, None)
        with self._lock:
            self._busy.discard(actor)
        if not self._closed:
            self._load_later(self.pool.replace(actor))
        raise _WorkerLost(why)

    def _load_later(self, actor: Any) -> None:
        """Load this render's model on a replacement worker; it takes batches once loaded."""
        with self._lock:
            self._starting += 1

        def load() -> None:
            try:
                info = self.ray.get(actor.load.remote(self._job_ref), timeout=self.load_timeout_s)
            except Exception as exc:
                print(f"a replacement render worker failed to start: {exc}", file=sys.stderr)
            else:
                with self._lock:
                    self._pids[actor] = info["pid"]
                if not self._closed:
                    self._idle.put(actor)
            finally:
                with self._lock:
                    self._starting -= 1

        threading.Thread(target=load, name="farm worker start", daemon=True).start()


class _WorkerLost(Exception):
    """A worker died or hung (it has been replaced)."""
