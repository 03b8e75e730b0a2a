"""The audio analysis, cached in the cache's records store: keyed by the file's sha256 and the
analysis settings, so a re-plan (or a render, or a watch round) does not analyse the song again::

    with analysis_cache(Path("cache")):        # what Session does around loading a scene
        result = cached_analysis(Path("song.wav"), sha256, settings())

The scene loader has no cache of its own, so the session names the cache folder for the time it
loads (a context variable: one scene loads at a time per thread). Without one (``load_scene``
alone) the song is analysed each time. An analysis is written into a cache that exists and is
writable; ``--plan`` never creates one, and a render stores what its plan analysed
(:func:`remember_scene_analysis`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from pipeline.audio.analysis import analyse
from pipeline.plan.keys import canonical_json
from pipeline.store.cache import CacheDir, CacheUnavailable
from pipeline.store.records import audio_analysis_key

__all__ = ["analysis_cache", "cached_analysis", "remember_scene_analysis"]

_CACHE_DIR: ContextVar[Path | None] = ContextVar("sd_scenes_audio_cache", default=None)


@contextlib.contextmanager
def analysis_cache(cache_dir: Path | None) -> Iterator[None]:
    """Analyses made or looked up inside the block use the cache at ``cache_dir``."""
    token = _CACHE_DIR.set(cache_dir)
    try:
        yield
    finally:
        _CACHE_DIR.reset(token)


def _looks_right(found: Any) -> bool:
    # A record from another version of this module (or a damaged one) is a miss, never a crash.
    return (
        isinstance(found, dict)
        and all(k in found for k in ("duration", "hop_s", "tempo", "beats", "onsets", "env"))
        and isinstance(found["env"], dict)
    )


def cached_analysis(path: Path, sha256: str, config: dict[str, Any]) -> dict[str, Any]:
    """The analysis of ``path`` (whose content hash is ``sha256``) from the cache, else made now."""
    key = audio_analysis_key(sha256, config)
    cache_dir = _CACHE_DIR.get()
    if cache_dir is not None:
        with contextlib.suppress(CacheUnavailable, OSError):
            cache = CacheDir.open_readonly(cache_dir)
            if cache is not None:
                try:
                    found = cache.records.get_json(key)
                finally:
                    cache.close()
                if _looks_right(found):
                    return found
    # Through canonical JSON, as the records store keeps it: a fresh analysis and a cached one plan
    # the very same values (so the same keys).
    result = json.loads(canonical_json(analyse(path, config)))
    if cache_dir is not None and CacheDir.exists(cache_dir) and CacheDir.unwritable(cache_dir) is None:
        with contextlib.suppress(CacheUnavailable, OSError), CacheDir.open(cache_dir) as cache:
            _put(cache, key, result)
    return result


def remember_scene_analysis(cache: CacheDir, scene: Any) -> None:
    """Store the analysis of ``scene``'s soundtrack if the cache lacks it (made before the cache existed)."""
    timeline = getattr(scene, "_audio", None)
    if timeline is None or timeline.analysis is None or timeline.key is None or cache.readonly:
        return
    if cache.records.get_json(timeline.key) is None:
        _put(cache, timeline.key, timeline.analysis)


def _put(cache: CacheDir, key: str, result: dict[str, Any]) -> None:
    if not cache.readonly:
        cache.records.put_json(key, result)
