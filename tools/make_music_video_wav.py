"""Write scenes/inputs/music_video.wav, the soundtrack of scenes/music_video.yaml: 4 seconds at 120 bpm
(a kick on every beat, a hi-hat between, a bass note that swells), 11,025 Hz mono 16-bit, ~88 KB.

    python tools/make_music_video_wav.py

Made with numpy and the standard library's wave module, the same bytes every time (seeded noise).
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

RATE = 11025
SECONDS = 4.0
BEAT = 0.5  # 120 bpm
OUT = Path(__file__).resolve().parent.parent / "scenes" / "inputs" / "music_video.wav"


def song() -> np.ndarray:
    t = np.arange(int(RATE * SECONDS)) / RATE
    y = np.zeros_like(t)
    rng = np.random.default_rng(0)
    for k in range(int(SECONDS / BEAT)):
        start = k * BEAT
        kick = (t >= start) & (t < start + 0.12)
        dt = t[kick] - start
        y[kick] += 0.8 * np.sin(2 * np.pi * (60 + 90 * np.exp(-dt * 40)) * dt) * np.exp(-dt * 25)
        hat = (t >= start + BEAT / 2) & (t < start + BEAT / 2 + 0.03)
        y[hat] += 0.03 * rng.standard_normal(int(hat.sum())) * np.exp(-(t[hat] - start - BEAT / 2) * 120)
    y += 0.25 * np.sin(2 * np.pi * 55 * t) * (t / SECONDS) ** 2  # the bass swells
    return np.clip(y, -1, 1)


def main() -> None:
    pcm = (song() * 32767).astype("<i2").tobytes()
    with wave.open(str(OUT), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(RATE)
        f.writeframes(pcm)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
