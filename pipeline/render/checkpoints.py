"""Single-file checkpoints (``model.safetensors`` / ``model.ckpt``): what is in one, found out without
torch, and where the configs of its components come from::

    layout = inspect_checkpoint(Path("dreamshaper.safetensors"))   # Layout, or what is wrong with it
    layout.family, layout.components                               # 'sd', {'unet', 'vae', 'text_encoder'}
    layout.default_config                                          # 'stable-diffusion-v1-5/stable-diffusion-v1-5'

A checkpoint in the original (LDM / ComfyUI / AUTOMATIC1111) layout holds the weights of every
component under a prefix (``model.diffusion_model.`` for the UNet, ``first_stage_model.`` for the VAE,
...), but not their configs, tokenizers or scheduler: diffusers takes those from a diffusers folder of
the same family (``from_single_file(..., config=FOLDER)``). That folder is the scene's ``config:``, or
the Hugging Face cache entry of the family's standard model (the one diffusers itself would use).

A ``.ckpt`` is a pickle, which can run any code when loaded. It is only ever loaded with
``torch.load(weights_only=True)`` (diffusers does so), and before that its pickle is read here, opcode
by opcode and without executing it, so that a file naming anything but tensors and plain containers is
refused as bad input before any model loads.
"""

from __future__ import annotations

import os
import pickletools
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.scene.inputfiles import read_weights_header

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")

# Where each component's weights live in the original layout, per family (first match wins).
_PREFIXES: dict[str, dict[str, tuple[str, ...]]] = {
    "sd": {
        "unet": ("model.diffusion_model.",),
        "vae": ("first_stage_model.",),
        "text_encoder": ("cond_stage_model.",),
    },
    "sdxl": {
        "unet": ("model.diffusion_model.",),
        "vae": ("first_stage_model.",),
        "text_encoder": ("conditioner.embedders.0.transformer.",),
        "text_encoder_2": ("conditioner.embedders.1.model.",),
    },
    "sd3": {
        "transformer": ("model.diffusion_model.",),
        "vae": ("first_stage_model.",),
        "text_encoder": ("text_encoders.clip_l.",),
        "text_encoder_2": ("text_encoders.clip_g.",),
        "text_encoder_3": ("text_encoders.t5xxl.",),
    },
}
# The configs diffusers itself uses for a checkpoint of each kind (DIFFUSERS_DEFAULT_PIPELINE_PATHS).
DEFAULT_CONFIGS = {
    "v1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "v1-inpainting": "stable-diffusion-v1-5/stable-diffusion-inpainting",
    "v2": "stabilityai/stable-diffusion-2-1",
    "v2-inpainting": "stabilityai/stable-diffusion-2-inpainting",
    "xl_base": "stabilityai/stable-diffusion-xl-base-1.0",
    "xl_inpaint": "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
    "sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
    "sd35_medium": "stabilityai/stable-diffusion-3.5-medium",
    "sd35_large": "stabilityai/stable-diffusion-3.5-large",
}
_CKPT_LIMIT = 256 * 2**20  # a state dict's pickle is a few MB; anything far larger is not one
_PICKLES_LIMIT = 64 * 2**20  # the legacy format's pickles, read from the start of the file


@dataclass(frozen=True)
class Layout:
    """What a single-file checkpoint holds: its family, its kind and the components it has weights for."""

    family: str  # 'sd' | 'sdxl' | 'sd3'
    kind: str  # a key of DEFAULT_CONFIGS
    components: frozenset[str]
    in_channels: int | None = None  # the UNet's input channels when known (9: an inpainting checkpoint)

    @property
    def default_config(self) -> str:
        return DEFAULT_CONFIGS[self.kind]


def is_checkpoint_spec(spec: str) -> bool:
    """Does ``model:`` name a single file (by its suffix) rather than a folder, an id or a name?"""
    return spec.lower().endswith(CHECKPOINT_SUFFIXES)


def inspect_checkpoint(path: Path) -> Layout | str:
    """The layout of a single-file checkpoint, or why it is none (never imports torch, never unpickles)."""
    names = checkpoint_tensors(path)
    if isinstance(names, str):
        return names
    return layout_of(names)


def layout_of(shapes: dict[str, list[int]]) -> Layout | str:
    """The layout from tensor names (and shapes where known: a .ckpt's are not), or why it is unknown."""
    has = lambda prefix: any(k.startswith(prefix) for k in shapes)  # noqa: E731
    unet = "model.diffusion_model."
    if not has(unet):
        sample = ", ".join(list(shapes)[:3]) or "no tensors"
        if any("lora" in k.lower() for k in shapes):
            what = "it holds LoRA weights: list it under 'loras:'"
        elif has("encoder.") or has("decoder."):
            what = "it holds a VAE alone: give it as 'vae:'"
        elif has("down_blocks.") or has("unet."):
            what = "it looks like diffusers' own layout: point 'model:' at the diffusers folder instead"
        else:
            what = f"it has {sample}"
        return (
            "unknown checkpoint layout: no 'model.diffusion_model.' weights (the UNet or transformer of a "
            f"SD 1.x, 2.x, SDXL or SD3 checkpoint); {what}"
        )
    if has(unet + "joint_blocks."):
        family = "sd3"
        pos_embed = shapes.get(unet + "pos_embed") or []
        if has(unet + "joint_blocks.37."):
            kind = "sd35_large"
        elif len(pos_embed) > 1 and pos_embed[1] == 147456:  # 384x384 positions (diffusers' test too)
            kind = "sd35_medium"
        else:
            kind = "sd3"
    elif has("conditioner.embedders."):
        family, kind = "sdxl", "xl_base"
    elif has(unet + "input_blocks."):
        family = "sd"
        kind = "v2" if has("cond_stage_model.model.") else "v1"
    else:
        return (
            "unknown checkpoint layout: its 'model.diffusion_model.' weights are neither a SD 1.x/2.x/SDXL "
            "UNet (input_blocks) nor a SD3 transformer (joint_blocks)"
        )
    conv_in = shapes.get(unet + "input_blocks.0.0.weight") or []
    in_channels = conv_in[1] if len(conv_in) == 4 else None
    if in_channels == 9:
        kind = {"v1": "v1-inpainting", "v2": "v2-inpainting", "xl_base": "xl_inpaint"}.get(kind, kind)
    components = frozenset(
        name for name, prefixes in _PREFIXES[family].items() if any(has(p) for p in prefixes)
    )
    return Layout(family, kind, components, in_channels)


def component_prefixes(family: str) -> dict[str, tuple[str, ...]]:
    """Component name -> the prefixes of its weights in the original layout."""
    return _PREFIXES.get(family, {})


def checkpoint_tensors(path: Path) -> dict[str, list[int]] | str:
    """{tensor name: shape} from a safetensors header, {name: []} from a .ckpt's pickle, or a problem."""
    if path.suffix.lower() == ".safetensors":
        found = read_weights_header(path)
        return found
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            head = f.read(4)
            f.seek(0)
            if head.startswith(b"PK\x03\x04"):
                try:
                    with zipfile.ZipFile(f) as zf:
                        pkl = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
                        if len(pkl) != 1:
                            return "not a PyTorch checkpoint (a zip archive without one data.pkl)"
                        info = zf.getinfo(pkl[0])
                        if info.file_size > _CKPT_LIMIT:
                            return "not a PyTorch checkpoint (its data.pkl is too large for a state dict)"
                        data = zf.read(pkl[0])
                except zipfile.BadZipFile as exc:
                    return f"not a PyTorch checkpoint (a damaged zip archive: {exc})"
                return pickle_names(data)
            if head[:1] == b"\x80":  # the legacy torch.save format: its pickles first, then raw storages
                return pickle_names(f.read(_PICKLES_LIMIT), legacy=True)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    return "not a checkpoint: a .ckpt is a PyTorch file (a zip archive or a pickle) and this is neither"


# What torch.load(weights_only=True) itself allows (torch._weights_only_unpickler._get_allowed_globals):
# tensors, storages, dtypes and plain containers; nothing else is needed to hold a state dict.
_SAFE_MODULE_NAMES = {
    ("collections", "OrderedDict"),
    ("collections", "Counter"),
    ("torch", "Size"),
    ("torch", "Tensor"),
    ("torch", "device"),
    ("torch.nn.parameter", "Parameter"),
    ("torch.storage", "UntypedStorage"),
    ("torch.storage", "TypedStorage"),
    ("torch.serialization", "_get_layout"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("_codecs", "encode"),
}
_SAFE_BUILTINS = {"set", "bytearray", "complex"}


def _safe_global(module: str, name: str) -> bool:
    if (module, name) in _SAFE_MODULE_NAMES:
        return True
    if module == "torch._utils" and name.startswith("_rebuild_"):
        return True
    if module == "torch" and (name.endswith("Storage") or name in _TORCH_DTYPES):
        return True
    return module == "builtins" and name in _SAFE_BUILTINS


_TORCH_DTYPES = {
    "float16", "float32", "float64", "bfloat16", "half", "float", "double", "int8", "int16", "int32",
    "int64", "uint8", "bool", "float8_e4m3fn", "float8_e5m2", "complex64", "complex128",
}  # fmt: skip
_STRING_OPS = {"UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING", "SHORT_BINSTRING"}  # fmt: skip


def pickle_names(data: bytes, *, legacy: bool = False) -> dict[str, list[int]] | str:
    """The strings a state-dict pickle holds (its tensor names), read without executing it.

    Refuses a pickle that names anything torch's ``weights_only`` loading would not allow (``os.system``,
    ``builtins.eval``, any class of another library): loading it could run code. ``legacy``: the old
    ``torch.save`` format, a few pickles in a row; the first four (magic number, protocol, system info,
    the state dict) are read.
    """
    names: dict[str, list[int]] = {}
    pos = 0
    for _ in range(4 if legacy else 1):
        memo: dict[int, object] = {}
        recent: list[object] = []
        try:
            for op, arg, at in pickletools.genops(data[pos:]):
                kind = op.name
                if kind in _STRING_OPS:
                    value = arg.decode("latin-1") if isinstance(arg, bytes) else str(arg)
                    recent.append(value)
                    names.setdefault(value, [])
                elif kind in ("BINPUT", "LONG_BINPUT", "PUT"):
                    memo[int(arg)] = recent[-1] if recent else None
                elif kind == "MEMOIZE":
                    memo[len(memo)] = recent[-1] if recent else None
                elif kind in ("BINGET", "LONG_BINGET", "GET"):
                    recent.append(memo.get(int(arg)))
                elif kind in ("GLOBAL", "INST"):
                    module, _, name = str(arg).partition(" ")
                    if not _safe_global(module, name):
                        return _unsafe(module, name)
                    recent.append(None)
                elif kind == "STACK_GLOBAL":
                    module, name = (recent[-2], recent[-1]) if len(recent) >= 2 else (None, None)
                    if not (isinstance(module, str) and isinstance(name, str)):
                        return "refused: its pickle builds an object whose class cannot be read without running it"
                    if not _safe_global(module, name):
                        return _unsafe(module, name)
                    recent.append(None)
                elif kind in ("EXT1", "EXT2", "EXT4"):
                    return "refused: its pickle uses the copyreg extension registry, which a state dict never does"
                else:
                    recent.append(None)
                if kind == "STOP":
                    pos += at + 1
        except (ValueError, IndexError, KeyError) as exc:  # genops on bytes that are not a pickle
            return f"not a PyTorch checkpoint (its pickle is damaged: {str(exc)[:80]})"
    names.pop("state_dict", None)
    return names


def _unsafe(module: str, name: str) -> str:
    what = f"{module}.{name}"[:80]
    return (
        f"refused: loading it would call '{what}', not just build tensors (a pickle can run any code); "
        "nothing was loaded. Use the model's .safetensors file instead"
    )
