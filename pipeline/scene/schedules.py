"""Deforum schedule strings (``"0:(7.5), 30:(9)"``) and the safe arithmetic allowed inside them.

A schedule gives a value at some frames; a point may be a formula of the frame ``t``, as Deforum
allows (``0:(1.0 + 0.02*sin(2*pi*t/24))``). Scene loading turns a schedule into keyframes of that
value's track (``pipeline.scene.scheduled``), so the planner only ever sees keyframes::

    points = parse_schedule("0:(7.5), 30:(9 + sin(t))")     # ScheduleError(offset, message) if malformed
    schedule_values(points, total=48, names={"max_f": 47, "s": 0})
    # -> [(0, 7.5), (30, 9.0), (31, 9.841...), ..., (47, ...)]

As in Deforum, a point whose value is a plain number is one keyframe (values between points are
linear); a point with a formula is evaluated at every frame from its frame up to the next point (or
the end of the scene). Formulas are parsed with :mod:`ast` and compiled into closures that know only
numbers, ``t``, ``max_f`` (the last frame), ``s`` (the scene's seed), ``pi``, ``e``, the operators
``+ - * / % **`` and a fixed set of functions: nothing is ever passed to ``eval``. Every number is a
float, so ``9**9**9`` overflows at once instead of building a huge integer; length and nesting are
bounded, and a division by zero, a domain error or a result that is not finite is a located error.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

# Bounds that keep hostile input cheap: a schedule and a formula of bounded size and depth.
MAX_SCHEDULE_CHARS = 100_000
MAX_EXPRESSION_CHARS = 1_000
MAX_DEPTH = 32

# A schedule starts with a frame number and a colon (Deforum writes '0: (7.5)' or '0:(7.5)').
_STARTS_LIKE = re.compile(r"^\s*-?\d+\s*:")
_NUMBER = re.compile(r"^\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*$")

Fn = Callable[[float], float]


def _min(*args: float) -> float:
    return min(args)


def _max(*args: float) -> float:
    return max(args)


# name -> (function, smallest and largest number of arguments). numexpr's names (Deforum evaluates
# schedules with numexpr) are aliases of Python's.
FUNCTIONS: dict[str, tuple[Callable[..., float], int, int]] = {
    "sin": (math.sin, 1, 1),
    "cos": (math.cos, 1, 1),
    "tan": (math.tan, 1, 1),
    "asin": (math.asin, 1, 1),
    "acos": (math.acos, 1, 1),
    "atan": (math.atan, 1, 1),
    "arcsin": (math.asin, 1, 1),
    "arccos": (math.acos, 1, 1),
    "arctan": (math.atan, 1, 1),
    "atan2": (math.atan2, 2, 2),
    "arctan2": (math.atan2, 2, 2),
    "sinh": (math.sinh, 1, 1),
    "cosh": (math.cosh, 1, 1),
    "tanh": (math.tanh, 1, 1),
    "abs": (abs, 1, 1),
    "sqrt": (math.sqrt, 1, 1),
    "exp": (math.exp, 1, 1),
    "log": (math.log, 1, 1),
    "log10": (math.log10, 1, 1),
    "floor": (lambda x: float(math.floor(x)), 1, 1),
    "ceil": (lambda x: float(math.ceil(x)), 1, 1),
    "min": (_min, 1, 16),
    "max": (_max, 1, 16),
}
CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e}
# Names whose value comes from the scene: the frame, the last frame, the seed.
VARIABLES: tuple[str, ...] = ("t", "max_f", "s")


class ScheduleError(ValueError):
    """A malformed schedule or formula: ``offset`` is the index in the schedule string it is about."""

    def __init__(self, offset: int, message: str):
        super().__init__(message)
        self.offset = offset
        self.message = message


@dataclass(frozen=True)
class Point:
    """One ``frame: (value)`` of a schedule."""

    frame: int
    frame_offset: int  # where the frame number starts in the schedule string
    text: str  # the value as written, between the parentheses
    offset: int  # where ``text`` starts in the schedule string
    number: float | None  # the value, when it is a plain number (one keyframe)
    fn: Fn | None  # the compiled formula otherwise (evaluated at every frame of its span)
    uses_t: bool


def looks_like_schedule(text: str) -> bool:
    """Whether a text value is meant as a schedule: it starts with a frame number and a colon."""
    return bool(_STARTS_LIKE.match(text))


def parse_schedule(text: str, *, names: Mapping[str, float] | None = None) -> list[Point]:
    """The points of a schedule, in increasing frame order; :class:`ScheduleError` if malformed.

    ``names``: the values of ``max_f`` and ``s`` (formulas that use them before they are known
    compile anyway; their values are read when evaluated).
    """
    if len(text) > MAX_SCHEDULE_CHARS:
        raise ScheduleError(0, f"the schedule is {len(text)} characters long; at most {MAX_SCHEDULE_CHARS}")
    points: list[Point] = []
    i, n = 0, len(text)

    def skip_space(j: int) -> int:
        while j < n and text[j].isspace():
            j += 1
        return j

    while True:
        i = skip_space(i)
        m = re.compile(r"-?\d+(?:\.\d*)?").match(text, i)
        if m is None:
            what = f"'{text[i]}'" if i < n else "the end"
            raise ScheduleError(
                i, f"expected a frame number, found {what}; write points like 0:(7.5), 30:(9)"
            )
        if "." in m.group() or m.group().startswith("-"):
            raise ScheduleError(i, f"frame {m.group()} is not a frame; frames are whole numbers from 0")
        if len(m.group()) > 12:
            raise ScheduleError(i, f"frame {m.group()[:12]}... is too large; write a frame of the scene")
        frame = int(m.group())
        i = skip_space(m.end())
        if i >= n or text[i] != ":":
            raise ScheduleError(i, f"expected ':' after frame {m.group()}; write {m.group()}:(value)")
        i = skip_space(i + 1)
        if i >= n or text[i] != "(":
            raise ScheduleError(
                i, f"expected '(' after '{m.group()}:'; the value goes in parentheses: {m.group()}:(value)"
            )
        open_at, depth, j = i, 0, i
        while j < n:
            if text[j] == "(":
                depth += 1
            elif text[j] == ")":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        if j >= n:
            raise ScheduleError(open_at, "the '(' opened here is never closed; close it with ')'")
        body = text[open_at + 1 : j]
        if points and frame <= points[-1].frame:
            word = "repeats" if frame == points[-1].frame else "comes after"
            raise ScheduleError(
                m.start(),
                f"frame {frame} {word} frame {points[-1].frame}; points must be in increasing frame order",
            )
        points.append(_point(frame, m.start(), body, open_at + 1, names or {}))
        i = skip_space(j + 1)
        if i >= n:
            return points
        if text[i] != ",":
            raise ScheduleError(
                i, f"expected ',' or the end after the point at frame {frame}, found '{text[i]}'"
            )
        i += 1
        if skip_space(i) >= n:
            return points  # a trailing comma, as Deforum accepts


def _point(frame: int, frame_offset: int, body: str, offset: int, names: Mapping[str, float]) -> Point:
    if not body.strip():
        raise ScheduleError(offset, f"the value at frame {frame} is empty; write a number or a formula of t")
    if _NUMBER.match(body):
        value = float(body)
        if not math.isfinite(value):
            raise ScheduleError(offset, f"the value at frame {frame} is not a finite number")
        return Point(frame, frame_offset, body, offset, value, None, False)
    fn, uses_t = compile_expression(body, offset, names)
    return Point(frame, frame_offset, body, offset, None, fn, uses_t)


def compile_expression(
    text: str, offset: int = 0, names: Mapping[str, float] | None = None
) -> tuple[Fn, bool]:
    """A formula as a function of the frame ``t``, and whether it uses ``t``; :class:`ScheduleError` if refused."""
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ScheduleError(
            offset, f"the formula is {len(text)} characters long; at most {MAX_EXPRESSION_CHARS}"
        )
    # One line: the parser's columns are then offsets into the formula.
    flat = text.replace("\r", " ").replace("\n", " ").replace("\t", " ")
    try:
        # In parentheses: leading spaces are then no indentation error; columns move by one.
        tree = ast.parse(f"({flat})", mode="eval")
    except SyntaxError as exc:
        col = max(0, min(len(flat), (exc.offset or 1) - 2))
        raise ScheduleError(
            offset + col,
            f"not a formula ({exc.msg}); allowed: numbers, t, + - * / % **, "
            f"parentheses and {', '.join(sorted(FUNCTIONS))}",
        ) from None
    except (RecursionError, MemoryError, ValueError):
        raise ScheduleError(offset, f"the formula is nested too deeply; at most {MAX_DEPTH} levels") from None
    env = {**CONSTANTS, **{k: float(v) for k, v in (names or {}).items()}}
    uses: set[str] = set()
    fn = _compile(tree.body, offset - 1, 0, env, uses)
    return fn, "t" in uses


def _compile(node: ast.AST, offset: int, depth: int, env: Mapping[str, float], uses: set[str]) -> Fn:
    """A closure computing ``node`` from t; only the nodes listed here are allowed."""
    at = offset + getattr(node, "col_offset", 0)
    if depth > MAX_DEPTH:
        raise ScheduleError(at, f"the formula is nested too deeply; at most {MAX_DEPTH} levels")
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise ScheduleError(at, f"{node.value!r} is not a number; formulas hold numbers only")
        try:
            value = float(node.value)
        except OverflowError:
            raise ScheduleError(at, "this number is too large") from None
        if not math.isfinite(value):
            raise ScheduleError(at, "this number is too large")
        return lambda t: value
    if isinstance(node, ast.Name):
        name = node.id
        if name == "t":
            uses.add("t")
            return lambda t: t
        if name in env:
            value = env[name]
            return lambda t: value
        if name in VARIABLES:  # max_f or s, not known here (a formula checked on its own)
            return lambda t: 0.0
        raise ScheduleError(
            at,
            f"unknown name '{name[:40]}'; allowed: t, max_f, s, pi, e and the functions {', '.join(sorted(FUNCTIONS))}",
        )
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _compile(node.operand, offset, depth + 1, env, uses)
        if isinstance(node.op, ast.USub):
            return lambda t: -inner(t)
        return inner
    if isinstance(node, ast.BinOp) and isinstance(
        node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Mod, ast.Pow)
    ):
        a = _compile(node.left, offset, depth + 1, env, uses)
        b = _compile(node.right, offset, depth + 1, env, uses)
        return _binop(node.op, a, b, at)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        name = node.func.id
        if name not in FUNCTIONS:
            raise ScheduleError(
                at, f"unknown function '{name[:40]}'; allowed: {', '.join(sorted(FUNCTIONS))}"
            )
        func, least, most = FUNCTIONS[name]
        if not least <= len(node.args) <= most or any(isinstance(a, ast.Starred) for a in node.args):
            count = str(least) if least == most else f"{least} to {most}"
            raise ScheduleError(
                at, f"{name}() takes {count} argument{'s' if most > 1 else ''}, got {len(node.args)}"
            )
        args = [_compile(a, offset, depth + 1, env, uses) for a in node.args]
        return _call(name, func, args, at)
    what = {
        ast.Compare: "comparisons",
        ast.BoolOp: "and/or",
        ast.Attribute: "attributes",
        ast.Subscript: "indexing",
        ast.Lambda: "lambda",
        ast.IfExp: "if/else",
    }.get(type(node), type(node).__name__)
    if isinstance(node, ast.BinOp):
        what = "the operator " + type(node.op).__name__
    raise ScheduleError(
        at, f"{what} not allowed in a formula; allowed: numbers, t, + - * / % **, parentheses and functions"
    )


class EvalError(ValueError):
    """A formula failed at a frame: ``offset`` is where in the schedule the failing operation is."""

    def __init__(self, offset: int, message: str):
        super().__init__(message)
        self.offset = offset
        self.message = message


def _binop(op: ast.operator, a: Fn, b: Fn, at: int) -> Fn:
    if isinstance(op, ast.Add):
        return lambda t: a(t) + b(t)
    if isinstance(op, ast.Sub):
        return lambda t: a(t) - b(t)
    if isinstance(op, ast.Mult):
        return lambda t: a(t) * b(t)

    def checked(t: float) -> float:
        x, y = a(t), b(t)
        try:
            if isinstance(op, ast.Div):
                return x / y
            if isinstance(op, ast.Mod):
                return math.fmod(x, y) if y else x / y  # '/' raises the ZeroDivisionError
            return math.pow(x, y)  # floats only: never a huge integer, never a complex number
        except ZeroDivisionError:
            raise EvalError(at, "division by zero") from None
        except OverflowError:
            raise EvalError(at, "the result is too large") from None
        except ValueError:
            raise EvalError(at, f"{x:g} ** {y:g} is not a real number") from None

    return checked


def _call(name: str, func: Callable[..., float], args: list[Fn], at: int) -> Fn:
    def call(t: float) -> float:
        values = [f(t) for f in args]
        try:
            return float(func(*values))
        except OverflowError:
            raise EvalError(at, f"{name}() of {', '.join(f'{v:g}' for v in values)} is too large") from None
        except (ValueError, ZeroDivisionError):
            raise EvalError(
                at, f"{name}() is not defined for {', '.join(f'{v:g}' for v in values)}"
            ) from None

    return call


def schedule_values(
    points: list[Point], total: int, *, names: Mapping[str, float] | None = None
) -> list[tuple[int, float, Point]]:
    """Frame, value and point of every keyframe a schedule makes in a scene of ``total`` frames.

    A plain number is one keyframe. A formula is evaluated at every frame from its point up to the
    next point (or the last frame); one that does not use ``t`` is constant there, which two
    keyframes of its value say as exactly (values between two equal keyframes are that value).
    :class:`EvalError` (with the point's ``offset``) if a formula fails or is not finite.
    """
    names = dict(names or {})
    out: list[tuple[int, float, Point]] = []
    for k, p in enumerate(points):
        if p.number is not None:
            out.append((p.frame, p.number, p))
            continue
        assert p.fn is not None
        fn = p.fn
        if names:  # formulas were compiled before max_f was known: compile again with it
            fn, _ = compile_expression(p.text, p.offset, names)
        end = min(points[k + 1].frame if k + 1 < len(points) else total, total)
        frames = range(p.frame, end) if p.uses_t else sorted({p.frame, max(p.frame, end - 1)})
        for frame in frames:
            try:
                value = fn(float(frame))
            except EvalError as exc:
                raise EvalError(exc.offset, f"{exc.message} at frame {frame} (t = {frame})") from None
            except (OverflowError, RecursionError):
                raise EvalError(p.offset, f"the result is too large at frame {frame}") from None
            if not math.isfinite(value):
                raise EvalError(
                    p.offset, f"the formula gives {value} at frame {frame}; values must be finite"
                )
            out.append((frame, value, p))
    return out
