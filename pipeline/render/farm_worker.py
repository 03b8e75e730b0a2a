"""One render-farm worker: a Ray actor process that renders batches of frame jobs into PNG bytes.

The driver (``pipeline.render.farm``) owns the planner, the cache and the claims; a worker never
touches the cache folder. It is handed, once per render, the scene, the plan's shared parts (base,
embedding recipes, input hashes), the model reference and fingerprint, and the input files as the
bytes that were hashed; then, per batch, the jobs with the prompt embeddings and previous frames
they need. It keeps those in memory (:class:`MemoryCache`), so the ordinary
:class:`~pipeline.render.renderer.FrameRenderer` renders exactly as in a single process::

    worker = RenderWorker(threads=1)                # made a Ray actor by the farm
    worker.load(job)                                # the model, checked against the driver's fingerprint
    pngs, encoded = worker.render(batch)            # PNG bytes per job; embeddings it had to encode
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from pipeline.render.batches import _free_memory, _out_of_memory, encode_png
from pipeline.render.environment import library_versions
from pipeline.render.models import ModelError, load_pipeline, resolve_model
from pipeline.render.renderer import FrameRenderer, configure


class MemoryStore:
    """The part of a cache store a renderer uses (``get``/``put``), in memory."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self.blobs.get(key)

    def put(self, key: str, payload: bytes, **_: Any) -> None:
        self.blobs[key] = payload


class MemoryCache:
    """What a :class:`FrameRenderer` reads and writes in a cache: embeddings and previous frames.
    Filled by the driver batch by batch; what the worker encodes itself is handed back to it."""

    def __init__(self) -> None:
        self.embeddings = MemoryStore()
        self.frames = MemoryStore()


def with_inputs(scene: Any, files: dict[str, str], blobs: dict[str, bytes], folder: Path) -> Any:
    """A copy of ``scene`` placed in ``folder`` so that each of its input paths finds the bytes the
    driver hashed (``blobs`` by content hash): the renderer reads inputs through ``read_input``,
    which checks them against the plan's hashes again. Paths that climb out of the scene's folder
    (``../inputs/a.png``) get as many folders above the scene as they climb; an absolute path (with
    --allow-outside-inputs) is read where it is, so it must be on this machine too."""
    depth = max([Path(rel).parts.count("..") for rel in files] + [0])
    base = folder.joinpath(*[f"up{i}" for i in range(depth)], "scene")
    copy = scene.model_copy()
    copy._path = base / scene.path.name
    for rel, digest in files.items():
        if Path(rel).is_absolute() or digest not in blobs:
            continue
        target = copy.resolve(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(blobs[digest])
    return copy


class RenderWorker:
    """The body of a farm actor (``ray.remote`` is applied by the farm). One batch at a time."""

    def __init__(self, threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.renderer: FrameRenderer | None = None
        self.job_id: str | None = None
        self.folder = tempfile.TemporaryDirectory(prefix="sd-scenes-worker-")

    def info(self) -> dict[str, Any]:
        """Where this worker runs: its process id (the fault tests kill it), host and threads."""
        return {"pid": os.getpid(), "host": socket.gethostname(), "threads": torch.get_num_threads()}

    def load(self, job: dict[str, Any]) -> dict[str, Any]:
        """Load the model of one render, refusing one that is not the model the driver planned with."""
        self.renderer = None  # the last render's model is freed before the next one loads
        driver = job["ref"]
        here = resolve_model(
            job["model_spec"],
            Path(job["model_base"]),
            revision=driver.revision,
            config=job["scene"].config,
            vae=job["scene"].vae,
            scene_dir=job["scene"].base_dir,
        )
        host = socket.gethostname()
        if dict(here.fingerprint) != dict(driver.fingerprint):
            differ = sorted(
                k
                for k in here.fingerprint.keys() | driver.fingerprint.keys()
                if here.fingerprint.get(k) != driver.fingerprint.get(k)
            )
            raise ModelError(
                f"render worker on {host}: model '{driver.spec}' there is not the model the frames were "
                f"planned with (its {', '.join(differ)} differ); install the same model files on every "
                "machine of the farm"
            )
        libraries = library_versions()
        if libraries != job["libraries"]:
            differ = sorted(k for k in libraries if libraries[k] != job["libraries"].get(k))
            raise ModelError(
                f"render worker on {host}: library versions differ from the driver's ("
                + ", ".join(f"{k} {libraries[k]} here, {job['libraries'].get(k)} there" for k in differ)
                + "); they decide the pixels: install the same versions on every machine of the farm"
            )
        for old in Path(self.folder.name).iterdir():  # the inputs of the renders before
            shutil.rmtree(old, ignore_errors=True)
        folder = Path(self.folder.name) / job["id"]
        scene = with_inputs(job["scene"], job["plan"].files, job["inputs"], folder)
        pipe = configure(load_pipeline(here, device=job["device"], dtype=job["dtype"]), scene)
        self.renderer = FrameRenderer(
            pipe, scene, job["plan"], MemoryCache(), device=job["device"], dtype=job["dtype"]
        )
        self.job_id = job["id"]
        return self.info()

    def encode(self, job_id: str, keys: Iterable[str]) -> dict[str, bytes]:
        """Encode prompt embeddings the driver's cache lacks; the driver stores them."""
        renderer = self._renderer(job_id)
        keys = list(keys)
        renderer.encode_prompts(keys)
        return {key: save_safetensors(renderer.embeddings[key]) for key in keys}

    def render(self, job_id: str, batch: dict[str, Any]) -> list[bytes]:
        """PNG bytes of each job of ``batch`` (jobs, embeddings and previous frames), in order."""
        renderer = self._renderer(job_id)
        cache = renderer.cache
        cache.embeddings.blobs.update(batch["embeddings"])
        # Only the frames this batch feeds back from: a long chain must not pile up in memory.
        cache.frames.blobs = dict(batch["previous"])
        try:
            images = list(renderer.render_batch(batch["jobs"]))
        except Exception as exc:
            if not _out_of_memory(exc):
                raise
            # The driver sends the batch again in halves, here or elsewhere, and says so once (as
            # the single-process loop does); its tensors are freed first, traceback and all.
            error = exc.with_traceback(None)
        else:
            return [encode_png(image) for image in images]
        _free_memory()
        raise error

    def _renderer(self, job_id: str) -> FrameRenderer:
        if self.renderer is None or self.job_id != job_id:
            raise RuntimeError(f"render worker {os.getpid()}: render {job_id} is not loaded here")
        return self.renderer
