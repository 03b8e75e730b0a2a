"""Single-file checkpoints and VAE overrides: where a checkpoint's configs come from, what goes into
their fingerprints, and loading them (``pipeline.render.models`` calls in here; ``pipeline.render.checkpoints``
reads the files)::

    config_folder("tiny", layout, scene_dir, download=False)   # the folder, or why there is none
    ref = resolve_model("dreamshaper.safetensors", scene_dir, config="my-sd15-folder", vae="vae-ft-mse")

A single file holds weights only: its component configs, tokenizers and scheduler come from a
diffusers folder of the same family, named by ``config:``, or else the family's standard model in the
Hugging Face cache (what diffusers itself would use; downloaded when online). Everything but the
loaders is torch-free, and nothing here touches the network when ``download=False``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from pipeline.modes import family_of
from pipeline.plan.keys import file_digest, json_digest
from pipeline.render.checkpoints import Layout, checkpoint_tensors, inspect_checkpoint, is_checkpoint_spec
from pipeline.render.modelfiles import (
    _COMMIT,
    EMBEDDED_DIR,
    HF_ID,
    WEIGHT_SUFFIXES,
    ModelError,
    ModelRef,
    VaeRef,
    _component_files,
    _digest_and_stamp,
    _read_index,
    _shorten,
    check_model_spec,
    embedded_models,
)
from pipeline.scene.inputfiles import path_kind, read_weights_header

FAMILY_NAMES = {"sd": "SD 1.x/2.x", "sdxl": "SDXL", "sd3": "SD3"}
# The small files of a diffusers model: what a single-file checkpoint lacks.
CONFIG_PATTERNS = ["model_index.json", "*.txt", "*/*.json", "*/*.txt", "*/*.model"]


def _hub_offline() -> bool:
    from huggingface_hub import constants  # torch-free

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return constants.HF_HUB_OFFLINE or flag in ("1", "true", "yes", "on")


def _hub_snapshot(repo_id: str, patterns: list[str], *, download: bool) -> Path | None:
    """The local snapshot of ``repo_id``'s small files: from the Hugging Face cache, or downloaded
    when ``download`` and not offline; None if neither."""
    from huggingface_hub import snapshot_download  # torch-free

    try:
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=patterns,
                local_files_only=_hub_offline() or not download,
                cache_dir=os.environ.get("HF_HUB_CACHE") or None,
            )
        )
    except Exception:  # not cached, no network, no such repository: the caller says what to do
        return None


def config_folder(config: str | None, layout: Layout, base_dir: Path, *, download: bool) -> Path | str:
    """The diffusers folder a checkpoint's component configs come from, or why there is none.

    ``config:`` names it (an embedded model, a local diffusers folder, or a Hugging Face id whose
    small files are in the Hugging Face cache or, online, downloaded); without it, the configs of the
    family's standard model that diffusers itself would use, if they are in the Hugging Face cache.
    ``download=False`` never touches the network (scene validation).
    """
    if config is None:
        repo = layout.default_config
        found = _hub_snapshot(repo, CONFIG_PATTERNS, download=download)
        if found is not None and (found / "model_index.json").is_file():
            return found
        if not download and not _hub_offline():
            return "later"  # online: downloaded when the model is resolved
        tried = "" if _hub_offline() else " and could not be downloaded"
        return (
            f"a single file holds weights only, and the configs of this {FAMILY_NAMES[layout.family]} checkpoint "
            f"('{repo}', as diffusers uses) are not in the Hugging Face cache{tried}; set 'config:' to a "
            "diffusers folder of the same model family (or run once with network access to cache them)"
        )
    if config in embedded_models():
        return EMBEDDED_DIR / config
    shown = _shorten(config)
    found_local = _local(config, base_dir)
    if isinstance(found_local, str):
        return found_local
    local, kind = found_local
    if kind == "folder":
        if path_kind(local / "model_index.json") != "file":
            return f"folder '{shown}' is not a diffusers model folder (no model_index.json in {_shorten(str(local))})"
        return local
    if kind == "missing" and HF_ID.match(config) and not config.startswith((".", "/", "~")):
        found = _hub_snapshot(config, CONFIG_PATTERNS, download=download)
        if found is not None and (found / "model_index.json").is_file():
            return found
        if not download and not _hub_offline():
            return "later"
        return f"'{shown}' is not in the Hugging Face cache (and HF_HUB_OFFLINE is set); download it once"
    if kind == "missing":
        return f"folder '{shown}' not found (looked for {_shorten(str(local))})"
    return f"'{shown}' is not a folder; 'config:' is a diffusers model folder, an embedded model or a Hugging Face id"


def _local(spec: str, base_dir: Path) -> tuple[Path, str] | str:
    """``spec`` as a path from ``base_dir`` and what is there (``path_kind``), or why it is no usable path."""
    try:
        local = (base_dir / Path(spec).expanduser()).resolve()
        return local, path_kind(local)
    except (OSError, RuntimeError, ValueError) as exc:
        return f"'{_shorten(spec)}' is not a usable path ({getattr(exc, 'strerror', None) or exc})"


def config_problem(layout: Layout, folder: Path) -> str | None:
    """Why the configs in ``folder`` cannot load this checkpoint (another family, other UNet inputs)."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        cls = str(index.get("_class_name", "StableDiffusionPipeline"))
    except (OSError, ValueError, AttributeError) as exc:
        return f"its model_index.json cannot be read ({exc})"
    family = family_of(cls)
    if family != layout.family:
        return f"it is a {FAMILY_NAMES[family]} model ({cls}) and the checkpoint is {FAMILY_NAMES[layout.family]}"
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        unet = {}
    wanted = unet.get("in_channels") if isinstance(unet, dict) else None
    if layout.in_channels is not None and isinstance(wanted, int) and wanted != layout.in_channels:
        what = "an inpainting checkpoint" if layout.in_channels == 9 else "a checkpoint"
        return (
            f"the checkpoint's UNet takes {layout.in_channels} input channels ({what}), the config's {wanted}; "
            "use the config of a model of the same kind"
        )
    return None


def check_checkpoint_options(
    spec: str, config: str | None, model_dir: Path, options_dir: Path
) -> list[tuple[str, str]]:
    """The problems of a scene's ``config:`` with its ``model:``, as (field, message); torch-free, no network."""
    local = (model_dir / Path(spec).expanduser()) if spec not in embedded_models() else None
    try:
        is_file = local is not None and is_checkpoint_spec(spec) and path_kind(local.resolve()) == "file"
    except (OSError, RuntimeError, ValueError):
        is_file = False
    if not is_file:
        if config is not None and check_model_spec(spec, model_dir) is None:
            return [
                (
                    "config",
                    f"config: is for a single-file checkpoint; model '{_shorten(spec)}' has its own configs",
                )
            ]
        return []
    assert local is not None
    layout = inspect_checkpoint(local.resolve())
    if isinstance(layout, str):
        return []  # reported at model: by check_model_spec
    where = "config" if config is not None else "model"
    folder = config_folder(config, layout, options_dir, download=False)
    if isinstance(folder, str):
        return [] if folder == "later" else [(where, f"{where}: {folder}")]
    problem = config_problem(layout, folder)
    if problem:
        named = f"'{_shorten(config)}'" if config is not None else f"'{folder}'"
        return [(where, f"{where}: the configs {named} do not fit '{_shorten(spec)}': {problem}")]
    return []


def resolve_checkpoint(
    spec: str,
    file: Path,
    config: str | None,
    config_dir: Path,
    memo: MutableMapping[str, Any] | None,
    *,
    keep_vae: bool,
) -> ModelRef:
    """A single-file checkpoint with the diffusers folder its configs come from."""
    layout = inspect_checkpoint(file)
    if isinstance(layout, str):
        raise ModelError(f"model '{_shorten(spec)}': {layout}")
    folder = config_folder(config, layout, config_dir, download=True)
    if isinstance(folder, str):
        raise ModelError(f"model '{_shorten(spec)}': {folder}")
    problem = config_problem(layout, folder)
    if problem:
        raise ModelError(f"model '{_shorten(spec)}': the configs in {folder} do not fit it: {problem}")
    index, stamps = _read_index(spec, folder)
    index = _without_unloaded(index, folder, layout)
    digest, stamps[str(file)] = _digest_and_stamp(file, memo)
    fingerprint = {"model_index": json_digest(index)}
    for name, files in _component_files(folder, index).items():
        h = hashlib.sha256()
        if name in layout.components:
            # Weights from the checkpoint, converted with this folder's config of the component.
            h.update(f"checkpoint\0{digest}\n".encode())
            files = [f for f in files if f.suffix == ".json"]
        elif name == "vae" and not keep_vae:
            files = [f for f in files if f.suffix == ".json"]  # replaced by the scene's vae:
        elif (folder / name / "config.json").is_file() and not any(
            f.suffix in WEIGHT_SUFFIXES for f in files
        ):
            raise ModelError(
                f"model '{_shorten(spec)}' holds no {name} weights and the config folder {folder} has none"
                + ("; give a VAE with 'vae:'" if name == "vae" else "")
            )
        for f in files:
            d, stamps[str(f)] = _digest_and_stamp(f, memo)
            h.update(f.relative_to(folder / name).as_posix().encode() + b"\0" + d.encode() + b"\n")
        fingerprint[name] = h.hexdigest()
    return ModelRef(
        spec, "file", folder, index, fingerprint, None, stamps, checkpoint=file, from_file=layout.components
    )


def _without_unloaded(index: dict[str, Any], folder: Path, layout: Layout) -> dict[str, Any]:
    """The config folder's model_index.json without the components a single file is loaded without:
    the safety checker (never loaded: an animation's frames are judged by the artist) and SD3's T5 when
    neither the file nor the folder has its weights (SD3 renders without it, and ``t5: true`` is then
    refused as for any SD3 model without T5). A configs-only folder, such as the Hugging Face cache
    entry of the family's standard model, lists them all."""
    out = dict(index)
    if "safety_checker" in out:
        out["safety_checker"] = [None, None]
    t5 = folder / "text_encoder_3"
    if "text_encoder_3" in out and "text_encoder_3" not in layout.components:
        has_weights = t5.is_dir() and any(f.suffix in WEIGHT_SUFFIXES for f in t5.rglob("*"))
        if not has_weights:
            out["text_encoder_3"] = [None, None]
            out["tokenizer_3"] = [None, None]
    return out


VAE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin", ".pth")


def check_vae_spec(spec: str, base_dir: Path) -> str | None:
    """Why ``vae:`` names no VAE, or None: a diffusers VAE folder, a weights file, or a Hugging Face id."""
    shown = _shorten(spec)
    found_local = _local(spec, base_dir)
    if isinstance(found_local, str):
        return found_local
    local, kind = found_local
    if kind.startswith("unusable: "):
        return f"'{shown}' is not a usable path ({kind.removeprefix('unusable: ')})"
    if kind == "folder":
        if _vae_subfolder(local) is None:
            return (
                f"folder '{shown}' is not a diffusers VAE folder (no config.json in it or in its vae/ folder)"
            )
        return None
    if kind == "file":
        return _vae_file_problem(local, shown)
    if kind == "missing" and HF_ID.match(spec) and not spec.startswith((".", "/", "~")):
        if spec.lower().endswith(VAE_FILE_SUFFIXES):
            return f"file '{shown}' not found (looked for {_shorten(str(local))})"
        return None
    if kind == "missing":
        return f"'{shown}' not found (looked for {_shorten(str(local))})"
    return f"'{shown}' is {kind}; a VAE is a diffusers VAE folder, a weights file or a Hugging Face id"


def _vae_subfolder(folder: Path) -> str | None:
    """'' if ``folder`` is a VAE folder, 'vae' if it is a model folder with one, None otherwise."""
    if (folder / "config.json").is_file():
        return ""
    if (folder / "vae" / "config.json").is_file():
        return "vae"
    return None


def _vae_file_problem(path: Path, shown: str) -> str | None:
    if not path.name.lower().endswith(VAE_FILE_SUFFIXES):
        return f"'{shown}' is not a weights file (a VAE file ends in {', '.join(VAE_FILE_SUFFIXES)})"
    if path.suffix.lower() == ".safetensors":
        tensors = read_weights_header(path)
        if isinstance(tensors, str):
            return f"'{shown}': {tensors}"
        names = [k.removeprefix("first_stage_model.").removeprefix("vae.") for k in tensors]
        if not (
            any(k.startswith("encoder.") for k in names) and any(k.startswith("decoder.") for k in names)
        ):
            return f"'{shown}' holds no VAE (no encoder and decoder weights)"
        return None
    if path.suffix.lower() == ".ckpt":
        found = checkpoint_tensors(path)
        return f"'{shown}': {found}" if isinstance(found, str) else None
    return None


def resolve_vae(spec: str, base_dir: Path, model: ModelRef, memo: MutableMapping[str, Any] | None) -> VaeRef:
    """The VAE that ``vae:`` names, fingerprinted; its file stamps go into ``model.stamps``."""
    problem = check_vae_spec(spec, base_dir)
    if problem:
        raise ModelError(f"vae {problem}")
    local = (base_dir / Path(spec).expanduser()).resolve()
    kind = path_kind(local)
    if kind == "file":
        digest, model.stamps[str(local)] = _digest_and_stamp(local, memo)
        # Converted with the model's own VAE config: that config is part of what it renders with.
        own = model.folder / "vae" / "config.json" if model.folder is not None else None
        conf = file_digest(str(own)) if own is not None and own.is_file() else ""
        return VaeRef(spec, "file", local, None, f"file:{digest}:{conf}")
    if kind == "folder":
        sub = _vae_subfolder(local) or ""
        h = hashlib.sha256()
        for f in sorted(p for p in (local / sub).rglob("*") if p.is_file() and not p.name.startswith(".")):
            d, model.stamps[str(f)] = _digest_and_stamp(f, memo)
            h.update(f.relative_to(local / sub).as_posix().encode() + b"\0" + d.encode() + b"\n")
        return VaeRef(spec, "local", local, sub or None, h.hexdigest())
    found = _hub_snapshot(spec, ["config.json", "vae/config.json"], download=True)
    if found is None:
        hint = (
            "HF_HUB_OFFLINE is set and it is not in the Hugging Face cache"
            if _hub_offline()
            else "check the id and your network"
        )
        raise ModelError(f"cannot find vae '{_shorten(spec)}': {hint}; or give a local VAE folder or file")
    sub = _vae_subfolder(found)
    if sub is None:
        raise ModelError(
            f"vae '{_shorten(spec)}' has no config.json (nor vae/config.json): not a diffusers VAE"
        )
    commit = found.name
    return VaeRef(
        spec, "hub", found, sub or None, f"hub:{spec}@{commit}", commit if _COMMIT.fullmatch(commit) else None
    )


def load_checkpoint(ref: ModelRef, cls: Any, kwargs: dict[str, Any]) -> Any:
    """A single-file checkpoint through diffusers' ``from_single_file``, offline, with the configs of
    ``ref.folder``; components whose weights are not in the file come from that folder.

    diffusers loads a ``.ckpt`` with ``torch.load(weights_only=True)``: tensors and plain containers
    only, never code (and ``pipeline.render.checkpoints`` refused any other pickle before this).
    """
    assert ref.folder is not None and ref.checkpoint is not None
    for name, value in ref.index.items():
        if name.startswith("_") or name in kwargs or name in ref.from_file:
            continue
        if isinstance(value, list) and value[0] and (ref.folder / name / "config.json").is_file():
            library = importlib.import_module(value[0])
            kwargs[name] = getattr(library, value[1]).from_pretrained(
                ref.folder, subfolder=name, torch_dtype=kwargs["torch_dtype"]
            )
    if ref.family in SECOND_CLIP and "text_encoder_2" in ref.from_file and "text_encoder_2" not in kwargs:
        second = _second_clip(ref, kwargs["torch_dtype"])
        if second is not None:
            kwargs["text_encoder_2"] = second
    return cls.from_single_file(str(ref.checkpoint), config=str(ref.folder), local_files_only=True, **kwargs)


# The second text encoder's weights in the original layout: SDXL's in OpenCLIP's layout, SD3's CLIP-G in
# transformers' own.
SECOND_CLIP = {"sdxl": "conditioner.embedders.1.model.", "sd3": "text_encoders.clip_g.transformer."}


def _second_clip(ref: ModelRef, torch_dtype: Any) -> Any:
    """SDXL's second text encoder, or SD3's CLIP-G, built here when diffusers would mistake it for the
    first: diffusers tells them apart by width only (it tries the first encoder's key first), so with two
    encoders of one width (a small custom model, the embedded tiny-sdxl and tiny-sd3) it loads the first
    encoder's weights into the second (for SD3 with CLIP-L's identity projection too). None otherwise."""
    assert ref.folder is not None and ref.checkpoint is not None
    try:
        widths = [
            json.loads((ref.folder / name / "config.json").read_text(encoding="utf-8")).get("hidden_size")
            for name in ("text_encoder", "text_encoder_2")
        ]
    except (OSError, ValueError, AttributeError):
        return None
    if widths[0] != widths[1]:
        return None  # real SDXL (768 and 1280) and SD3 (768 and 1280): diffusers finds each by itself
    import torch
    import transformers
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    prefix = SECOND_CLIP[ref.family]
    if ref.checkpoint.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(ref.checkpoint), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118
    else:
        state = torch.load(str(ref.checkpoint), map_location="cpu", weights_only=True, mmap=True)
        while "state_dict" in state:
            state = state["state_dict"]
    config = transformers.CLIPTextConfig.from_pretrained(ref.folder, subfolder="text_encoder_2")
    model = transformers.CLIPTextModelWithProjection(config)
    if ref.family == "sd3":
        converted = convert_ldm_clip_checkpoint(state, prefix)
    else:
        converted = convert_open_clip_checkpoint(model, state, prefix=prefix)
    model.load_state_dict(converted, strict=False)
    return model.to(torch_dtype).eval()


def load_vae(ref: ModelRef, torch_dtype: Any) -> Any:
    """The VAE of ``vae:``: a diffusers folder, a hub commit, or a single file converted with the
    model's own VAE config."""
    import diffusers

    vae = ref.vae
    assert vae is not None
    value = ref.index.get("vae")
    cls = getattr(diffusers, value[1]) if isinstance(value, list) and value[0] else diffusers.AutoencoderKL
    if vae.kind == "file":
        if ref.folder is None or not (ref.folder / "vae" / "config.json").is_file():
            raise ModelError(f"vae '{vae.spec}': the model has no VAE config to convert the file with")
        return cls.from_single_file(
            str(vae.path),
            config=str(ref.folder),
            subfolder="vae",
            torch_dtype=torch_dtype,
            local_files_only=True,
        )
    extra: dict[str, Any] = {"subfolder": vae.subfolder} if vae.subfolder else {}
    if vae.kind == "hub":
        # The cache the snapshot was found in (HF_HUB_CACHE as it is now, like _hub_snapshot).
        extra["cache_dir"] = os.environ.get("HF_HUB_CACHE") or None
        extra["local_files_only"] = _hub_offline()
        return cls.from_pretrained(vae.spec, revision=vae.revision, torch_dtype=torch_dtype, **extra)
    return cls.from_pretrained(vae.path, torch_dtype=torch_dtype, **extra)
