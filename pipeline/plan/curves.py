"""Easing curves: how a keyframed value moves from one keyframe to the next.

A curve maps normalised time ``u`` in [0, 1] (0 at the previous keyframe, 1 at the next)
to an interpolation weight. The named curves are the full easings.net set plus ``step``/``hold``;
``cubic_bezier(x1, y1, x2, y2)`` behaves like the CSS timing function of the same name.
Scene files refer to curves by string, so ``parse_curve`` is the entry point::

    from pipeline.plan.curves import ease, parse_curve
    parse_curve("ease_in_out_cubic")(0.25)        # 0.0625
    ease("cubic_bezier(0.42, 0, 0.58, 1)", 0.5)   # 0.5

Every curve clamps its input to [0, 1] and returns exactly 0.0 and 1.0 at the ends, so a value
sits exactly on its keyframe there. In between, ``back`` and ``elastic`` overshoot on purpose.

This module is pure standard library: the planner imports it without pulling in numpy or torch.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from collections.abc import Callable

__all__ = [
    "CURVES",
    "Curve",
    "cubic_bezier",
    "curve_names",
    "ease",
    "parse_curve",
]

Curve = Callable[[float], float]

_BEZIER_SIGNATURE = "cubic_bezier(x1, y1, x2, y2)"


def _curve(formula: Callable[[float], float], name: str) -> Curve:
    """Turn a formula that is only trusted on the open interval (0, 1) into a public curve."""

    def curve(u: float) -> float:
        # NaN fails every comparison, so it would slip past the clamp and poison a whole frame.
        if u != u:
            raise ValueError(f"{name}: curve input must be a number, got nan")
        # The formulas are not exact at the ends (and expo is not even continuous there);
        # returning literals guarantees a value lands exactly on its keyframe.
        if u <= 0.0:
            return 0.0
        if u >= 1.0:
            return 1.0
        return formula(u)

    curve.__name__ = curve.__qualname__ = name
    curve.__doc__ = f"Easing curve {name!r}: [0, 1] -> weight, input clamped, exact endpoints."
    return curve


def _family(
    stem: str, ease_in: Callable[[float], float], in_out_base: Callable[[float], float] | None = None
) -> tuple[Curve, Curve, Curve]:
    """Build ease_in/ease_out/ease_in_out from one "in" formula.

    For the polynomial, sine, expo, circ and back curves the easings.net "out" formula is the
    point reflection of "in", and "in_out" is "in" squeezed into the first half plus its reflection
    in the second; deriving them keeps the three variants consistent by construction.
    """
    half = in_out_base or ease_in

    def ease_out(u: float) -> float:
        return 1.0 - ease_in(1.0 - u)

    def ease_in_out(u: float) -> float:
        if u < 0.5:
            return half(2.0 * u) / 2.0
        return 1.0 - half(2.0 - 2.0 * u) / 2.0

    return (
        _curve(ease_in, f"ease_in_{stem}"),
        _curve(ease_out, f"ease_out_{stem}"),
        _curve(ease_in_out, f"ease_in_out_{stem}"),
    )


# --- easings.net constants (kept under their easings.net names so the formulas can be checked) ---
_C1 = 1.70158
_C2 = _C1 * 1.525  # easeInOutBack overshoots more than in/out, hence its own constant
_C4 = 2.0 * math.pi / 3.0
_C5 = 2.0 * math.pi / 4.5
_N1 = 7.5625
_D1 = 2.75


def _back_in(c: float) -> Callable[[float], float]:
    return lambda u: (c + 1.0) * u * u * u - c * u * u


linear = _curve(lambda u: u, "linear")

ease_in_sine, ease_out_sine, ease_in_out_sine = _family("sine", lambda u: 1.0 - math.cos(u * math.pi / 2.0))
ease_in_quad, ease_out_quad, ease_in_out_quad = _family("quad", lambda u: u**2)
ease_in_cubic, ease_out_cubic, ease_in_out_cubic = _family("cubic", lambda u: u**3)
ease_in_quart, ease_out_quart, ease_in_out_quart = _family("quart", lambda u: u**4)
ease_in_quint, ease_out_quint, ease_in_out_quint = _family("quint", lambda u: u**5)
# Only ever evaluated on (0, 1]: the jump to exactly 0 at u == 0 is the wrapper's endpoint guard,
# which is precisely easings.net's `x === 0 ? 0 : ...` special case.
ease_in_expo, ease_out_expo, ease_in_out_expo = _family("expo", lambda u: 2.0 ** (10.0 * u - 10.0))
ease_in_circ, ease_out_circ, ease_in_out_circ = _family("circ", lambda u: 1.0 - math.sqrt(1.0 - u * u))
ease_in_back, ease_out_back, ease_in_out_back = _family("back", _back_in(_C1), in_out_base=_back_in(_C2))


# Elastic and bounce are written out as on easings.net: their in_out variants use a different
# period (elastic) or are defined from "out" (bounce), so they do not fit the _family pattern.
def _elastic_in(u: float) -> float:
    return -(2.0 ** (10.0 * u - 10.0)) * math.sin((u * 10.0 - 10.75) * _C4)


def _elastic_out(u: float) -> float:
    return 2.0 ** (-10.0 * u) * math.sin((u * 10.0 - 0.75) * _C4) + 1.0


def _elastic_in_out(u: float) -> float:
    if u < 0.5:
        return -(2.0 ** (20.0 * u - 10.0) * math.sin((20.0 * u - 11.125) * _C5)) / 2.0
    return (2.0 ** (-20.0 * u + 10.0) * math.sin((20.0 * u - 11.125) * _C5)) / 2.0 + 1.0


def _bounce_out(u: float) -> float:
    if u < 1.0 / _D1:
        return _N1 * u * u
    if u < 2.0 / _D1:
        u -= 1.5 / _D1
        return _N1 * u * u + 0.75
    if u < 2.5 / _D1:
        u -= 2.25 / _D1
        return _N1 * u * u + 0.9375
    u -= 2.625 / _D1
    return _N1 * u * u + 0.984375


def _bounce_in(u: float) -> float:
    return 1.0 - _bounce_out(1.0 - u)


def _bounce_in_out(u: float) -> float:
    if u < 0.5:
        return (1.0 - _bounce_out(1.0 - 2.0 * u)) / 2.0
    return (1.0 + _bounce_out(2.0 * u - 1.0)) / 2.0


ease_in_elastic = _curve(_elastic_in, "ease_in_elastic")
ease_out_elastic = _curve(_elastic_out, "ease_out_elastic")
ease_in_out_elastic = _curve(_elastic_in_out, "ease_in_out_elastic")
ease_in_bounce = _curve(_bounce_in, "ease_in_bounce")
ease_out_bounce = _curve(_bounce_out, "ease_out_bounce")
ease_in_out_bounce = _curve(_bounce_in_out, "ease_in_out_bounce")

# Strictly inside (0, 1) the value has not reached the next keyframe yet; the wrapper supplies
# the jump to 1.0 at u >= 1. Two names for one behaviour: "step" reads well for switches,
# "hold" for values that stay put until the next key.
step = _curve(lambda u: 0.0, "step")
hold = _curve(lambda u: 0.0, "hold")


CURVES: dict[str, Curve] = {
    c.__name__: c
    for c in (
        linear,
        step,
        hold,
        ease_in_sine,
        ease_out_sine,
        ease_in_out_sine,
        ease_in_quad,
        ease_out_quad,
        ease_in_out_quad,
        ease_in_cubic,
        ease_out_cubic,
        ease_in_out_cubic,
        ease_in_quart,
        ease_out_quart,
        ease_in_out_quart,
        ease_in_quint,
        ease_out_quint,
        ease_in_out_quint,
        ease_in_expo,
        ease_out_expo,
        ease_in_out_expo,
        ease_in_circ,
        ease_out_circ,
        ease_in_out_circ,
        ease_in_back,
        ease_out_back,
        ease_in_out_back,
        ease_in_elastic,
        ease_out_elastic,
        ease_in_out_elastic,
        ease_in_bounce,
        ease_out_bounce,
        ease_in_out_bounce,
    )
}


def _check_unit(name: str, value: float) -> None:
    # CSS rejects x outside [0, 1] because x(s) would stop being monotone and u -> s ambiguous.
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"cubic_bezier: {name}={value!r} must be in [0, 1] (it is a time coordinate)")


# CSS allows any y, but 3 * 1e308 is inf, and a weight of 1e300 turns any keyframed value into
# inf. A Bezier curve stays within the hull of its control points, so with |y| <= 100 every weight
# does too (CSS's own overshooting presets use y within [-0.6, 1.6]).
MAX_BEZIER_Y = 100.0


@functools.lru_cache(maxsize=256)
def cubic_bezier(x1: float, y1: float, x2: float, y2: float) -> Curve:
    """CSS ``cubic-bezier(x1, y1, x2, y2)``: control points P1=(x1, y1), P2=(x2, y2), ends fixed.

    x1 and x2 must lie in [0, 1]; y1 and y2 in [-100, 100] (outside [0, 1] overshoots).
    """
    _check_unit("x1", x1)
    _check_unit("x2", x2)
    for name, value in (("y1", y1), ("y2", y2)):
        if not -MAX_BEZIER_Y <= value <= MAX_BEZIER_Y:  # also refuses nan
            raise ValueError(
                f"cubic_bezier: {name}={value!r} must be a number from {-MAX_BEZIER_Y:g} to {MAX_BEZIER_Y:g}"
            )
    name = f"cubic_bezier({x1:g}, {y1:g}, {x2:g}, {y2:g})"

    # With P1 and P2 on the diagonal y(s) == x(s), so the curve is the identity; short-circuiting
    # makes it exactly linear rather than linear to within the solver's tolerance.
    if x1 == y1 and x2 == y2:
        return _curve(lambda u: u, name)

    # Power-basis coefficients: B(s) = ((a*s + b)*s + c)*s, cheaper and better conditioned to
    # evaluate with Horner than the Bernstein form.
    cx = 3.0 * x1
    bx = 3.0 * (x2 - x1) - cx
    ax = 1.0 - cx - bx
    cy = 3.0 * y1
    by = 3.0 * (y2 - y1) - cy
    ay = 1.0 - cy - by

    def x_of(s: float) -> float:
        return ((ax * s + bx) * s + cx) * s

    def dx_of(s: float) -> float:
        return (3.0 * ax * s + 2.0 * bx) * s + cx

    def solve(u: float) -> float:
        # Newton converges in a handful of steps almost everywhere, but stalls where x'(s) ~ 0
        # (e.g. x1 == 0 near s == 0); bisection is the slow but always-correct fallback,
        # valid because x(s) is monotone for x1, x2 in [0, 1].
        s = u
        for _ in range(8):
            err = x_of(s) - u
            if abs(err) < 1e-12:
                return s
            d = dx_of(s)
            if abs(d) < 1e-9:
                break
            s -= err / d
            if not 0.0 <= s <= 1.0:
                break
        lo, hi = 0.0, 1.0
        s = u
        for _ in range(100):
            err = x_of(s) - u
            if abs(err) < 1e-12:
                break
            if err < 0.0:
                lo = s
            else:
                hi = s
            s = (lo + hi) / 2.0
            if hi - lo < 1e-15:
                break
        return s

    def formula(u: float) -> float:
        s = solve(u)
        return ((ay * s + by) * s + cy) * s

    return _curve(formula, name)


def curve_names() -> list[str]:
    """Everything ``parse_curve`` accepts, for error messages and ``--help`` text."""
    return [*sorted(CURVES), _BEZIER_SIGNATURE]


_BEZIER_RE = re.compile(r"cubic_bezier\s*\((?P<args>.*)\)", re.DOTALL)
_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def _shown(spec: str) -> str:
    """``spec`` quoted for a message, cut short if long: a message is one readable line."""
    return repr(spec if len(spec) <= 60 else spec[:45] + "...")


def _allowed() -> str:
    return "allowed: " + ", ".join(curve_names())


def _parse_bezier(spec: str) -> Curve:
    match = _BEZIER_RE.fullmatch(spec)
    if match is None:
        raise ValueError(
            f"malformed curve {_shown(spec)}; expected {_BEZIER_SIGNATURE!r}, e.g. 'cubic_bezier(0.42, 0, 0.58, 1)'"
        )
    inner = match.group("args").strip()
    parts = [p.strip() for p in inner.split(",")] if inner else []
    if len(parts) != 4:
        raise ValueError(
            f"curve {_shown(spec)}: cubic_bezier takes 4 numbers (x1, y1, x2, y2), got {len(parts)}"
        )
    # A strict number pattern instead of float(): float() would also accept 'nan', 'inf' and '1_0'.
    for part in parts:
        if _NUMBER_RE.fullmatch(part) is None:
            raise ValueError(f"curve {_shown(spec)}: cubic_bezier argument {_shown(part)} is not a number")
    x1, y1, x2, y2 = (float(p) for p in parts)
    try:
        return cubic_bezier(x1, y1, x2, y2)
    except ValueError as exc:
        raise ValueError(f"curve {_shown(spec)}: {exc}") from None


# CSS timing keywords, used only to suggest the equivalent bezier: difflib alone would answer
# "ease-in-out" with an unrelated polynomial curve.
_CSS_KEYWORDS = {
    "ease": "cubic_bezier(0.25, 0.1, 0.25, 1)",
    "ease_in": "cubic_bezier(0.42, 0, 1, 1)",
    "ease_out": "cubic_bezier(0, 0, 0.58, 1)",
    "ease_in_out": "cubic_bezier(0.42, 0, 0.58, 1)",
}


def _suggestion(spec: str) -> str:
    # Users often paste easings.net's camelCase ("easeInOutSine") or CSS's kebab-case; normalise
    # before matching so those get a useful suggestion.
    key = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", spec).replace("-", "_").lower()
    if key in _CSS_KEYWORDS:
        return f" did you mean {_CSS_KEYWORDS[key]!r}?"
    matches = difflib.get_close_matches(key, [*CURVES, "cubic_bezier"], n=1, cutoff=0.6)
    if not matches:
        return ""
    hint = _BEZIER_SIGNATURE if matches[0] == "cubic_bezier" else matches[0]
    return f" did you mean {hint!r}?"


@functools.lru_cache(maxsize=1024)
def parse_curve(spec: str) -> Curve:
    """Resolve a curve spec: a registry name or ``"cubic_bezier(x1, y1, x2, y2)"``.

    Raises ``ValueError`` with a one-line message naming the bad value and what is allowed.
    Results are memoised because the planner resolves the same few specs for every frame.
    """
    if not isinstance(spec, str):
        raise TypeError(f"curve spec must be a string, got {type(spec).__name__}")
    key = spec.strip()
    curve = CURVES.get(key)
    if curve is not None:
        return curve
    if key.startswith("cubic_bezier"):
        return _parse_bezier(key)
    raise ValueError(f"unknown curve {_shown(spec)};{_suggestion(key)} {_allowed()}")


def ease(spec: str, u: float) -> float:
    """Weight of curve ``spec`` at normalised time ``u`` (convenience for ``parse_curve(spec)(u)``)."""
    return parse_curve(spec)(u)
