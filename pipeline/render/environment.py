"""The facts outside a scene file that decide its pixels, gathered once before planning.

Planning is pure; everything it needs from disk is read here first: the model's fingerprint and
scheduler config, the content hash of every input file, the library versions, the device and dtype::

    env = resolve_env(scene)                   # reads files, never imports torch
    jobs = plan(scene, env)

Keeping this apart means ``plan`` can be tested and benchmarked with a hand-made ``RenderEnv``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import shutil
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.modes import IMAGE_FIELDS
from pipeline.plan.prompts import WEIGHTED_FAMILIES, scene_texts, token_counts
from pipeline.render.modelfiles import InputChanged, ModelRef, memo_digest
from pipeline.render.models import resolve_model
from pipeline.scene.core import Scene


@dataclass(frozen=True)
class RenderEnv:
    """Everything besides the scene that goes into keys. Plain data only."""

    model: str
    pipeline_class: str
    family: str
    fingerprint: dict[str, str]
    scheduler_config: dict[str, Any]
    device: str = "cpu"
    dtype: str = "float32"
    libraries: dict[str, str] = field(default_factory=dict)
    # scene-relative path -> sha256 of the file's content (init images, masks, learned embeddings, LoRAs)
    files: dict[str, str] = field(default_factory=dict)
    model_kind: str = "embedded"
    # The model's first CLIP tokenizer folder when it is on disk: the planner counts prompt tokens with
    # it (``pipeline.plan.prompts``); its files are in the fingerprint ("tokenizer"), so not a key itself.
    tokenizer: str | None = None
    # Prompt text -> its token count with that tokenizer, for the scene's texts that may pass one window,
    # as far as known (``pipeline.plan.prompts.token_counts``, remembered in the cache's file-hash memo):
    # the planner reads the tokenizer only for the others. Facts about the texts, not a key.
    token_counts: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)


def input_files(scene: Scene) -> list[str]:
    """Every input file a scene names, as written (relative to the scene)."""
    names: list[str] = [getattr(scene, f) for f in IMAGE_FIELDS if getattr(scene, f)]
    for kf in scene.keyframes:
        names += [getattr(kf, f) for f in IMAGE_FIELDS if getattr(kf, f)]
    names += [e.path for e in scene.embeddings] + [lo.path for lo in scene.loras]
    names += [scene.audio.path] if scene.audio is not None else []  # in no frame key: the MP4's record
    return list(dict.fromkeys(names))


def resolve_env(
    scene: Scene,
    *,
    device: str = "auto",
    dtype: str | None = None,
    model: str | None = None,
    memo: MutableMapping[str, Any] | None = None,
    ref: ModelRef | None = None,
) -> RenderEnv:
    """Read what the plan needs from disk: model fingerprint, input hashes, versions, device.

    ``memo`` (the cache's file-hash memo, updated in place) spares re-hashing unchanged model files
    and re-counting the tokens of the scene's long prompts (the planner would read the tokenizer).
    """
    ref = ref or resolve_model(
        model or scene.model,
        scene.base_dir,
        revision=scene.revision,
        memo=memo,
        config=scene.config,
        vae=scene.vae,
    )
    dev = detect_device() if device == "auto" else device
    # Input files are small: hash their content every time, so an edit that restores the mtime still counts.
    files = {rel: memo_digest(scene.resolve(rel), None) for rel in input_files(scene)}
    tokenizer = (
        str(ref.folder / "tokenizer")
        if ref.folder is not None and (ref.folder / "tokenizer").is_dir()
        else None
    )
    counts: dict[str, int] = {}
    if memo is not None and ref.family in WEIGHTED_FAMILIES:
        counts = token_counts(tokenizer, ref.fingerprint.get("tokenizer"), scene_texts(scene), memo)
    return RenderEnv(
        model=ref.spec,
        pipeline_class=ref.pipeline_class,
        family=ref.family,
        fingerprint=dict(ref.fingerprint),
        scheduler_config=ref.scheduler_config(),
        device=dev,
        dtype=choose_dtype(dtype or scene.dtype, dev),
        libraries=library_versions(),
        files=files,
        model_kind=ref.kind,
        tokenizer=tokenizer,
        token_counts=counts,
    )


def read_input(scene: Scene, files: Mapping[str, str], digest: str) -> bytes:
    """The bytes of the input file whose planned content hash is ``digest``, checked against it.

    Frames are keyed by the hash taken when planning; the renderer decodes and loads inputs from the
    bytes this returns, never from a second read of the file, so a frame is only ever stored under a
    key computed from the exact bytes that made it. Raises :class:`InputChanged` if the file now holds
    other content (several names may share one content: any one that still holds it will do).
    """
    names = [rel for rel, h in files.items() if h == digest]
    if not names:
        raise KeyError(f"no input file of this plan has content {digest[:12]}")
    for rel in names:
        try:
            data = scene.resolve(rel).read_bytes()
        except OSError:
            continue
        if hashlib.sha256(data).hexdigest() == digest:
            return data
    raise InputChanged(
        f"input '{names[0]}' changed during the run, after its frames were planned; nothing was rendered "
        "from the new content. Run again: the frames are planned from the file as it is then"
    )


def detect_device() -> str:
    """'cuda', 'mps' or 'cpu', decided without importing torch (a no-op re-run never loads it)."""
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "cpu"
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "mps"
    if "+cpu" in version:
        return "cpu"
    if os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi"):
        return "cuda"
    return "cpu"


def torch_device() -> str:
    """The device torch itself can use: the check behind :func:`detect_device`'s guess."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def choose_dtype(requested: str, device: str) -> str:
    """fp16 on CUDA (halves memory, tensor cores), fp32 elsewhere (CPU half precision is slow or missing)."""
    if requested != "auto":
        return requested
    return "float16" if device == "cuda" else "float32"


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose numerics decide the pixels: torch, diffusers and transformers
    compute them; tokenizers makes the token ids, peft applies LoRA weights and Pillow resizes the
    input images."""
    out = {}
    for dist in ("torch", "diffusers", "transformers", "tokenizers", "peft", "pillow"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out
