"""``render.py import FILE``: a Parseq JSON export or a Deforum settings file as a scene YAML.

Both tools write JSON. A Parseq export holds ``rendered_frames`` (every frame's values: ``scale``,
``strength``, ``zoom``, ``angle``, ``translation_x``... and ``deforum_prompt``, ``"positive --neg
negative"``) and ``options`` (``output_fps``). A Deforum settings file holds ``prompts`` (or
``animation_prompts``: ``{"0": "...", "30": "..."}``), schedule strings (``strength_schedule``,
``cfg_scale_schedule``, ``zoom``, ``angle``, ``translation_x``...), ``W``, ``H``, ``fps``, ``seed``,
``max_frames``::

    scene_text, notes = convert(Path("settings.txt"))     # ImportFailed(problem) if it is neither

The values a scene holds are translated; what it cannot hold (3D motion, cadence, colour coherence,
a checkpoint named by the web UI...) is listed in ``notes``. Two conversions are not one to one:
Deforum's ``strength`` is how much of the previous frame is kept, so the scene's (how much a frame
changes) is 1 minus it; and prompts switch at their frame, so each prompt keyframe holds. A Parseq
value given at every frame is written as a schedule of the frames where it bends (linear between).
Each format is read in its own module (``import_parseq``, ``import_deforum``); what they share is in
``import_common``.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from pipeline.scene.import_common import ImportFailed
from pipeline.scene.import_deforum import from_deforum
from pipeline.scene.import_parseq import from_parseq
from pipeline.scene.inputfiles import read_scene_bytes
from pipeline.scene.problems import Problem

FORMATS = "a Parseq JSON export (with 'rendered_frames') or a Deforum settings file (with 'prompts')"


def convert(path: Path, shown: str | None = None) -> tuple[str, list[str]]:
    """The scene YAML for a Parseq export or Deforum settings file, and what it could not carry over."""
    shown = shown or str(path)
    if not path.is_file():
        what = "not found" if not path.exists() else "not a regular file"
        raise ImportFailed(Problem(shown, 1, 1, f"{what}; expected {FORMATS}"))
    raw = read_scene_bytes(path, shown)  # at most 64 MiB, read once
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise ImportFailed(Problem(shown, 1, 1, f"the file is not UTF-8 text; expected {FORMATS}")) from None
    except json.JSONDecodeError as exc:
        raise ImportFailed(
            Problem(shown, exc.lineno, exc.colno, f"not JSON ({exc.msg}); expected {FORMATS}")
        ) from None
    except RecursionError:
        raise ImportFailed(
            Problem(shown, 1, 1, f"the JSON is nested too deeply; expected {FORMATS}")
        ) from None
    if isinstance(data, dict) and isinstance(data.get("rendered_frames"), list):
        scene, notes = from_parseq(data, shown, raw)
        source = "Parseq export"
    elif isinstance(data, dict) and any(k in data for k in ("prompts", "animation_prompts", "max_frames")):
        scene, notes = from_deforum(data, shown, raw)
        source = "Deforum settings"
    else:
        what = "a JSON object" if isinstance(data, dict) else f"JSON {type(data).__name__}"
        raise ImportFailed(
            Problem(
                shown,
                1,
                1,
                f"{what} with neither 'rendered_frames' nor 'prompts'; expected {FORMATS}",
            )
        )
    header = [
        f"# Imported from the {source} {Path(shown).name} by render.py import.",
        "# Not carried over:" + ("" if notes else " nothing."),
        *[f"#  - {note}" for note in notes],
    ]
    body = yaml.safe_dump(scene, sort_keys=False, allow_unicode=True, width=1000)
    return "\n".join(header) + "\n" + body, notes
