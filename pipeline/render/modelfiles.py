"""A model's files: naming them, describing them and telling when they change. Torch-free.

:func:`check_model_spec` says why a ``model:`` names no model (before anything is read);
:class:`ModelRef` is a resolved model (``pipeline.render.models`` resolves and loads it,
``pipeline.render.singlefile`` for single-file checkpoints and VAE overrides); a fingerprint is per
component, a sha256 over its files' content hashes, each remembered by the file's stamp, and
:func:`check_unchanged` compares the stamps once the weights are loaded::

    check_model_spec("tiny", scene_dir)           # None, or why not
    memo_digest(path, memo)                       # a file's content hash, remembered by its stamp
    check_unchanged(ref)                          # raises InputChanged if a file changed since
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import re
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.modes import family_of
from pipeline.plan.keys import file_digest
from pipeline.render.checkpoints import (
    CHECKPOINT_SUFFIXES,
    inspect_checkpoint,
    is_checkpoint_spec,
)
from pipeline.scene.inputfiles import path_kind

EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "embedded"
# Embedded models with trained weights: they draw what their prompts ask (within their 64 emoji).
TRAINED_EMBEDDED = frozenset({"demo"})


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
