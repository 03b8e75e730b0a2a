"""A soundtrack for a scene: muxed into the MP4, keyframes on its beats, values driven by it.

``audio: {path: song.wav, start: 12.5s}`` in a scene (see README "Music videos")::

    keyframes:
      - {frame: {beat: 8}, prompt: "a cat", curve: audio}   # the 8th beat after 12.5s; t follows the onsets
    zoom: {audio: rms, min: 1.0, max: 1.05}                 # louder is closer

The parts, each one concern: ``model`` (the scene's shapes, pydantic only), ``analysis`` (librosa,
imported lazily: it is the optional extra ``[audio]``), ``store`` (the analysis cached in the cache's
records store), ``timeline`` (beats as frames, per-frame features, the ``audio`` curve; pure Python so
the planner stays light), ``rules`` (the scene checks, located problems) and ``mux`` (ffmpeg).
"""

from __future__ import annotations
