"""What is at a path that a scene names, found out without loading it: a scene file's bytes within
limits, a path's kind (a file, a folder, a named pipe...), an image's size from its header, and
whether a LoRA or learned-embedding file has a loadable header::

    read_scene_bytes(Path("s.yaml"), "s.yaml")     # bytes, or SceneError: not a regular file / too big
    path_kind(Path("/dev/zero"))                    # 'a character device'
    image_size(Path("inputs/init.png"))             # (512, 512), or what is wrong with it
    weights_file_problem(Path("style.safetensors")) # None, or what is wrong with it

Nothing here imports torch; images are opened with Pillow, which reads headers only.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from pipeline.scene.problems import Problem, SceneError, shorten

# A scene keyed at each of 100,000 frames, in block style with a long prompt, a negative prompt and
# eight values per keyframe, is 33 MiB; twice that is allowed. Anything larger is not a scene.
MAX_SCENE_BYTES = 64 * 2**20

_NOT_REGULAR = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def not_regular(mode: int) -> str | None:
    """What a file that is not a regular file is (a folder, a pipe, a device...), or None."""
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _NOT_REGULAR if test(mode)), "not a regular file")


def read_scene_bytes(path: Path, shown: str) -> bytes:
    """The bytes of a scene file, read only if it is a regular file of at most MAX_SCENE_BYTES.

    ``/dev/zero`` would be read until memory runs out and a named pipe would block for ever, so the
    file's kind is checked before it is opened, and again on the open descriptor (it may have been
    swapped in between); O_NONBLOCK keeps even that open from waiting on a pipe.
    """

    def fail(message: str) -> SceneError:
        return SceneError([Problem(shown, 1, 1, message)])

    limit = f"a scene file is a YAML text file of at most {MAX_SCENE_BYTES // 2**20} MiB"
    try:
        kind = not_regular(os.stat(path).st_mode)
        if kind is not None:
            raise fail(f"the scene file {path} is {kind}, not a regular file; {limit}")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise fail(f"scene file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise fail(f"cannot read the scene file: {getattr(exc, 'strerror', None) or exc}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        kind = not_regular(info.st_mode)
        if kind is not None:
            raise fail(f"the scene file {path} is {kind}, not a regular file; {limit}")
        if info.st_size > MAX_SCENE_BYTES:
            raise fail(f"the scene file is {info.st_size:,} bytes; {limit}")
        try:
            raw = f.read(MAX_SCENE_BYTES + 1)
        except OSError as exc:
            raise fail(f"cannot read the scene file: {exc.strerror}") from None
    if len(raw) > MAX_SCENE_BYTES:  # it grew while being read
        raise fail(f"the scene file is over {MAX_SCENE_BYTES // 2**20} MiB; {limit}")
    return raw


# The byte size of each safetensors dtype (as the safetensors crate names them). A dtype not listed
# (a newer one) is not size-checked, so a file that safetensors accepts is never refused here.
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
MAX_SAFETENSORS_HEADER = 100 * 2**20  # the safetensors crate's own limit


def weights_file_problem(path: Path) -> str | None:
    """What makes ``path`` (a regular file) unloadable as LoRA or textual-inversion weights, or None."""
    found = read_weights_header(path)
    return found if isinstance(found, str) else None


def read_weights_header(path: Path) -> dict[str, list[int]] | str:
    """The tensors of a weights file as {name: shape}, or what makes it unloadable.

    Reads the header only, without torch: a ``.safetensors`` file must have the layout the
    safetensors loader checks (an 8-byte little-endian header length, a JSON header of tensors whose
    byte ranges fit their dtype and shape and fill the rest of the file exactly); any other file is
    loaded with ``torch.load`` by diffusers, so it must start like one (a zip archive, as
    ``torch.save`` writes, or a pickle), and its tensors cannot be listed ({} is returned).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if path.suffix.lower() != ".safetensors":
                if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
                    return {}
                return "not a weights file (neither safetensors nor a PyTorch file)"
            if len(head) < 8:
                return "not a safetensors file (too short for its 8-byte header length)"
            length = int.from_bytes(head, "little")
            if length > min(size - 8, MAX_SAFETENSORS_HEADER):
                return "not a safetensors file (its header length points beyond the end of the file)"
            header = json.loads(f.read(length))
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    except ValueError:  # also UnicodeDecodeError and json.JSONDecodeError
        return "not a safetensors file (its header is not JSON)"
    problem = _safetensors_header_problem(header, size - 8 - length)
    if problem is not None:
        return problem
    return {str(name): list(info["shape"]) for name, info in header.items() if name != "__metadata__"}


def lora_problem(tensors: dict[str, list[int]]) -> str | None:
    """What keeps a safetensors file's tensors from being LoRA weights, or None.

    Every LoRA format names its tensors with 'lora' (PEFT's 'lora_A'/'lora_B', kohya's 'lora_unet_...',
    older diffusers' 'to_k_lora.down'); diffusers loads a file with none of them without a word and
    renders as if there were no LoRA. A PyTorch file's tensors are not known here (``tensors`` is empty).
    """
    if tensors and not any("lora" in name.lower() for name in tensors):
        names = ", ".join(shorten(name, 30) for name in list(tensors)[:3])
        return (
            f"no tensor in it is LoRA weights (their names hold 'lora'; this file has {names}"
            f"{', ...' if len(tensors) > 3 else ''}); is it a learned embedding?"
        )
    return None


def embedding_problem(tensors: dict[str, list[int]]) -> str | None:
    """What keeps a safetensors file's tensors from loading as one learned embedding, or None.

    diffusers' ``load_textual_inversion`` takes a file of exactly one tensor (named after its token)
    and refuses any other; a PyTorch file's tensors are not known here (``tensors`` is empty).
    """
    if len(tensors) > 1:
        names = ", ".join(shorten(name, 30) for name in list(tensors)[:3])
        return (
            f"a learned-embedding file holds one tensor (its token's vectors), this one holds "
            f"{len(tensors)} ({names}{', ...' if len(tensors) > 3 else ''}); is it a LoRA?"
        )
    return None


def _safetensors_header_problem(header: Any, data_bytes: int) -> str | None:
    """What is wrong with a parsed safetensors header, given the bytes that follow it; None if nothing."""
    if not isinstance(header, dict):
        return "not a safetensors file (its header is not a JSON object)"
    ranges: list[tuple[int, int]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shown = shorten(str(name), 40)
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            return f"not a safetensors file (tensor '{shown}' lacks dtype, shape or data_offsets)"
        ints = [*shape, begin, end] if isinstance(shape, list) else None
        if ints is None or not all(type(i) is int and i >= 0 for i in ints) or begin > end:
            return f"not a safetensors file (tensor '{shown}' has a bad shape or byte range)"
        width = _DTYPE_BYTES.get(dtype) if isinstance(dtype, str) else 0
        if width == 0:
            return f"not a safetensors file (tensor '{shown}' has no dtype name)"
        if width is not None and math.prod(shape) * width != end - begin:
            return f"not a safetensors file (tensor '{shown}' is {end - begin} bytes, its shape needs {math.prod(shape) * width})"
        ranges.append((begin, end))
    if not ranges:
        return "it holds no tensors"
    at = 0
    for begin, end in sorted(ranges):
        if begin != at:
            return "not a safetensors file (its tensors overlap or leave gaps)"
        at = end
    if at != data_bytes:
        return f"not a safetensors file (its tensors need {at} bytes after the header, the file has {data_bytes}: truncated?)"
    return None


MAX_INPUT_SIDE = 8192


def image_size(path: Path) -> tuple[int, int] | str:
    """The (width, height) of an input image, or what is wrong with it. Reads the header, not the pixels."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # A decompression bomb (a small file that decodes to gigapixels) is refused, not a warning.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                im.verify()  # checks the file's structure and checksums without decoding it all
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return f"the image is too large to decode safely (a decompression bomb?); at most {MAX_INPUT_SIDE}x{MAX_INPUT_SIDE} pixels"
    except UnidentifiedImageError:
        return "not an image Pillow can read (use PNG, JPEG or WebP)"
    except (OSError, SyntaxError, ValueError) as exc:
        return f"the image file is damaged ({exc})"
    if width > MAX_INPUT_SIDE or height > MAX_INPUT_SIDE:
        return f"the image is {width}x{height}; at most {MAX_INPUT_SIDE}x{MAX_INPUT_SIDE} pixels"
    return (width, height)


def is_flat(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as im:
        low, high = im.convert("L").getextrema()
    return bool(low == high)


def path_kind(path: Path) -> str:
    """'file', 'folder', 'missing', what else is there (a named pipe...), or why it cannot be looked at.

    ``Path.is_file`` raises for a name too long for the file system; a scene check must not.
    """
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except (OSError, ValueError) as exc:
        return f"unusable: {getattr(exc, 'strerror', None) or exc}"
    if stat.S_ISDIR(mode):
        return "folder"
    return not_regular(mode) or "file"
