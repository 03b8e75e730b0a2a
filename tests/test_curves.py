"""Tests for pipeline.plan.curves: exact endpoints, pinned easings.net values, cubic_bezier, parsing."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.plan.curves import CURVES, cubic_bezier, curve_names, ease, parse_curve

ROOT = Path(__file__).resolve().parents[1]

FAMILIES = ("sine", "quad", "cubic", "quart", "quint", "expo", "circ", "back", "elastic", "bounce")

# Values at u = 0.25, 0.5, 0.75, computed once and pasted as literals. Hand checks against the
# easings.net formulas: in_back(0.5) = 2.70158/8 - 1.70158/4 = -0.0876975;
# out_bounce(0.25) = 7.5625 * 0.25**2 = 0.47265625; in_expo(0.5) = 2**-5 = 0.03125;
# in_out_sine(0.25) = (1 - cos(pi/4)) / 2 = 0.14644660940672624;
# out_elastic(0.5) = 2**-5 * sin(4.25 * 2pi/3) + 1 = 1 + 1/32 * 0.5 = 1.015625.
GOLDEN: dict[str, tuple[float, float, float]] = {
    "ease_in_back": (-0.06413656250000001, -0.08769750000000004, 0.18259031249999969),
    "ease_in_bounce": (0.02734375, 0.234375, 0.52734375),
    "ease_in_circ": (0.031754163448145745, 0.1339745962155614, 0.3385621722338523),
    "ease_in_cubic": (0.015625, 0.125, 0.421875),
    "ease_in_elastic": (-0.005524271728019903, -0.015625000000000045, 0.08838834764831832),
    "ease_in_expo": (0.005524271728019903, 0.03125, 0.1767766952966369),
    "ease_in_out_back": (-0.09968184375, 0.5, 1.09968184375),
    "ease_in_out_bounce": (0.1171875, 0.5, 0.8828125),
    "ease_in_out_circ": (0.0669872981077807, 0.5, 0.9330127018922193),
    "ease_in_out_cubic": (0.0625, 0.5, 0.9375),
    "ease_in_out_elastic": (0.011969444423734044, 0.5, 0.988030555576266),
    "ease_in_out_expo": (0.015625, 0.5, 0.984375),
    "ease_in_out_quad": (0.125, 0.5, 0.875),
    "ease_in_out_quart": (0.03125, 0.5, 0.96875),
    "ease_in_out_quint": (0.015625, 0.5, 0.984375),
    "ease_in_out_sine": (0.1464466094067262, 0.5, 0.8535533905932737),
    "ease_in_quad": (0.0625, 0.25, 0.5625),
    "ease_in_quart": (0.00390625, 0.0625, 0.31640625),
    "ease_in_quint": (0.0009765625, 0.03125, 0.2373046875),
    "ease_in_sine": (0.07612046748871326, 0.2928932188134524, 0.6173165676349102),
    "ease_out_back": (0.8174096875000003, 1.0876975, 1.0641365625),
    "ease_out_bounce": (0.47265625, 0.765625, 0.97265625),
    "ease_out_circ": (0.6614378277661477, 0.8660254037844386, 0.9682458365518543),
    "ease_out_cubic": (0.578125, 0.875, 0.984375),
    "ease_out_elastic": (0.9116116523516816, 1.015625, 1.00552427172802),
    "ease_out_expo": (0.8232233047033631, 0.96875, 0.99447572827198),
    "ease_out_quad": (0.4375, 0.75, 0.9375),
    "ease_out_quart": (0.68359375, 0.9375, 0.99609375),
    "ease_out_quint": (0.7626953125, 0.96875, 0.9990234375),
    "ease_out_sine": (0.38268343236508984, 0.7071067811865476, 0.9238795325112867),
    "hold": (0.0, 0.0, 0.0),
    "linear": (0.25, 0.5, 0.75),
    "step": (0.0, 0.0, 0.0),
}

ALL_NAMES = sorted(CURVES)


def test_registry_is_the_full_easings_net_set() -> None:
    expected = {"linear", "step", "hold"}
    for family in FAMILIES:
        expected |= {f"ease_in_{family}", f"ease_out_{family}", f"ease_in_out_{family}"}
    assert set(CURVES) == expected
    # Every registered curve must have pinned values, and vice versa.
    assert set(GOLDEN) == expected


@pytest.mark.parametrize("name", ALL_NAMES)
def test_endpoints_are_exact(name: str) -> None:
    f = CURVES[name]
    assert f(0.0) == 0.0
    assert f(1.0) == 1.0
    assert f(0) == 0.0
    assert f(1) == 1.0


@pytest.mark.parametrize("name", ALL_NAMES)
def test_input_is_clamped(name: str) -> None:
    f = CURVES[name]
    assert f(-0.5) == 0.0
    assert f(1.5) == 1.0
    assert f(-math.inf) == 0.0
    assert f(math.inf) == 1.0


@pytest.mark.parametrize("name", ALL_NAMES)
def test_nan_input_is_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="nan"):
        CURVES[name](math.nan)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_golden_values(name: str) -> None:
    f = CURVES[name]
    for u, expected in zip((0.25, 0.5, 0.75), GOLDEN[name], strict=True):
        assert f(u) == pytest.approx(expected, abs=1e-12), (name, u)


def test_overshooting_curves_overshoot() -> None:
    assert min(CURVES["ease_in_back"](i / 100) for i in range(101)) < 0.0
    assert max(CURVES["ease_out_back"](i / 100) for i in range(101)) > 1.0
    assert max(CURVES["ease_out_elastic"](i / 100) for i in range(101)) > 1.0


@pytest.mark.parametrize("name", ["step", "hold"])
def test_step_and_hold_wait_for_the_next_keyframe(name: str) -> None:
    f = CURVES[name]
    assert f(0.999999) == 0.0
    assert f(0.5) == 0.0
    assert f(1.0) == 1.0


def test_curve_names() -> None:
    names = curve_names()
    assert names[:-1] == sorted(CURVES)
    assert names[-1] == "cubic_bezier(x1, y1, x2, y2)"


def test_parse_curve_returns_registered_curve() -> None:
    assert parse_curve("ease_in_quad") is CURVES["ease_in_quad"]
    assert parse_curve("  linear\t") is CURVES["linear"]


def test_ease_convenience() -> None:
    assert ease("ease_in_out_cubic", 0.25) == pytest.approx(0.0625, abs=1e-12)
    assert ease("cubic_bezier(0.42, 0, 0.58, 1)", 0.5) == pytest.approx(0.5, abs=1e-12)
    assert ease("ease_out_bounce", 2.0) == 1.0


# --- cubic_bezier -------------------------------------------------------------------------------


def test_cubic_bezier_diagonal_is_linear() -> None:
    f = cubic_bezier(0, 0, 1, 1)
    for u in (0.0, 0.1, 0.25, 1 / 3, 0.5, 0.75, 0.9, 1.0):
        assert f(u) == pytest.approx(CURVES["linear"](u), abs=1e-12)
    g = parse_curve("cubic_bezier(0, 0, 1, 1)")
    assert [g(u) for u in (0.2, 0.6)] == pytest.approx([0.2, 0.6], abs=1e-12)


def test_cubic_bezier_css_ease_in_out_golden() -> None:
    f = parse_curve("cubic_bezier(0.42, 0, 0.58, 1)")
    assert f(0.25) == pytest.approx(0.12916193104731943, abs=1e-12)
    assert f(0.5) == pytest.approx(0.5, abs=1e-12)
    assert f(0.75) == pytest.approx(0.8708380689526806, abs=1e-12)
    assert f(0.0) == 0.0
    assert f(1.0) == 1.0
    assert f(-1.0) == 0.0
    assert f(2.0) == 1.0


@pytest.mark.parametrize(
    "params",
    [(0.42, 0, 0.58, 1), (0.25, 0.1, 0.25, 1), (0, 0, 0.58, 1), (0.42, 0, 1, 1), (1, 0, 0, 1), (0, 1, 1, 0)],
)
def test_cubic_bezier_monotone(params: tuple[float, float, float, float]) -> None:
    f = cubic_bezier(*params)
    values = [f(i / 1000) for i in range(1001)]
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(values))


@pytest.mark.parametrize("params", [(0.0, 0.3, 1.0, 0.7), (0.9, -0.5, 0.1, 1.5), (0.3, 2.0, 0.7, -1.0)])
def test_cubic_bezier_hits_its_control_polygon(params: tuple[float, float, float, float]) -> None:
    # Evaluate the Bezier in Bernstein form at known parameters s and check f(x(s)) == y(s).
    # x1 == 0 makes x'(0) == 0, which exercises the bisection fallback near the start.
    x1, y1, x2, y2 = params
    f = cubic_bezier(*params)
    for i in range(1, 50):
        s = i / 50
        x = 3 * (1 - s) ** 2 * s * x1 + 3 * (1 - s) * s**2 * x2 + s**3
        y = 3 * (1 - s) ** 2 * s * y1 + 3 * (1 - s) * s**2 * y2 + s**3
        assert f(x) == pytest.approx(y, abs=1e-9)


def test_cubic_bezier_allows_overshooting_y() -> None:
    f = parse_curve("cubic_bezier( 0.5 ,-0.5, 0.5,1.5 )")
    values = [f(i / 100) for i in range(101)]
    assert min(values) < 0.0
    assert max(values) > 1.0
    assert values[0] == 0.0
    assert values[-1] == 1.0


def test_parse_curve_is_memoised() -> None:
    assert parse_curve("cubic_bezier(0.1, 0.2, 0.3, 0.4)") is parse_curve("cubic_bezier(0.1, 0.2, 0.3, 0.4)")


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("cubic_bezier(1.2,0,0.5,1)", r"x1=1\.2 must be in \[0, 1\]"),
        ("cubic_bezier(0.1, 0.2, -0.3, 0.4)", r"x2=-0\.3 must be in \[0, 1\]"),
        ("cubic_bezier(0.1,0.2)", r"takes 4 numbers .* got 2"),
        ("cubic_bezier()", r"takes 4 numbers .* got 0"),
        ("cubic_bezier(a,b,c,d)", r"argument 'a' is not a number"),
        ("cubic_bezier(0, nan, 1, 1)", r"argument 'nan' is not a number"),
        ("cubic_bezier", r"expected 'cubic_bezier\(x1, y1, x2, y2\)'"),
    ],
)
def test_bad_cubic_bezier(spec: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as info:
        parse_curve(spec)
    assert spec in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        # 3 * 1e308 is inf: the curve's own coefficients overflowed, and a non-finite weight reached
        # the cache key ("a cache key cannot hold the non-finite number nan", a traceback).
        ("cubic_bezier(0.5, 1e308, 0.5, -1e308)", r"y1=1e\+308 must be a number from -100 to 100"),
        ("cubic_bezier(0.2, 0, 0.8, -100.5)", r"y2=-100\.5 must be a number from -100 to 100"),
        ("cubic_bezier(0.2, 1e400, 0.8, 1)", r"y1=inf must be a number from -100 to 100"),
    ],
)
def test_cubic_bezier_y_is_bounded_so_weights_stay_finite(spec: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_curve(spec)


def test_cubic_bezier_at_the_y_bound_stays_within_it() -> None:
    """A Bezier curve stays within the hull of its control points: |weight| <= 100 at the bound."""
    f = parse_curve("cubic_bezier(0.5, 100, 0.5, -100)")
    values = [f(i / 1000) for i in range(1001)]
    assert all(math.isfinite(v) and -100 <= v <= 100 for v in values)
    assert max(values) > 10 and min(values) < -10  # it does overshoot, a lot


def test_a_long_curve_spec_is_shortened_in_messages() -> None:
    for spec in ("cubic_bezier(" + "1," * 5000 + "1)", "x" * 100_000):
        with pytest.raises(ValueError) as info:
            parse_curve(spec)
        assert len(str(info.value)) < 800, len(str(info.value))


def test_cubic_bezier_function_validates() -> None:
    with pytest.raises(ValueError, match="x1"):
        cubic_bezier(-0.1, 0, 1, 1)
    with pytest.raises(ValueError, match="y2"):
        cubic_bezier(0.1, 0, 1, math.inf)


# --- error messages -----------------------------------------------------------------------------


def test_unknown_curve_suggests_and_lists_allowed() -> None:
    with pytest.raises(ValueError) as info:
        parse_curve("ease_in_out_sin")
    message = str(info.value)
    assert "unknown curve 'ease_in_out_sin'" in message
    assert "did you mean 'ease_in_out_sine'?" in message
    assert "allowed:" in message
    assert "linear" in message
    assert "cubic_bezier(x1, y1, x2, y2)" in message
    assert "\n" not in message


def test_unknown_curve_suggestions_for_other_spellings() -> None:
    with pytest.raises(ValueError, match="did you mean 'ease_in_out_sine'"):
        parse_curve("easeInOutSine")
    with pytest.raises(ValueError, match=r"did you mean 'cubic_bezier\(0.42, 0, 0.58, 1\)'"):
        parse_curve("ease-in-out")


def test_unknown_curve_without_suggestion() -> None:
    with pytest.raises(ValueError) as info:
        parse_curve("zzz")
    assert "did you mean" not in str(info.value)
    assert "allowed:" in str(info.value)


def test_does_not_import_torch_or_numpy() -> None:
    code = (
        "import pipeline.plan.curves, sys; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
