"""The four-way grid against the formula of its seed, the Keras example "Random walks with Stable
Diffusion 3" (keras.io): both rows interpolated cell by cell, then the two rows slerped into each
other as whole stacked tensors with one angle (``grid: {method: rows}``, the default); and the
per-cell method (``method: cells``), each cell slerped with its own angle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.render.interpolate import conditioning, grid_rows_cosine, slerp


def keras_slerp(v1: np.ndarray, v2: np.ndarray, num: int) -> np.ndarray:
    """The example's ``slerp(v1, v2, num)``, in float64 numpy: one angle for the whole tensors (a
    stack of rows is one tensor), ``num`` points from ``linspace(0, 1, num)``, stacked on axis 0."""

    def interpolation(t: float, v1: np.ndarray, v2: np.ndarray, dot_threshold: float = 0.9995) -> np.ndarray:
        dot = np.sum(v1 * v2 / (np.linalg.norm(np.ravel(v1)) * np.linalg.norm(np.ravel(v2))))
        if abs(dot) > dot_threshold:
            return (1 - t) * v1 + t * v2
        theta_0 = np.arccos(dot)
        sin_theta_0 = np.sin(theta_0)
        theta_t = theta_0 * t
        s0 = np.sin(theta_0 - theta_t) / sin_theta_0
        s1 = np.sin(theta_t) / sin_theta_0
        return s0 * v1 + s1 * v2

    t = np.linspace(0, 1, num)
    return np.stack([interpolation(t[i], v1, v2) for i in range(num)], axis=0)


def keras_grid(corners: list[np.ndarray], rows: int, cols: int) -> np.ndarray:
    """The example's grid: ``slerp(slerp(e1, e2), slerp(e3, e4))``, reshaped to frames row by row."""
    e1, e2, e3, e4 = corners
    top, bottom = keras_slerp(e1, e2, cols), keras_slerp(e3, e4, cols)
    grid = keras_slerp(top, bottom, rows)  # (rows, cols, ...)
    return grid.reshape(rows * cols, *e1.shape)


def corner_entries() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    return [
        {
            "prompt_embeds": torch.randn(1, 4, 8, generator=gen),
            "pooled_prompt_embeds": torch.randn(1, 8, generator=gen),
        }
        for _ in range(4)
    ]


def grid_frames(plan_text, rows: int, cols: int, method: str) -> tuple[list[dict], dict]:
    p = plan_text(f"grid: {{prompts: [a, b, c, d], rows: {rows}, cols: {cols}, method: {method}}}")
    keys = p[0].recipe["cond"]["grid"]
    embeddings = dict(zip(keys, corner_entries(), strict=True))
    return [j.recipe["cond"] for j in p], embeddings


@pytest.mark.parametrize(("rows", "cols"), [(8, 8), (5, 3), (3, 6)])
def test_grid_rows_method_is_the_keras_formula(plan_text, rows: int, cols: int) -> None:
    conds, embeddings = grid_frames(plan_text, rows, cols, "rows")
    corners = list(embeddings.values())
    memo: dict = {}
    for name in ("prompt_embeds", "pooled_prompt_embeds"):
        expected = keras_grid([c[name].double().numpy() for c in corners], rows, cols)
        got = np.stack([conditioning(c, embeddings, memo)[name].double().numpy() for c in conds])
        assert np.abs(got - expected).max() < 2e-6, name
    assert len(memo) == 1  # one row angle per grid, computed once


def test_grid_cells_method_slerps_each_cell_with_its_own_angle(plan_text) -> None:
    rows, cols = 8, 8
    conds, embeddings = grid_frames(plan_text, rows, cols, "cells")
    e1, e2, e3, e4 = ([c["prompt_embeds"].double().numpy()] for c in embeddings.values())
    got = np.stack([conditioning(c, embeddings)["prompt_embeds"].double().numpy() for c in conds])
    for n in range(rows * cols):
        r, c = divmod(n, cols)
        u, v = c / (cols - 1), r / (rows - 1)
        top = keras_slerp(e1[0], e2[0], cols)[c]
        bottom = keras_slerp(e3[0], e4[0], cols)[c]
        cell = keras_slerp(top, bottom, rows)[r]  # this cell's own angle
        assert np.abs(got[n] - cell).max() < 2e-6, (n, u, v)
    # The two methods agree on the first and last rows and differ in the middle ones, by far more
    # than float32 noise: the test above would see a per-cell grid.
    rows_method, _ = grid_frames(plan_text, rows, cols, "rows")
    by_rows = np.stack([conditioning(c, embeddings)["prompt_embeds"].numpy() for c in rows_method])
    diff = np.abs(by_rows - got.astype(np.float32)).reshape(rows, cols, -1).max(axis=(1, 2))
    assert diff[0] == diff[-1] == 0.0
    assert diff[1:-1].min() > 1e-3


def test_grid_rows_pinned_values(plan_text) -> None:
    # The seed's formula worked by hand for a 3x3 grid of unit corners: the centre cell mixes the
    # middle cells of the two rows with the angle between the whole rows, not with its own.
    corners = [
        torch.tensor([[1.0, 0.0, 0.0]]),
        torch.tensor([[0.0, 1.0, 0.0]]),
        torch.tensor([[0.0, 0.0, 1.0]]),
        torch.tensor([[0.6, 0.0, 0.8]]),
    ]
    p = plan_text("grid: {prompts: [a, b, c, d], rows: 3, cols: 3}")
    keys = p[0].recipe["cond"]["grid"]
    embeddings = {k: {"prompt_embeds": t} for k, t in zip(keys, corners, strict=True)}
    # Top row: cos 90 degrees; bottom row: cos(c, d) = 0.8. Rows as stacks: cosine of the stacks.
    top = [[1.0, 0.0, 0.0], [math.sqrt(0.5), math.sqrt(0.5), 0.0], [0.0, 1.0, 0.0]]
    half = math.sin(math.acos(0.8) / 2) / 0.6
    bottom = [[0.0, 0.0, 1.0], [0.6 * half, 0.0, half * 1.8], [0.6, 0.0, 0.8]]
    dot = sum(a * b for ra, rb in zip(top, bottom, strict=True) for a, b in zip(ra, rb, strict=True))
    dot /= math.sqrt(sum(a * a for r in top for a in r)) * math.sqrt(sum(b * b for r in bottom for b in r))
    assert grid_rows_cosine([embeddings[k] for k in keys], 3)["prompt_embeds"] == pytest.approx(dot, abs=1e-6)
    assert dot == pytest.approx(math.sqrt(5) / 30, abs=1e-12)  # only the middle columns meet
    centre = conditioning(p[4].recipe["cond"], embeddings)["prompt_embeds"][0].tolist()
    theta = math.acos(dot)
    s = math.sin(theta / 2) / math.sin(theta)  # t = 0.5: both rows weigh the same
    assert centre == pytest.approx([s * (a + b) for a, b in zip(top[1], bottom[1], strict=True)], abs=1e-6)
    assert centre == pytest.approx([0.6980592, 0.4823470, 0.6471364], abs=1e-6)
    # The per-cell method would use the centre column's own angle instead.
    own = slerp(torch.tensor(top[1]), torch.tensor(bottom[1]), 0.5).tolist()
    assert max(abs(a - b) for a, b in zip(centre, own, strict=True)) > 1e-2
