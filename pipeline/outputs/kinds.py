"""Output kinds and the suffixes that ask for them: one small table, shared by the scene's checks
(``pipeline.scene``) and the writers. Nothing here imports Pillow, torch or the scene::

    from pipeline.outputs.kinds import kind_for_path
    kind_for_path("renders/dog_cat.gif")   # "gif"; "frames/" is "frames", "sheet.png" is "grid"
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["OUTPUT_KINDS", "kind_for_path"]

OUTPUT_KINDS: tuple[str, ...] = ("mp4", "gif", "frames", "grid")

_SUFFIX_KINDS = {".mp4": "mp4", ".gif": "gif", ".png": "grid", ".jpg": "grid", ".jpeg": "grid"}


def kind_for_path(path: str | os.PathLike[str]) -> str:
    """The output kind a path asks for: .mp4, .gif, .png/.jpg (grid), or a directory (frames).

    A directory is a path ending with "/" or one without a suffix. Pass a string when the
    trailing slash matters: ``Path`` drops it.
    """
    text = os.fspath(path)
    if text.endswith(("/", os.sep)) or (os.altsep and text.endswith(os.altsep)):
        return "frames"
    suffix = Path(text).suffix.lower()
    if not suffix:
        return "frames"
    try:
        return _SUFFIX_KINDS[suffix]
    except KeyError:
        raise ValueError(
            f"cannot tell the output kind of {text!r} from its suffix {suffix!r}: use .mp4 (mp4), "
            f".gif (gif), .png or .jpg (grid), or a directory ending with '/' (frames); "
            f"allowed kinds: {', '.join(OUTPUT_KINDS)}"
        ) from None
