"""Pydantic's validation errors in the words of someone who writes scenes, at the value they are about.

pydantic says ``keyframes.1.frame: Input should be a valid integer``; a scene's author reads
``s.yaml:7:12: keyframe 2, frame: expected a whole number, got the text 'ten'``. Unknown keys get
the closest allowed name, keys of other tools (Deforum's ``prompts``, ``strength_schedule``) what
to write here instead::

    problem = problem_from_pydantic(doc, error)     # one of ValidationError.errors()

Also the paths of those errors as places in the scene's data (:func:`clean_loc`, :func:`lookup`).
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel

from pipeline.scene.problems import Problem, describe, shorten
from pipeline.scene.schema import SCALARS, SceneFields
from pipeline.scene.yamlerrors import DEFORUM_SCHEDULE, deforum_hint, deforum_name_hint
from pipeline.scene.yamlio import YamlDoc


def lookup(data: Any, path: tuple[Any, ...]) -> Any:
    """The value at ``path`` in plain data, or None if there is none."""
    for step in path:
        try:
            data = data[step]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def clean_loc(loc: tuple[Any, ...], data: Any) -> tuple[Any, ...]:
    """A pydantic error location as a path into the scene's data.

    Union branches and validator wrappers add their names to loc ('list[PromptPart]', 'int',
    'function-before[...]'); those are dropped, unless the scene itself has a key of that name
    there (a user's key 'keyfr[ames' or 'int' is a place in the file, not a pydantic tag).
    """
    out: list[Any] = []
    for x in loc:
        if (isinstance(data, dict) and x in data) or (
            isinstance(data, list) and isinstance(x, int) and 0 <= x < len(data)
        ):
            data = data[x]
        elif isinstance(x, str) and (
            "[" in x or x in ("int", "str", "float", "function-before", "function-after")
        ):
            continue
        else:
            data = None  # a key the data lacks: a missing one, or a field of a shorthand value
        out.append(x)
    return tuple(out)


_TYPE_WORDS = {
    "string_type": "text",
    "int_type": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _where_words(loc: tuple[Any, ...]) -> str:
    """'keyframe 2 (frame list index 1)' style context for a pydantic loc."""
    parts: list[str] = []
    i = 0
    while i < len(loc):
        item = loc[i]
        if (
            item in ("keyframes", "outputs", "embeddings", "loras")
            and i + 1 < len(loc)
            and isinstance(loc[i + 1], int)
        ):
            parts.append(f"{item[:-1]} {loc[i + 1] + 1}")
            i += 2
            continue
        if (
            item in ("prompt", "prompts", "size", "seeds")
            and i + 1 < len(loc)
            and isinstance(loc[i + 1], int)
        ):
            parts.append(f"{item} item {loc[i + 1] + 1}")
            i += 2
            continue
        parts.append(str(item))
        i += 1
    return ", ".join(parts)


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that holds the value at ``loc`` (to list its allowed keys)."""
    model: type[BaseModel] = SceneFields
    for item in loc:
        if isinstance(item, int):
            continue
        field = model.model_fields.get(str(item))
        if field is None:
            return model
        found = _first_model(field.annotation)
        if found is None:
            return model
        model = found
    return model


def _first_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _first_model(arg)
        if found is not None:
            return found
    meta = getattr(annotation, "__origin__", None)
    if meta is not None and isinstance(meta, type) and issubclass(meta, BaseModel):
        return meta
    return None


# Top-level keys that belong in keyframes, with what users of other tools call them: Deforum's
# 'prompts'/'animation_prompts' and '<value>_schedule' strings, Parseq's per-frame rows.
_KEYFRAME_ONLY = {"prompt", "prompts", "animation_prompts", "frame", "hold", "lora"}


def _keyframe_key_hint(key: str) -> str | None:
    """Why a top-level ``key`` belongs in 'keyframes' (and how to write it there), or None."""
    if key in _KEYFRAME_ONLY:
        name = "prompt" if "prompt" in key else key
        example = {
            "prompt": "prompt: a dog",
            "frame": "prompt: a dog",
            "hold": "hold: true",
            "lora": "lora: {style: 0.8}",
        }[name]
        return f"'{name}' is set per keyframe, in 'keyframes': e.g. keyframes: [{{frame: 0, {example}}}]"
    return deforum_name_hint(key)


def problem_from_pydantic(doc: YamlDoc, err: Any) -> Problem:
    kind = err["type"]
    value = err.get("input")
    clean = clean_loc(tuple(err["loc"]), doc.data)
    where = _where_words(clean)
    if kind == "extra_forbidden":
        key = str(clean[-1])
        model = _model_at(clean[:-1])
        allowed = sorted(model.model_fields) if model else []
        context = _where_words(clean[:-1])
        inside = f" in {context}" if context else ""
        keyframe_hint = _keyframe_key_hint(key) if len(clean) == 1 else None
        if keyframe_hint is not None:
            return doc.problem(
                clean, f"unknown key '{shorten(key, 40)}' at the top level; {keyframe_hint}", key=True
            )
        if DEFORUM_SCHEDULE.match(key):
            # '{frame: 0, guidance: 0:(7.5), 30:(9)}' splits at the comma: '30:(9)' is read as a key.
            named = next(
                (k for k in reversed(list(lookup(doc.data, clean[:-1]) or {})) if k in SCALARS), "guidance"
            )
            return doc.problem(
                clean, f"unknown key '{shorten(key, 40)}'{inside}; {deforum_hint(named)}", key=True
            )
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return doc.problem(
            clean, f"unknown key '{shorten(key, 40)}'{inside}; {hint}allowed: {', '.join(allowed)}", key=True
        )
    if kind == "missing":
        return doc.problem(
            clean[:-1], f"missing required key '{clean[-1]}' in {_where_words(clean[:-1]) or 'the scene'}"
        )
    if kind in _TYPE_WORDS:
        want = _TYPE_WORDS[kind]
        hint = ""
        if kind == "bool_type" and isinstance(value, str):
            hint = " (YAML 1.2: only true and false are booleans; yes/no/on/off are text)"
        elif kind in ("int_type", "float_type") and isinstance(value, str) and DEFORUM_SCHEDULE.match(value):
            hint = f"; {deforum_hint(str(clean[-1]), where='top' if len(clean) == 1 else 'keyframe')}"
        elif kind in ("int_type", "float_type") and isinstance(value, str) and ":" in value:
            hint = " (values like 1:30 are text, not minutes:seconds)"
        elif value is None:
            hint = " (give a value, or remove the key to use the default)"
        elif kind == "string_type" and not isinstance(value, (list, dict)):
            hint = " (put quotes around it to make it text)"
        return doc.problem(clean, f"{where}: expected {want}, got {describe(value)}{hint}")
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return doc.problem(
            clean, f"{where}: {describe(value)} is not allowed; allowed: {expected.replace(' or ', ', ')}"
        )
    if kind in ("too_short", "too_long"):
        ctx = err.get("ctx", {})
        return doc.problem(clean, f"{where}: {err['msg'].lower()} (got {ctx.get('actual_length')})")
    if kind in ("frame_ref", "duration", "pair", "corners", "prompt_type"):
        return doc.problem(clean, f"{where}: {err['msg']}")
    if kind == "finite_number":
        return doc.problem(clean, f"{where}: expected a finite number, got {describe(value)}")
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return doc.problem(clean, f"{where}: {err['msg'].lower()}, got {describe(value)}")
    return doc.problem(clean, f"{where}: {err['msg']}")
