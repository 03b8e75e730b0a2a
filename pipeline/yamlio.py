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

Every problem found is collected as a :class:`Problem`; :class:`SceneError` carries all of them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.events import AliasEvent, ScalarEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import BaseResolver

try:  # libyaml, when PyYAML was built with it (the usual wheels are)
    from yaml.cyaml import CParser
except ImportError:  # pragma: no cover - depends on how PyYAML was built
    CParser = None

Path_ = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a scene file, at a 1-based line and column."""

    file: str
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}: {self.message}"


class SceneError(Exception):
    """A scene file is invalid; carries every problem found, in file order."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = sorted(problems, key=lambda p: (p.file, p.line, p.col))
        super().__init__("\n".join(str(p) for p in self.problems))


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


# A Deforum schedule, '0: (7.5), 30: (9)': frame numbers with values in parentheses.
DEFORUM_SCHEDULE = re.compile(r"^\s*-?\d+(?:\.\d+)?\s*:\s*\(")


def deforum_hint(name: str = "guidance") -> str:
    """What to write instead of a Deforum schedule for the value ``name``."""
    return (
        "this looks like a Deforum schedule ('0: (7.5), 30: (9)'); here each keyframe sets one value: "
        f"keyframes: [{{frame: 0, {name}: <value at 0>}}, {{frame: 30, {name}: <value at 30>}}]"
    )


def syntax_problem(exc: yaml.MarkedYAMLError, text: str, file: str) -> Problem:
    """A YAML syntax error in the words of someone who writes scenes, at the line that causes it.

    The parser reports where it got stuck, which is often a line after the mistake and in its own
    terms ("expected <block end>, but found '?'"). The usual mistakes (a line indented wrong, a
    quote or bracket never closed, ': ' inside a value, a tab) are recognised and told plainly;
    anything else keeps the parser's words.
    """
    lines = text.split("\n")
    problem, context = str(exc.problem or ""), str(exc.context or "")
    mark = exc.problem_mark or exc.context_mark
    line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)

    def at(ln: int, cl: int, message: str) -> Problem:
        return Problem(file, ln, cl, f"YAML syntax error: {message}")

    def source(ln: int) -> str:
        return lines[ln - 1].rstrip("\r") if 0 < ln <= len(lines) else ""

    # 1. A quote or bracket that opens and never closes: the parser reaches the end of the file.
    opened = exc.context_mark
    if opened is not None and "end of stream" in problem:
        ln, cl = opened.line + 1, opened.column + 1
        char = source(ln)[cl - 1 : cl] or "'"
        if "quoted scalar" in context:
            return at(ln, cl, f"the quote ({char}) opened here is never closed; close it on this line")
        if "flow" in context:
            closing = "]" if char == "[" else "}"
            return at(ln, cl, f"the '{char}' opened here is never closed; close it with '{closing}'")
    # 2. A quote closed only on a later line (a quoted value may span lines), so the text after the
    #    quote that was meant to open the next value is what the parser stumbles on.
    quote = _quote_closing_on(text, line)
    if quote is not None:
        (ln, cl), char = quote
        return at(
            ln,
            cl,
            f"the quote ({char}) opened here is only closed on line {line} (a quoted value may span lines); "
            "close it on this line",
        )
    # 3. An unclosed bracket that the next line runs into.
    if opened is not None and context.startswith("while parsing a flow") and "expected ','" in problem:
        ln, cl = opened.line + 1, opened.column + 1
        char = source(ln)[cl - 1 : cl] or "["
        closing = "]" if char == "[" else "}"
        return at(
            ln,
            cl,
            f"the '{char}' opened here is not closed before line {line}; close it with '{closing}' "
            "(items inside are separated by ', ')",
        )
    here = source(line)
    if "found character '\\t'" in problem or "found character '\t'" in problem:
        return at(line, col, "a tab is used to indent this line; YAML indents with spaces only")
    if "expected a single document" in context + problem:
        return at(
            line, col, "a second YAML document starts here; a scene file holds one document (remove '---')"
        )
    # YAML limits a plain key to 1024 characters; past that its ':' is not seen as a key's.
    long_key = re.match(r" *(?:- )?([^:#]{1025,}):(?: |$)", here)
    if long_key and ("mapping values" in problem or "could not find expected ':'" in problem):
        return at(
            line,
            long_key.start(1) + 1,
            f"this key is {len(long_key.group(1))} characters long; YAML allows at most 1024",
        )
    # 4. ': ' where no key can start: inside a value, or a key indented deeper than the line above.
    if "mapping values are not allowed here" in problem:
        indent = len(here) - len(here.lstrip(" "))
        first_colon = here.find(": ", indent)
        if 0 <= first_colon < col - 1 and first_colon + 2 < col - 1:
            value = here[first_colon + 2 :].strip()
            if DEFORUM_SCHEDULE.match(value):
                name = here[indent:first_colon].strip().removeprefix("- ").strip()
                return at(line, first_colon + 3, deforum_hint(name if name.isidentifier() else "guidance"))
            return at(
                line,
                first_colon + 3,
                "this value holds ': ' (a colon and a space), which YAML reads as a new key; "
                f'put the value in quotes: "{_shorten(value, 40)}"',
            )
        return at(*_indent_message(lines, line, deeper=True))
    # 5. A line that lines up with nothing above it.
    if "expected <block end>" in problem and _KEY_OR_ITEM.match(here):
        return at(*_indent_message(lines, line, deeper=False))
    if "expected <block end>" in problem:
        return at(
            line,
            col,
            f"unexpected '{_shorten(here.strip(), 30)}' here; each line holds a 'key: value' or a "
            "'- item', lined up with the lines above it",
        )
    # 6. A line of text with no ':' among keys.
    if "could not find expected ':'" in problem and exc.context_mark is not None:
        ln, cl = exc.context_mark.line + 1, exc.context_mark.column + 1
        return at(
            ln,
            cl,
            f"'{_shorten(source(ln).strip(), 30)}' has no ':' after its key; write 'key: value' "
            "(or, if it continues the text above, put that text in quotes)",
        )
    # 7. A Windows path in double quotes: '\d' is no escape.
    if "unknown escape character" in problem:
        return at(
            line,
            col,
            "in double quotes a backslash starts an escape like \\n, and this one is not an escape; "
            "use single quotes for text with backslashes, or '/' in paths",
        )
    what = " ".join(x for x in (context, problem) if x)
    return at(line, col, what)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quote_closing_on(text: str, line: int) -> tuple[tuple[int, int], str] | None:
    """The start and quote character of a quoted value that spans lines and ends on ``line``."""
    found = None
    try:
        for token in yaml.scan(text, Loader=yaml.SafeLoader):
            if token.start_mark.line + 1 > line:
                break
            if (
                isinstance(token, yaml.ScalarToken)
                and token.style in ('"', "'")
                and token.start_mark.line + 1 < line
                and token.end_mark.line + 1 == line
            ):
                found = ((token.start_mark.line + 1, token.start_mark.column + 1), token.style)
    except yaml.YAMLError:
        pass
    return found


# A line that is a mapping key or a list item: "  prompt: a dog", "- frame: 0", '"my key": 1'.
_KEY_OR_ITEM = re.compile(r"^ *(?:- |-$|[\w\"'][^:#]*:(?: |$))")


def _spaces(n: int) -> str:
    return "1 space" if n == 1 else f"{n} spaces"


def _indent_message(lines: list[str], line: int, *, deeper: bool) -> tuple[int, int, str]:
    """Where and how line ``line`` is indented wrong, and which lines above could line up with it.

    ``deeper``: the line is a key indented deeper than a line above that cannot hold it; a typo on
    that line ('-frame: 0', 'frame:0' are text, not keys) is the likelier cause, reported there.
    """
    here = lines[line - 1].rstrip("\r")
    indent = len(here) - len(here.lstrip(" "))
    is_item = here.lstrip(" ").startswith("- ")
    word = _shorten(here.strip().removeprefix("- ").split(":")[0].strip(), 30)
    # Keys and list dashes that a line here could line up with: for each line above, the column of
    # its first key and of its dash, only ever moving left (to outer levels), as YAML nests.
    options: list[tuple[int, int, str]] = []  # (indent, line, key or "- ")
    limit = 10**9
    for n in range(line - 1, 0, -1):
        above = lines[n - 1].rstrip("\r")
        stripped = above.lstrip(" ")
        if not stripped or stripped.startswith("#"):
            continue
        col = len(above) - len(stripped)
        if deeper:
            typo = _typo(stripped)
            if typo is not None:
                return (n, col + typo[0] + 1, typo[1])
            key = _shorten(stripped.removeprefix("- ").split(":")[0].strip(), 30)
            key_indent = col + (2 if stripped.startswith("- ") else 0)
            if ":" not in stripped:
                return (
                    n,
                    col + 1,
                    f"'{_shorten(stripped, 30)}' has no ':' after its key; write 'key: value' "
                    "(or, if it continues the text above, put that text in quotes)",
                )
            if indent <= key_indent:
                return (
                    line,
                    indent + 1,
                    f"'{word}' cannot start a key here: it continues the value of line {n}; "
                    f"end that value on its line, or put it in quotes",
                )
            return (
                line,
                indent + 1,
                f"'{word}' is indented {_spaces(indent)}, deeper than '{key}' on line {n} "
                f"({_spaces(key_indent)}), which already has a value; keys of one mapping must line up: "
                f"indent it {_spaces(key_indent)}",
            )
        entries = []
        if stripped.startswith("- "):
            entries.append((col, "- "))
            rest = stripped[2:].lstrip(" ")
            if ":" in rest:
                entries.append((len(above) - len(rest), rest.split(":")[0].strip()))
        elif ":" in stripped:
            entries.append((col, stripped.split(":")[0].strip()))
        for c, name in entries:
            if c < limit and c != indent and (name == "- ") == is_item:
                options.append((c, n, name))
        if entries:
            limit = min(limit, *(c for c, _ in entries))
        if col == 0:
            break
    what = "this list item" if is_item else f"'{word}'"
    if not options:
        return (
            line,
            indent + 1,
            f"{what} is indented {_spaces(indent)}, which lines up with nothing above it",
        )
    like = " or ".join(
        f"{_spaces(c)} (like {'the item' if name == '- ' else repr(_shorten(name, 30))} on line {n})"
        for c, n, name in options[:3]
    )
    group = "list items" if is_item else "keys of one mapping"
    return (line, indent + 1, f"{what} is indented {_spaces(indent)}; {group} must line up: indent it {like}")


def _typo(stripped: str) -> tuple[int, str] | None:
    """A typo that makes a line text instead of a key ('-frame: 0', 'frame:0'): (column offset, message)."""
    if re.match(r"-[^\s-]", stripped):
        return (0, f"a list item needs a space after '-': write '- {_shorten(stripped[1:].strip(), 40)}'")
    m = re.search(r"\w:[^\s/]", stripped)
    if m and ": " not in stripped and not stripped.endswith(":"):
        text = _shorten(stripped.removeprefix("- "), 40)
        return (m.start() + 2, f"a key needs a space after ':'; '{text}' is read as text, not as a key")
    return None


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
