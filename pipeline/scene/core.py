"""The Scene: a scene file's fields (``pipeline.scene.schema``) that check their own rules and know
their timeline as soon as they are built, whether from a file or in code::

    scene = Scene.model_validate({"keyframes": [{"frame": 0, "prompt": "a dog"}, {"frame": 4, "prompt": "a cat"}]})
    scene.total_frames, scene.keyframe_frames      # 5, [0, 4]
    scene = load_scene("scenes/dog_cat.yaml")      # pipeline.scene.load: the same, from a file

A scene built in code raises pydantic's ``ValidationError`` with the rules' messages; the loader
builds it with a :class:`Loading` context instead, which collects the rules' problems with their
places in the file. Either way the rules (``pipeline.scene.rules``) give the scene its timeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationInfo, model_validator

from pipeline.scene.problems import Problem
from pipeline.scene.rules import check_rules
from pipeline.scene.scheduled import Schedule
from pipeline.scene.schema import PromptPart, SceneFields
from pipeline.scene.yamlio import YamlDoc


@dataclass
class Loading:
    """The validation context of the loader: where the file is, its positions, its schedule strings
    and the values it set aside as badly typed. The rules' problems are collected here, not raised,
    so that they are reported together with the type problems."""

    path: Path
    doc: YamlDoc
    schedules: dict[str, Schedule]
    removed: set[tuple[Any, ...]]
    allow_outside_inputs: bool
    drives: dict[str, Any] = field(default_factory=dict)  # audio-driven values (pipeline.audio.rules)
    problems: list[Problem] = field(default_factory=list)


class Scene(SceneFields):
    """A whole scene file. Top-level scalars are the values at frame 0 unless a keyframe there sets them."""

    @model_validator(mode="after")
    def _timeline(self, info: ValidationInfo) -> Scene:
        """The scene rules, and with them the timeline (``keyframe_frames``, ``total_frames``).

        A scene built in code (``Scene.model_validate({...})``, ``Scene(...)``) raises on a broken
        rule and has its prompt parts joined here; its relative paths are relative to the current
        folder. A loaded one (context :class:`Loading`) leaves both to the loader.
        """
        loading = info.context
        if isinstance(loading, Loading):
            self._path, self._doc, self._schedules = loading.path, loading.doc, loading.schedules
            self._audio_drives = loading.drives
            loading.problems = check_rules(
                self, loading.doc, allow_outside_inputs=loading.allow_outside_inputs, removed=loading.removed
            )
            return self
        self._path = Path("scene.yaml").resolve()
        problems = check_rules(self, YamlDoc("<Scene>", None), allow_outside_inputs=False)
        if problems:
            raise ValueError("; ".join(p.message for p in problems))
        join_prompt_parts(self)
        return self


# ---------------------------------------------------------------------------------------------
# Shared prompt parts become part of every prompt when the scene is built, so the planner (and
# every key) sees only joined prompts.

# A part that starts with one of these is joined without a space (", film grain").
_JOIN_WITHOUT_SPACE = ",.;:!?)]}"


def join_prompt(prefix: str, text: str, suffix: str) -> str:
    """``prefix``, ``text`` and ``suffix`` joined with one space, or none where the next part starts
    with punctuation or either side already has a space there ('A cute' + 'dog' + ', film grain'
    is 'A cute dog, film grain')."""

    def glue(a: str, b: str) -> str:
        if not a or not b:
            return a + b
        space = a[-1].isspace() or b[0].isspace() or b[0] in _JOIN_WITHOUT_SPACE
        return a + ("" if space else " ") + b

    return glue(glue(prefix, text), suffix)


def join_prompt_parts(scene: SceneFields) -> None:
    """Join ``prompt_prefix`` / ``prompt_suffix`` into every prompt, then clear them.

    A keyframe that sets a prefix or suffix changes it from that keyframe on (it holds, as text
    cannot be eased); if it sets no prompt, the prompt in force is restated with the new parts.
    """
    prefix, suffix = scene.prompt_prefix or "", scene.prompt_suffix or ""
    if scene.walk is not None and (prefix or suffix):
        scene.walk.prompt = join_prompt(prefix, scene.walk.prompt, suffix)
    if scene.grid is not None and (prefix or suffix):
        scene.grid.prompts = [join_prompt(prefix, p, suffix) for p in scene.grid.prompts]
    raw: list[PromptPart] | None = None
    for kf in scene.keyframes:
        changed = kf.prompt is not None
        if kf.prompt_prefix is not None:
            prefix, changed = kf.prompt_prefix, True
        if kf.prompt_suffix is not None:
            suffix, changed = kf.prompt_suffix, True
        if kf.prompt is not None:
            raw = kf.prompt
        if changed and raw is not None and (prefix or suffix or kf.prompt is None):
            kf.prompt = [PromptPart(text=join_prompt(prefix, p.text, suffix), weight=p.weight) for p in raw]
        if kf.prompt_prefix is not None or kf.prompt_suffix is not None:
            kf.prompt_prefix = kf.prompt_suffix = None
    if scene.prompt_prefix is not None or scene.prompt_suffix is not None:
        scene.prompt_prefix = scene.prompt_suffix = None
