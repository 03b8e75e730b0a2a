"""Record keys: the one place that names what the ``records`` store holds.

Frames and embeddings are keyed by the digest of their recipe (:func:`pipeline.plan.keys.key_of`).
Records (small JSON facts about scenes, outputs and renders in progress) are keyed by the digest of
a few strings that name them; each kind of record has its function here, so that no module spells
a record's name by hand and two modules can never disagree on one::

    records.get_json(plan_key(scene.path))                 # the scene's last plan (plan/history.py)
    records.get_json(output_key(target.path))              # how an output file was written
    records.get_json(outputs_of_key(scene.path, out_dir))  # the outputs a scene last wrote there
    records.get(claim_key(frame.key))                      # a render's claim on a frame
    records.get_json(FILE_DIGESTS)                          # the file-hash memo (stat -> sha256)

These digests name records already on users' disks: changing one forgets those records
(tests/test_records.py pins each).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipeline.plan.keys import key_of

__all__ = ["FILE_DIGESTS", "claim_key", "output_key", "outputs_of_key", "plan_key", "record_key"]


def record_key(*parts: str) -> str:
    """Digest any strings into a valid key (the functions below name each use).

    The parts are JSON-encoded as a list before hashing so that ``("a", "bc")`` and ``("ab", "c")``
    cannot collide.
    """
    return key_of(list(parts))


def plan_key(scene_path: str | os.PathLike[str]) -> str:
    """The scene's last plan (the scene file's absolute path names it)."""
    return record_key("plan", str(Path(scene_path).resolve()))


def output_key(path: str | os.PathLike[str]) -> str:
    """How the output file at ``path`` (as the targets name it: absolute) was last written."""
    return record_key("output", str(path))


def outputs_of_key(scene_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> str:
    """The output files the scene last wrote into ``out_dir`` (to remove those it no longer lists)."""
    return record_key("outputs of", str(Path(scene_path).resolve()), str(out_dir))


def audio_analysis_key(sha256: str, config: dict[str, Any]) -> str:
    """A soundtrack's analysis (pipeline.audio.store): the file's content hash and its settings."""
    return record_key("audio-analysis", sha256, json.dumps(config, sort_keys=True, separators=(",", ":")))


def claim_key(frame_key: str) -> str:
    """A render's claim on the frame whose key is ``frame_key``."""
    return record_key("claim", frame_key)


#: The file-hash memo (stat -> sha256) kept so that big checkpoints are hashed once.
FILE_DIGESTS = record_key("file-digests")
