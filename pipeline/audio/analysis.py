"""What librosa hears in a song: beats, onsets, and envelopes (loudness, onset strength, bands).

librosa is the optional extra ``[audio]`` (``pip install 'sd-scenes[audio]'``), so it is imported
only when a scene asks for an analysis; without it :class:`LibrosaMissing` says how to install it::

    result = analyse(Path("song.wav"), settings(bands=[(20, 250)]))
    result["beats"][:3], result["tempo"], len(result["env"]["rms"])

The result is plain JSON (lists of floats, six significant digits), so it is stored as it is in the
cache's records store (``pipeline.audio.store``) and read by the torch- and numpy-free planner.
Every envelope has one value per hop (``hop / sr`` seconds), sample ``j`` covering hop ``j``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

__all__ = ["INSTALL_HINT", "AudioReadError", "LibrosaMissing", "analyse", "librosa_version", "settings"]

SAMPLE_RATE = 22050
HOP = 512
N_FFT = 2048
# Bump when the analysis changes: every cached analysis is made again.
ANALYSIS_VERSION = 1
INSTALL_HINT = "pip install 'sd-scenes[audio]' (or: pip install librosa)"


class LibrosaMissing(ImportError):
    """The scene needs an analysis and librosa is not installed."""


class AudioReadError(ValueError):
    """The audio file cannot be decoded."""


def librosa_version() -> str | None:
    """The installed librosa's version, or None when it cannot be imported; found without importing it
    (importing it compiles numba code: seconds)."""
    try:
        if importlib.util.find_spec("librosa") is None:
            return None
        return version("librosa")
    except (PackageNotFoundError, ValueError):  # ValueError: blocked in sys.modules
        return None


def settings(bands: Sequence[tuple[float, float]] = ()) -> dict[str, Any]:
    """Everything that decides an analysis besides the file's bytes: its cache key is made of both."""
    lib = librosa_version()
    if lib is None:
        raise LibrosaMissing(f"audio analysis needs librosa: {INSTALL_HINT}")
    return {
        "v": ANALYSIS_VERSION,
        "detector": "librosa",
        "librosa": lib,
        "sr": SAMPLE_RATE,
        "hop": HOP,
        "n_fft": N_FFT,
        "bands": sorted([float(lo), float(hi)] for lo, hi in set(bands)),
    }


def _round(values: Any) -> list[float]:
    # Six significant digits: plenty for a curve, and the same text on every machine.
    return [float(f"{float(v):.6g}") for v in values]


def analyse(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Beats and onsets (seconds from the file's start), the tempo, and one envelope per feature."""
    try:
        import librosa
        import numpy as np
    except ImportError as exc:  # pragma: no cover - the extra is installed in CI
        raise LibrosaMissing(f"audio analysis needs librosa: {INSTALL_HINT}") from exc

    sr, hop, n_fft = config["sr"], config["hop"], config["n_fft"]
    try:
        y, _ = librosa.load(str(path), sr=sr, mono=True)
    except Exception as exc:  # soundfile and audioread raise their own kinds
        raise AudioReadError(f"not a readable audio file ({type(exc).__name__}: {exc})") from None
    if y.size == 0:
        raise AudioReadError("the audio file holds no samples")
    onset_env = librosa.onset.onset_strength(y=y, sr=sr, hop_length=hop)
    tempo, beats = librosa.beat.beat_track(onset_envelope=onset_env, sr=sr, hop_length=hop, units="time")
    onsets = librosa.onset.onset_detect(onset_envelope=onset_env, sr=sr, hop_length=hop, units="time")
    env: dict[str, list[float]] = {
        "onset": _round(onset_env),
        "rms": _round(librosa.feature.rms(y=y, frame_length=n_fft, hop_length=hop)[0]),
    }
    if config["bands"]:
        power = np.abs(librosa.stft(y, n_fft=n_fft, hop_length=hop)) ** 2
        freqs = librosa.fft_frequencies(sr=sr, n_fft=n_fft)
        for lo, hi in config["bands"]:
            rows = (freqs >= lo) & (freqs <= hi)
            # The band's loudness: root mean square over its bins (0 where it has none at this resolution).
            band = np.sqrt(power[rows].mean(axis=0)) if rows.any() else np.zeros(power.shape[1])
            env[f"band:{lo:g}-{hi:g}"] = _round(band)
    return {
        "duration": float(f"{y.size / sr:.6f}"),
        "hop_s": hop / sr,
        "tempo": float(f"{float(np.atleast_1d(tempo)[0]):.4f}"),
        "beats": _round(beats),
        "onsets": _round(onsets),
        "env": env,
    }
