"""Located problems: what is wrong with a scene file, where, in one line of plain words.

Every check of a scene (YAML syntax, types, the scene rules, the model's abilities) reports a
:class:`Problem` at a 1-based line and column; :class:`SceneError` carries all of them at once::

    raise SceneError([Problem("s.yaml", 3, 7, "steps: expected a whole number, got the text 'ten'")])
    # s.yaml:3:7: steps: expected a whole number, got the text 'ten'

The lowest layer of ``pipeline.scene``: it imports nothing of the project.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Characters that would break a problem's one line: control characters (a "\\n" in a quoted value is
# a real newline) and the Unicode line and paragraph separators that str.splitlines() splits at.
_LINE_BREAKING = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """``text`` with every control character written as its escape (a newline as '\\n')."""
    return _LINE_BREAKING.sub(lambda m: repr(m.group())[1:-1], text)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a scene file, at a 1-based line and column; always one line of text."""

    file: str
    line: int
    col: int
    message: str

    def __post_init__(self) -> None:
        # A value quoted in a message may hold a newline ("a\\nb.gif"); the message stays one line.
        if _LINE_BREAKING.search(self.message):
            object.__setattr__(self, "message", one_line(self.message))

    def __str__(self) -> str:
        return f"{one_line(self.file)}:{self.line}:{self.col}: {self.message}"


class SceneError(Exception):
    """A scene file is invalid; carries every problem found, in file order."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = sorted(problems, key=lambda p: (p.file, p.line, p.col))
        super().__init__("\n".join(str(p) for p in self.problems))


def shorten(text: str, limit: int = 60) -> str:
    """``text``, or its start and its length when it is long: a 5,000-digit "number" is one line, not a page."""
    return text if len(text) <= limit else f"{text[: max(limit - 20, 10)]}... ({len(text)} characters)"


def describe(value: Any) -> str:
    """A value as a problem names it: 'the number 5', "the text 'ten'", 'a list'."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {shorten(str(value))}"
    if isinstance(value, str):
        return f"the text '{shorten(value)}'"
    if value is None:
        return "nothing (null)"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return repr(value)
