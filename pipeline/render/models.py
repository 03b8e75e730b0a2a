"""Models: resolving a scene's ``model:`` to files, its fingerprint, device and dtype, and loading it.

Resolution, fingerprints and device choice are torch-free so that ``--plan`` and a no-op re-run
never import torch; only :func:`load_pipeline` does::

    ref = resolve_model("tiny", scene_dir)        # embedded | local folder | Hugging Face id
    ref.fingerprint                                # {"unet": "9f2c...", "vae": ..., ...}
    pipe = load_pipeline(ref, device="cpu", dtype="float32")

A fingerprint is per component (unet, vae, text_encoder, ...): the commit hash for a Hugging Face
model, or a hash of a local folder's files. Per component, so that an embedding cached for one
checkpoint is reused by another with the same text encoder.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import sys
import warnings
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.plan.keys import file_digest, json_digest
from pipeline.render.checkpoints import (
    CHECKPOINT_SUFFIXES,
    inspect_checkpoint,
    is_checkpoint_spec,
)
from pipeline.scene.inputfiles import path_kind

EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "embedded"
# Embedded models with trained weights: they draw what their prompts ask (within their 64 emoji).
TRAINED_EMBEDDED = frozenset({"demo"})
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


class ModelError(Exception):
    """A model cannot be found or read; the message says what to do."""


class InputChanged(OSError):
    """An input file (image, learned embedding, LoRA, model file) changed after the run was planned.

    The frames' keys were computed from the content hashed when planning; rendering from other bytes
    would store frames under keys that do not describe them, and every later run would reuse them.
    So the run stops before it stores such a frame. It is an OSError: like a full disk, it is a fault
    of the files during the run, not of the scene (exit 1), and running again plans from the new
    content and resumes.
    """


@dataclass
class VaeRef:
    """A VAE that replaces the model's (``vae:``): a diffusers VAE folder, a single file, or a hub id."""

    spec: str
    kind: str  # "local" | "file" | "hub"
    path: Path  # the folder (with config.json in it or in ``subfolder``), the file, or the hub snapshot
    subfolder: str | None
    fingerprint: str
    revision: str | None = None  # hub: the commit


@dataclass
class ModelRef:
    """A resolved model: where its files are and what identifies them."""

    spec: str  # as written in the scene or on the command line
    kind: str  # "embedded" | "local" | "hub" | "file" (a single-file checkpoint)
    # local files (embedded, local folder, or a hub snapshot already on disk); for a single-file
    # checkpoint, the diffusers folder its component configs, tokenizers and scheduler come from
    folder: Path | None
    index: dict[str, Any]  # model_index.json
    fingerprint: dict[str, str] = field(default_factory=dict)
    revision: str | None = None
    # Local files only: path in the folder -> stat stamp taken BEFORE the file was hashed. If every
    # stamp is the same once the model is loaded, no file was written or replaced in between (any
    # write or rename moves ctime, which cannot be set back), so the loaded weights are the hashed ones.
    # (Absolute paths for files outside ``folder``: a single-file checkpoint, a VAE override.)
    stamps: dict[str, str] = field(default_factory=dict)
    checkpoint: Path | None = None  # kind "file": the checkpoint
    from_file: frozenset[str] = frozenset()  # kind "file": the components whose weights it holds
    vae: VaeRef | None = None  # the scene's ``vae:``, replacing the model's own

    @property
    def pipeline_class(self) -> str:
        return str(self.index.get("_class_name", "StableDiffusionPipeline"))

    @property
    def family(self) -> str:
        return family_of(self.pipeline_class)

    @property
    def is_embedded(self) -> bool:
        return self.kind == "embedded"

    @property
    def has_random_weights(self) -> bool:
        """The embedded test models are random; ``demo`` was trained (tools/train_demo_model.py)."""
        return self.is_embedded and (self.folder is None or self.folder.name not in TRAINED_EMBEDDED)

    def scheduler_config(self) -> dict[str, Any]:
        """The model's own scheduler config (JSON), used in keys and to build named schedulers."""
        if self.folder is None:
            return {}
        path = self.folder / "scheduler" / "scheduler_config.json"
        if not path.is_file():
            return {}
        try:
            return dict(json.loads(path.read_text()))
        except ValueError as exc:
            raise ModelError(
                f"model '{self.spec}': {path} is not valid JSON ({exc}); re-download the model"
            ) from None


def family_of(pipeline_class: str) -> str:
    """'sd' (1.x/2.x), 'sdxl' or 'sd3', from a diffusers pipeline class name."""
    if "StableDiffusion3" in pipeline_class:
        return "sd3"
    if "StableDiffusionXL" in pipeline_class:
        return "sdxl"
    return "sd"


def modes_for(pipeline_class: str) -> tuple[str, ...]:
    """The modes a checkpoint can render: inpainting and depth checkpoints have extra UNet inputs."""
    if "Depth2Img" in pipeline_class:
        return ("depth2img",)
    if "Inpaint" in pipeline_class:
        return ("inpaint",)
    return ("txt2img", "img2img", "inpaint", "feedback")


def embedded_models() -> list[str]:
    """Names of the models that ship inside the project (random weights, for tests and examples)."""
    if not EMBEDDED_DIR.is_dir():
        return []
    return sorted(p.name for p in EMBEDDED_DIR.iterdir() if (p / "model_index.json").is_file())


# A Hugging Face repository id: owner/name.
HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model_spec(spec: str, base_dir: Path) -> str | None:
    """Why ``spec`` names no model, or None. Torch-free, reads no weights, never uses the network.

    A model is an embedded name, a diffusers folder (relative to ``base_dir``: the scene's folder for
    ``model:``, the current folder for ``--model``), or a Hugging Face id. The same check, and the
    same words, for both; the caller puts ``model:`` or ``--model:`` before the message.
    """
    names = embedded_models()
    if spec in names:
        return None
    shown = _shorten(spec)
    try:
        local = (base_dir / Path(spec).expanduser()).resolve()
        kind = path_kind(local)
    except (OSError, RuntimeError, ValueError) as exc:  # too long, a symlink loop, a NUL byte
        kind = f"unusable: {getattr(exc, 'strerror', None) or exc}"
    if kind.startswith("unusable: "):
        return f"'{shown}' is not a usable path ({kind.removeprefix('unusable: ')})"
    if kind == "missing" and is_checkpoint_spec(spec):
        return f"checkpoint file '{shown}' not found (looked for {_shorten(str(local))})"
    if kind == "file":
        if not is_checkpoint_spec(spec):
            return (
                f"'{shown}' is a file but not a checkpoint; a model is a diffusers folder (with a model_index.json) "
                f"or a single-file checkpoint ending in {' or '.join(CHECKPOINT_SUFFIXES)}"
            )
        found = inspect_checkpoint(local)
        return f"'{shown}': {found}" if isinstance(found, str) else None
    close = difflib.get_close_matches(spec, names, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    embedded = f"embedded: {', '.join(names) or 'none'}"
    if kind == "missing" and not spec.startswith((".", "/", "~")):
        if HF_ID.match(spec):
            return None
        if spec.startswith("tiny") or close:
            return f"'{shown}' is not an embedded model; {hint}{embedded}"
        return (
            f"'{shown}' is neither an embedded model ({', '.join(names)}), a local diffusers folder, "
            "nor a Hugging Face id like 'owner/name'"
        )
    if kind == "missing":
        return f"folder '{shown}' not found (looked for {_shorten(str(local))})"
    if kind != "folder":
        return f"'{shown}' is not a folder; a model is a diffusers folder with a model_index.json"
    if path_kind(local / "model_index.json") != "file":
        return (
            f"folder '{shown}' is not a diffusers model folder (no model_index.json in {_shorten(str(local))}); "
            "point at a folder saved by diffusers' save_pretrained"
        )
    return None


def _shorten(text: str, limit: int = 60) -> str:
    """``text`` fit for a message: control characters and lone surrogates escaped, a long one cut."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text)} characters)"


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
        from pipeline.render.singlefile import resolve_checkpoint

        ref = resolve_checkpoint(spec, local, config, options_dir, memo, keep_vae=vae is None)
    else:
        ref = _resolve_folder(spec, base_dir, revision, memo)
    if vae is not None:
        from pipeline.render.singlefile import resolve_vae

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


def _read_index(spec: str, folder: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """model_index.json, read once: the classes it names and the hash in the fingerprint come from the
    same bytes, and its stamp is taken before them (see ModelRef.stamps)."""
    index_path = folder / "model_index.json"
    stamps = {index_path.name: file_stamp(index_path)}
    raw = index_path.read_bytes()
    try:
        index = json.loads(raw)
    except ValueError as exc:
        raise ModelError(
            f"model '{spec}': {index_path} is not valid JSON ({exc}); re-download the model"
        ) from None
    return index, stamps


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".pth")
_COMMIT = re.compile(r"[0-9a-f]{40}")


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


def _component_files(folder: Path, index: dict[str, Any]) -> dict[str, list[Path]]:
    """The files of each component named in model_index.json (what loading the model reads)."""
    out = {}
    for name, value in sorted(index.items()):
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        comp = folder / name
        out[name] = sorted(p for p in comp.rglob("*") if p.is_file() and not p.name.startswith("."))
    return out


def _folder_fingerprint(
    folder: Path, index: dict[str, Any], memo: MutableMapping[str, Any] | None, stamps: dict[str, str]
) -> dict[str, str]:
    """Per component, the sha256 over its files' names and content hashes; fills ``stamps``."""
    out: dict[str, str] = {}
    for name, files in _component_files(folder, index).items():
        h = hashlib.sha256()
        for f in files:
            digest, stamps[f.relative_to(folder).as_posix()] = _digest_and_stamp(f, memo)
            h.update(f.relative_to(folder / name).as_posix().encode() + b"\0" + digest.encode() + b"\n")
        out[name] = h.hexdigest()
    return out


def check_unchanged(ref: ModelRef) -> None:
    """Raise :class:`InputChanged` if a file of a local model changed since ``ref`` was resolved.

    Called once the weights are in memory (later changes cannot reach them): the frames are keyed by
    the fingerprint taken when planning, so the loaded files must be the ones hashed then.
    """
    if ref.folder is None or not ref.stamps:
        return  # a hub model is loaded by its commit, whose files the hub never changes
    folder = ref.folder
    now: dict[str, str] = {}
    for key in ref.stamps:  # an absolute key (a checkpoint, a VAE file) stays itself under folder /
        with contextlib.suppress(OSError):  # gone since: reported below as changed
            now[key] = file_stamp(folder / key)
    if ref.kind in ("embedded", "local"):  # a file added to a component folder counts too
        for files in _component_files(folder, ref.index).values():
            for f in files:
                with contextlib.suppress(OSError):
                    now[f.relative_to(folder).as_posix()] = file_stamp(f)
    changed = sorted(k for k in ref.stamps.keys() | now.keys() if ref.stamps.get(k) != now.get(k))
    if changed:
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise InputChanged(
            f"model '{ref.spec}': {folder / changed[0]}{more} changed during the run, after its frames were "
            "planned; nothing was rendered from it. Run again: the frames are planned from the files as they are then"
        )


def file_stamp(path: Path) -> str:
    """What changes whenever a file is written or replaced: resolved path, size, mtime, ctime, inode."""
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"


def memo_digest(path: Path, memo: MutableMapping[str, Any] | None) -> str:
    """A file's content hash, remembered by (path, size, mtime, ctime, inode).

    Checkpoint weights are gigabytes: re-hashing them on every run would make a no-op re-run slow.
    ctime cannot be set back by a user (unlike mtime), so an in-place edit is still noticed.
    """
    return _digest_and_stamp(path, memo)[0]


def _digest_and_stamp(path: Path, memo: MutableMapping[str, Any] | None) -> tuple[str, str]:
    # The stamp is taken before hashing: a write during the hash leaves a stamp that no longer matches.
    stamp = file_stamp(path)
    if memo is not None and stamp in memo:
        return str(memo[stamp]), stamp
    digest = file_digest(str(path))
    if memo is not None:
        memo[stamp] = digest
    return digest, stamp


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
            from pipeline.render.singlefile import load_checkpoint, load_vae

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
