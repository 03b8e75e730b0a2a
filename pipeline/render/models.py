"""Models: resolving a scene's ``model:`` to files and a fingerprint, and loading it.

Resolution and fingerprints are torch-free so that ``--plan`` and a no-op re-run never import
torch; only :func:`load_pipeline` does::

    ref = resolve_model("tiny", scene_dir)        # embedded | local folder | Hugging Face id
    ref.fingerprint                                # {"unet": "9f2c...", "vae": ..., ...}
    pipe = load_pipeline(ref, device="cpu", dtype="float32")

A fingerprint is per component (unet, vae, text_encoder, ...): the commit hash for a Hugging Face
model, or a hash of a local folder's files. Per component, so that an embedding cached for one
checkpoint is reused by another with the same text encoder. What a resolved model is (``ModelRef``),
the check of a ``model:`` and the hashes and stamps of its files are in ``pipeline.render.modelfiles``;
single-file checkpoints and VAE overrides in ``pipeline.render.singlefile``; the device and dtype in
``pipeline.render.environment``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from pipeline.plan.keys import json_digest
from pipeline.render.checkpoints import is_checkpoint_spec
from pipeline.render.modelfiles import (
    _COMMIT,
    EMBEDDED_DIR,
    WEIGHT_SUFFIXES,
    ModelError,
    ModelRef,
    _folder_fingerprint,
    _read_index,
    check_model_spec,
    check_unchanged,
    embedded_models,
)
from pipeline.render.singlefile import load_checkpoint, load_vae, resolve_checkpoint, resolve_vae
from pipeline.scene.inputfiles import path_kind

RANDOM_WEIGHTS_NOTE = (
    "note: model '{name}' is the embedded test model with RANDOM weights: frames are noise-like patterns. "
    "For real images set 'model:' in the scene (or --model) to a Hugging Face id such as "
    "'stable-diffusion-v1-5/stable-diffusion-v1-5' or to a local diffusers folder."
)
# Text-side components per family: what an embedding depends on.
TEXT_COMPONENTS: dict[str, tuple[str, ...]] = {
    "sd": ("text_encoder", "tokenizer"),
    "sdxl": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
    "sd3": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
}
T5_COMPONENTS: tuple[str, ...] = ("text_encoder_3", "tokenizer_3")


def resolve_model(
    spec: str,
    base_dir: Path,
    *,
    revision: str | None = None,
    memo: MutableMapping[str, Any] | None = None,
    config: str | None = None,
    vae: str | None = None,
    scene_dir: Path | None = None,
) -> ModelRef:
    """Find a model's files and fingerprint them, without importing torch.

    ``base_dir`` is what a folder path is relative to: the scene's folder for the scene's ``model:``,
    the current folder for ``--model``. ``config`` (the configs of a single-file checkpoint) and
    ``vae`` (a VAE replacing the model's) are the scene's, relative to ``scene_dir`` (default
    ``base_dir``). Raises :class:`ModelError` with the words of :func:`check_model_spec` for a spec
    that names no model, before any network access.
    """
    problem = check_model_spec(spec, base_dir)
    if problem:
        raise ModelError(f"model {problem}")
    options_dir = scene_dir or base_dir
    local = (base_dir / Path(spec).expanduser()).resolve() if spec not in embedded_models() else None
    if local is not None and is_checkpoint_spec(spec) and path_kind(local) == "file":
        ref = resolve_checkpoint(spec, local, config, options_dir, memo, keep_vae=vae is None)
    else:
        ref = _resolve_folder(spec, base_dir, revision, memo)
    if vae is not None:
        ref.vae = resolve_vae(vae, options_dir, ref, memo)
        ref.fingerprint["vae"] = ref.vae.fingerprint
    return ref


def _resolve_folder(
    spec: str, base_dir: Path, revision: str | None, memo: MutableMapping[str, Any] | None
) -> ModelRef:
    """An embedded model, a local diffusers folder or a Hugging Face id."""
    if spec in embedded_models():
        folder = EMBEDDED_DIR / spec
    else:
        folder = (base_dir / Path(spec).expanduser()).resolve()
        if not (folder / "model_index.json").is_file():
            return _resolve_hub(spec, revision)
    # Only the project's own folders hold its random-weight models; any other folder is the user's.
    kind = "embedded" if folder.resolve().parent == EMBEDDED_DIR else "local"
    index, stamps = _read_index(spec, folder)
    _check_folder(spec, folder, index)
    # By what it says, not its layout: re-indenting model_index.json changes no pixel, so no key.
    fingerprint = {"model_index": json_digest(index)}
    fingerprint.update(_folder_fingerprint(folder, index, memo, stamps))
    return ModelRef(spec, kind, folder, index, fingerprint, revision, stamps)


def _check_folder(spec: str, folder: Path, index: dict[str, Any]) -> None:
    """Every component named in model_index.json is there, with its config and its weights."""
    fix = "re-download it" + (
        " or run 'python tools/make_tiny_models.py'" if folder.parent == EMBEDDED_DIR else ""
    )
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        comp = folder / name
        if not comp.is_dir():
            raise ModelError(
                f"model '{spec}' is incomplete: its '{name}' folder is missing in {folder}; {fix}"
            )
        is_model = any(comp.glob("config.json"))
        if is_model and not any(p.suffix in WEIGHT_SUFFIXES for p in comp.iterdir()):
            raise ModelError(f"model '{spec}' is incomplete: no weight file in {comp}; {fix}")


def _resolve_hub(repo_id: str, revision: str | None) -> ModelRef:
    """A Hugging Face id: its commit from the local HF cache, or from the hub when online."""
    from huggingface_hub import constants, snapshot_download  # torch-free

    offline = constants.HF_HUB_OFFLINE
    try:
        # Only the small files: the weights are fetched by from_pretrained when rendering.
        folder = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=["model_index.json", "*/config.json", "*/*_config.json", "*.txt", "*/*.json"],
                local_files_only=offline,
            )
        )
    except Exception as exc:
        hint = (
            "HF_HUB_OFFLINE is set and the model is not in the local Hugging Face cache; "
            "download it once with network access, or point 'model:' at a local diffusers folder"
            if offline
            else "check the id (owner/name), your network, and HF_TOKEN for gated models"
        )
        raise ModelError(f"cannot find model '{repo_id}': {type(exc).__name__}: {exc}. {hint}") from None
    index = json.loads((folder / "model_index.json").read_text())
    commit = folder.name  # snapshots/<commit hash>
    fp = {name: f"hub:{repo_id}@{commit}" for name in index if not name.startswith("_")}
    return ModelRef(repo_id, "hub", folder, index, fp, revision)


def load_pipeline(ref: ModelRef, *, device: str, dtype: str) -> Any:
    """Load the diffusers pipeline named by ``ref`` onto ``device`` in ``dtype``."""
    # Library chatter (optional torchvision backends, loading bars) would bury our own progress bar.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import diffusers
    import torch
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    cls = getattr(diffusers, ref.pipeline_class, None) or diffusers.DiffusionPipeline
    source: str | Path = ref.folder if ref.kind != "hub" else ref.spec
    kwargs: dict[str, Any] = {"torch_dtype": getattr(torch, dtype)}
    if ref.kind == "hub":
        # The commit the fingerprint names, not the branch: a push to the model after planning must not
        # put other weights under the planned keys.
        commit = ref.folder.name if ref.folder is not None else ""
        revision = commit if _COMMIT.fullmatch(commit) else ref.revision
        if revision:
            kwargs["revision"] = revision
    # A component listed as [null, null] (SD3 without T5) must be passed as None, or diffusers refuses.
    for name, value in ref.index.items():
        if not name.startswith("_") and isinstance(value, list) and value[0] is None:
            kwargs[name] = None
    if ref.family == "sd" and "safety_checker" in ref.index:
        # Frames of an animation are judged by the artist; a blacked-out frame would break the clip.
        kwargs["safety_checker"] = None
        kwargs["requires_safety_checker"] = False
    try:
        with warnings.catch_warnings():
            # diffusers >= 0.36 renames torch_dtype to dtype; the old name works everywhere we support.
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            if ref.vae is not None:
                kwargs["vae"] = load_vae(ref, kwargs["torch_dtype"])
            if ref.kind == "file":
                pipe = load_checkpoint(ref, cls, kwargs)
            else:
                pipe = cls.from_pretrained(source, **kwargs)
    except Exception as exc:  # damaged files surface as OSError, ValueError, SafetensorError, RuntimeError...
        check_unchanged(ref)  # a file half-copied over while loading is that, not a damaged model
        where = {"hub": f"the Hugging Face cache entry of {ref.spec}", "file": ref.checkpoint}.get(
            ref.kind, ref.folder
        )
        raise ModelError(
            f"cannot load model '{ref.spec}' from {where}: {type(exc).__name__}: {str(exc)[:300]}. "
            "A weight file may be truncated or damaged: re-download the model"
            + (" (or run 'python tools/make_tiny_models.py')" if ref.is_embedded else "")
        ) from None
    check_unchanged(ref)
    try:
        pipe = pipe.to(device)
    except Exception as exc:  # out of memory, or a device that is not there
        raise ModelError(
            f"cannot move model '{ref.spec}' to {device}: {type(exc).__name__}: {str(exc)[:300]}. "
            "Free memory used by other programs, use 'dtype: float16', a smaller model, or --device cpu"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe
