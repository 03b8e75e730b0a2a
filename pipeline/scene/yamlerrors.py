"""YAML syntax errors in the words of someone who writes scenes, at the line that causes them.

PyYAML reports where its parser got stuck, often a line after the mistake, in its own terms
("expected <block end>, but found '<block mapping start>'"). :func:`syntax_problem` recognises the
usual mistakes and says them plainly::

    size: [64, 64
    steps: 8         # s.yaml:1:7: YAML syntax error: the '[' opened here is not closed before line 2; ...

Also here: how a Deforum schedule ('0: (7.5), 30: (9)') is recognised where it cannot go (inside a
keyframe, unquoted with ': ' in it, under Deforum's own name) and what to write instead, used both
for syntax errors and for values of the wrong type (``pipeline.scene.messages``).
"""

from __future__ import annotations

import re

import yaml

from pipeline.scene.problems import Problem, shorten

# A Deforum schedule, '0: (7.5), 30: (9)': frame numbers with values in parentheses.
DEFORUM_SCHEDULE = re.compile(r"^\s*-?\d+(?:\.\d+)?\s*:\s*\(")


# The values that take a schedule string at the top level (``pipeline.scene.scheduled.SCHEDULABLE``).
SCHEDULE_VALUES: tuple[str, ...] = ("guidance", "strength", "zoom", "angle", "translate_x", "translate_y")
# Deforum's and Parseq's names of those values.
DEFORUM_NAMES: dict[str, str] = {
    "strength_schedule": "strength",
    "cfg_scale_schedule": "guidance",
    "scale": "guidance",
    "translation_x": "translate_x",
    "translation_y": "translate_y",
}


def deforum_hint(name: str = "guidance", *, where: str = "keyframe") -> str:
    """What to write instead of a Deforum schedule for the value ``name`` that cannot be one there.

    ``where``: ``keyframe`` (a schedule inside a keyframe), ``top`` (a top-level value that takes
    no schedule), ``unquoted`` (a schedule whose ': ' YAML reads as a key).
    """
    example = f'{name}: "0: (7.5), 30: (9)"' if name in SCHEDULE_VALUES else 'guidance: "0: (7.5), 30: (9)"'
    if where == "unquoted":
        return f"this looks like a Deforum schedule; YAML reads ': ' in it as a new key: put it in quotes: {example}"
    if where == "top":
        return (
            f"this looks like a Deforum schedule; '{name}' takes none (schedules are for "
            f"{', '.join(SCHEDULE_VALUES)} and a LoRA's scale)"
        )
    return (
        f"this looks like a Deforum schedule; a schedule is written at the top level, in quotes "
        f"({example}), and a keyframe sets one number"
    )


def deforum_name_hint(key: str) -> str | None:
    """Deforum's name of a value (``strength_schedule``, ``translation_x``): what it is called here."""
    ours = DEFORUM_NAMES.get(key) or (key.removesuffix("_schedule") if key.endswith("_schedule") else None)
    if ours not in SCHEDULE_VALUES:
        return (
            "this looks like a Deforum schedule; schedules are given for " + ", ".join(SCHEDULE_VALUES)
            if ours
            else None
        )
    note = (
        " (Deforum's strength is 1 minus this one, which is how much a frame changes; "
        "render.py import converts a settings file)"
        if ours == "strength"
        else ""
    )
    return f"Deforum's '{key}' is '{ours}' here: {ours}: \"0: (0.65), 24: (0.5)\"{note}"


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
                return at(
                    line,
                    first_colon + 3,
                    deforum_hint(name if name.isidentifier() else "guidance", where="unquoted"),
                )
            return at(
                line,
                first_colon + 3,
                "this value holds ': ' (a colon and a space), which YAML reads as a new key; "
                f'put the value in quotes: "{shorten(value, 40)}"',
            )
        return at(*_indent_message(lines, line, deeper=True))
    # 5. A line that lines up with nothing above it.
    if "expected <block end>" in problem and _KEY_OR_ITEM.match(here):
        return at(*_indent_message(lines, line, deeper=False))
    if "expected <block end>" in problem:
        return at(
            line,
            col,
            f"unexpected '{shorten(here.strip(), 30)}' here; each line holds a 'key: value' or a "
            "'- item', lined up with the lines above it",
        )
    # 6. A line of text with no ':' among keys.
    if "could not find expected ':'" in problem and exc.context_mark is not None:
        ln, cl = exc.context_mark.line + 1, exc.context_mark.column + 1
        return at(
            ln,
            cl,
            f"'{shorten(source(ln).strip(), 30)}' has no ':' after its key; write 'key: value' "
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
    word = shorten(here.strip().removeprefix("- ").split(":")[0].strip(), 30)
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
            key = shorten(stripped.removeprefix("- ").split(":")[0].strip(), 30)
            key_indent = col + (2 if stripped.startswith("- ") else 0)
            if ":" not in stripped:
                return (
                    n,
                    col + 1,
                    f"'{shorten(stripped, 30)}' has no ':' after its key; write 'key: value' "
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
        f"{_spaces(c)} (like {'the item' if name == '- ' else repr(shorten(name, 30))} on line {n})"
        for c, n, name in options[:3]
    )
    group = "list items" if is_item else "keys of one mapping"
    return (line, indent + 1, f"{what} is indented {_spaces(indent)}; {group} must line up: indent it {like}")


def _typo(stripped: str) -> tuple[int, str] | None:
    """A typo that makes a line text instead of a key ('-frame: 0', 'frame:0'): (column offset, message)."""
    if re.match(r"-[^\s-]", stripped):
        return (0, f"a list item needs a space after '-': write '- {shorten(stripped[1:].strip(), 40)}'")
    m = re.search(r"\w:[^\s/]", stripped)
    if m and ": " not in stripped and not stripped.endswith(":"):
        text = shorten(stripped.removeprefix("- "), 40)
        return (m.start() + 2, f"a key needs a space after ':'; '{text}' is read as text, not as a key")
    return None
