"""Strict YAML loading with source positions, for scene files.

PyYAML's loaders are too permissive for files that other people write: they accept duplicate keys
(the last one silently wins), anchors and aliases (a 1 KB "billion laughs" file expands to gigabytes),
tags that build Python objects, and YAML 1.1 scalars where ``no`` is ``False`` and ``1:30`` is 90.
This module composes the node tree from libyaml's parser (or PyYAML's pure-Python one: where
PyYAML was built without libyaml, and for any file that does not parse, so that syntax errors read
the same either way), rejects all of those, resolves plain scalars with the YAML 1.2 core schema
(only ``true``/``false`` are booleans, ``no`` stays the text "no", ``1:30`` stays "1:30"), and
records the line and column of every value so that later validation can point at the exact place::

    doc = load_yaml(text, "scenes/dog_cat.yaml")
    doc.data["keyframes"][1]["prompt"]
    doc.where(("keyframes", 1, "prompt"))      # -> (12, 13)

Every problem found is collected as a :class:`Problem` (``pipeline.scene.problems``); :class:`SceneError`
carries all of them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.events import AliasEvent, ScalarEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import BaseResolver

from pipeline.scene.problems import Problem, SceneError
from pipeline.scene.yamlerrors import syntax_problem

try:  # libyaml, when PyYAML was built with it (the usual wheels are)
    from yaml.cyaml import CParser
except ImportError:  # pragma: no cover - depends on how PyYAML was built
    CParser = None

Path_ = tuple[str | int, ...]


@dataclass
class YamlDoc:
    """Plain Python data from a YAML file plus the source position of every node in it."""

    file: str
    data: Any
    # path -> (line, col) of the value node; key_marks: path -> position of the mapping key itself.
    marks: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    key_marks: dict[Path_, tuple[int, int]] = field(default_factory=dict)

    def where(self, path: Iterable[str | int], *, key: bool = False) -> tuple[int, int]:
        """Best known position for ``path``: the node itself, or its closest recorded ancestor."""
        p = tuple(path)
        while True:
            if key and p in self.key_marks:
                return self.key_marks[p]
            if p in self.marks:
                return self.marks[p]
            if not p:
                return (1, 1)
            p = p[:-1]

    def problem(self, path: Iterable[str | int], message: str, *, key: bool = False) -> Problem:
        line, col = self.where(path, key=key)
        return Problem(self.file, line, col, message)


# YAML 1.2 core schema, as regexes over the plain (unquoted) scalar text.
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_BOOL_TRUE = re.compile(r"^(?:true|True|TRUE)$")
_BOOL_FALSE = re.compile(r"^(?:false|False|FALSE)$")
_INT = re.compile(r"^[-+]?[0-9]+$")
_INT_OCT = re.compile(r"^0o[0-7]+$")
_INT_HEX = re.compile(r"^0x[0-9a-fA-F]+$")
_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$")
_INF = re.compile(r"^[-+]?\.(?:inf|Inf|INF)$")
_NAN = re.compile(r"^\.(?:nan|NaN|NAN)$")


def resolve_plain(text: str) -> Any:
    """Resolve an unquoted scalar with the YAML 1.2 core schema (no ``yes``/``no``/sexagesimal)."""
    if _NULL.match(text):
        return None
    if _BOOL_TRUE.match(text):
        return True
    if _BOOL_FALSE.match(text):
        return False
    if _INT.match(text):
        # int() refuses more than 4300 digits (sys.get_int_max_str_digits); such a "number" stays
        # text, so that it is reported as a bad value rather than raised as a ValueError.
        return int(text) if len(text) <= 4300 else text
    if _INT_OCT.match(text):
        return int(text[2:], 8)
    if _INT_HEX.match(text):
        return int(text[2:], 16)
    if _FLOAT.match(text):
        return float(text)
    if _INF.match(text):
        return -math.inf if text.startswith("-") else math.inf
    if _NAN.match(text):
        return math.nan
    return text


# A scene needs six levels (the top, keyframes, 1, prompt, 0, text). Composing and building recurse
# once per level, so ten kilobytes of "[[[[..." would otherwise end in a RecursionError.
MAX_DEPTH = 32


class _TooDeep(Exception):
    """Nesting beyond MAX_DEPTH, at a 1-based line and column."""

    def __init__(self, line: int, col: int):
        super().__init__(f"{line}:{col}")
        self.line, self.col = line, col


class _Strict(Composer):
    """A composer that refuses aliases and anchors before anything is expanded, every tag, and deep nesting."""

    _problems: list[tuple[int, int, str]]
    _depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if self._depth >= MAX_DEPTH:
            mark = self.peek_event().start_mark
            raise _TooDeep(mark.line + 1, mark.column + 1)
        self._depth += 1
        try:
            return self._compose_checked(parent, index)
        finally:
            self._depth -= 1

    def _compose_checked(self, parent: Node | None, index: Any) -> Node | None:
        if self.check_event(AliasEvent):
            event = self.get_event()
            self._problems.append(
                (
                    event.start_mark.line + 1,
                    event.start_mark.column + 1,
                    f"YAML alias '*{event.anchor}' is not allowed; anchors and aliases are refused "
                    "(they can expand a small file into gigabytes); write the value out",
                )
            )
            # Stand in an empty scalar so composing goes on and every problem is reported.
            return ScalarNode("tag:yaml.org,2002:null", "", event.start_mark, event.end_mark)
        event = self.peek_event()
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            self._problems.append(
                (
                    event.start_mark.line + 1,
                    event.start_mark.column + 1,
                    f"YAML anchor '&{anchor}' is not allowed; anchors and aliases are refused, "
                    "write the value out",
                )
            )
            event.anchor = None
        tag = getattr(event, "tag", None)
        if tag is not None and tag != "!":
            # !!python/object and friends: safe loading would refuse some, but we refuse every
            # explicit tag so that what a value means never depends on a tag.
            short = (
                "!!" + tag.removeprefix("tag:yaml.org,2002:") if tag.startswith("tag:yaml.org,2002:") else tag
            )
            self._problems.append(
                (
                    event.start_mark.line + 1,
                    event.start_mark.column + 1,
                    f"YAML tag '{short}' is not allowed; only plain values are accepted",
                )
            )
            event.tag = None
            if hasattr(event, "implicit") and isinstance(event.implicit, tuple):
                event.implicit = (True, False)
        if isinstance(event, ScalarEvent) and event.style == "":
            event.style = None  # libyaml says '' for a plain scalar, PyYAML None
        return super().compose_node(parent, index)


class _StrictLoader(_Strict, yaml.SafeLoader):
    """PyYAML's own parser, in Python: the one whose error messages users see."""

    def __init__(self, stream: str, problems: list[tuple[int, int, str]]):
        super().__init__(stream)
        self._problems = problems


class _FastStrictLoader(_Strict, CParser or object, BaseResolver):  # type: ignore[misc]
    """libyaml's parser with the same composer: five times faster on a scene keyed at every frame.

    Only a file that parses is read with it; one that does not is parsed again by
    :class:`_StrictLoader`, so syntax errors read the same with or without libyaml.
    """

    def __init__(self, stream: str, problems: list[tuple[int, int, str]]):
        CParser.__init__(self, stream)
        Composer.__init__(self)
        BaseResolver.__init__(self)
        self._problems = problems


def load_yaml(text: str, file: str) -> YamlDoc:
    """Parse ``text`` strictly; raise :class:`SceneError` with every problem found."""
    doc, problems = load_yaml_lenient(text, file)
    if problems:
        raise SceneError(problems)
    return doc


def load_yaml_lenient(text: str, file: str) -> tuple[YamlDoc, list[Problem]]:
    """Like :func:`load_yaml`, but returns the data together with the problems that left it usable.

    A duplicate key, an alias or a tag is a problem, but the rest of the file can still be checked
    (the first value of a duplicate is kept; an alias or tagged value becomes null), so a user sees
    every problem in one run. A syntax error leaves nothing usable and raises at once.
    """
    problems: list[tuple[int, int, str]] = []
    try:
        root = _compose(text, problems)
    except _TooDeep as exc:
        raise SceneError(
            [
                Problem(
                    file,
                    exc.line,
                    exc.col,
                    f"the YAML nests more than {MAX_DEPTH} levels deep here; a scene needs six at most",
                )
            ]
        ) from None
    except yaml.MarkedYAMLError as exc:
        raise SceneError([syntax_problem(exc, text, file)]) from None
    except yaml.reader.ReaderError as exc:  # control characters and other unprintable input
        line, col = _line_col(text, exc.position)
        raise SceneError(
            [
                Problem(
                    file,
                    line,
                    col,
                    f"character {exc.character!r} is not allowed in YAML; remove it (control characters are not text)",
                )
            ]
        ) from None
    except yaml.YAMLError as exc:
        raise SceneError([Problem(file, 1, 1, f"cannot read YAML: {exc}")]) from None

    doc = YamlDoc(file=file, data=None)
    if root is None or (isinstance(root, ScalarNode) and root.style is None and root.value == ""):
        raise SceneError(
            [
                Problem(
                    file, 1, 1, "the scene file is empty; a scene is a YAML mapping with at least 'keyframes'"
                )
            ]
        )
    doc.data = _build(root, (), doc, problems)
    return doc, [Problem(file, ln, col, msg) for ln, col, msg in problems]


def _compose(text: str, problems: list[tuple[int, int, str]]) -> Node | None:
    """The node tree of ``text``: with libyaml's parser when there is one and the text parses."""
    if CParser is not None:
        try:
            # CParser has a get_single_node of its own, in C; this one composes through _Strict.
            return Composer.get_single_node(_FastStrictLoader(text, problems))
        except yaml.YAMLError:
            problems.clear()  # read again below, for PyYAML's messages
    loader = _StrictLoader(text, problems)
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


def _line_col(text: str, position: int) -> tuple[int, int]:
    """1-based line and column of a character offset."""
    before = text[:position]
    return before.count("\n") + 1, position - (before.rfind("\n") + 1) + 1


# A double-quoted escape can make text that is not text: "\\ud800" is half of a UTF-16 pair (no file
# system, encoder or terminal takes it) and "\\0" ends a C string (no path may hold it).
_NOT_TEXT = re.compile("[\x00\ud800-\udfff]")


def _check_text(text: str, line: int, col: int, problems: list[tuple[int, int, str]]) -> str:
    """``text`` itself, or (with a problem recorded) a printable stand-in if it holds a NUL or a lone surrogate."""
    found = _NOT_TEXT.search(text)
    if found is None:
        return text
    char = found.group()
    if char == "\x00":
        what = "a NUL character (written '\\0' or '\\x00')"
    else:
        what = f"a lone surrogate ('\\u{ord(char):04x}', half of a UTF-16 pair, not a character)"
    problems.append(
        (
            line,
            col,
            f"this text holds {what}; text must be Unicode characters other than NUL: "
            "remove it, or write the character you meant itself",
        )
    )
    return _NOT_TEXT.sub("\ufffd", text)


def _build(node: Node, path: Path_, doc: YamlDoc, problems: list[tuple[int, int, str]]) -> Any:
    """Turn a composed node into plain data, recording positions and collecting problems."""
    line, col = node.start_mark.line + 1, node.start_mark.column + 1
    doc.marks[path] = (line, col)
    if isinstance(node, MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            kline, kcol = key_node.start_mark.line + 1, key_node.start_mark.column + 1
            if not isinstance(key_node, ScalarNode):
                problems.append((kline, kcol, "a mapping key must be a plain word, not a list or mapping"))
                continue
            key = _check_text(key_node.value, kline, kcol, problems)
            if key == "<<" and key_node.style is None:
                problems.append((kline, kcol, "YAML merge keys ('<<') are not allowed; write the keys out"))
                continue
            if key in out:
                first = doc.key_marks.get((*path, key), (0, 0))
                problems.append(
                    (
                        kline,
                        kcol,
                        f"duplicate key '{key}' (first set at line {first[0]}); each key may appear once",
                    )
                )
                continue
            doc.key_marks[(*path, key)] = (kline, kcol)
            out[key] = _build(value_node, (*path, key), doc, problems)
        return out
    if isinstance(node, SequenceNode):
        return [_build(item, (*path, i), doc, problems) for i, item in enumerate(node.value)]
    assert isinstance(node, ScalarNode)
    if node.style is not None:
        return _check_text(node.value, line, col, problems)  # quoted or block text: always a string
    return resolve_plain(node.value)
