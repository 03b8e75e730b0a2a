"""sd-scenes: declarative Stable Diffusion animations with exact incremental re-renders.

The Python API (see ``pipeline.app`` and the README's "Python API" section)::

    import pipeline

    session = pipeline.open("scenes/dog_cat.yaml")   # or YAML text, or a dict
    print(*session.problems, sep="\\n")               # [] when the scene can render
    report = session.render(progress=print)
    first = session.frames()[0]                      # a PIL image

Nothing imported by this package's top level pulls in torch; the API's names are loaded on first
use, so ``import pipeline.plan.keys`` (say) stays as light as that module.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = (
    "BatchRenderer",
    "FrameStatus",
    "InputError",
    "OptionProblem",
    "Problem",
    "Progress",
    "RenderError",
    "RenderSetup",
    "Report",
    "Session",
    "open",
)
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        from pipeline import app

        return getattr(app, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
