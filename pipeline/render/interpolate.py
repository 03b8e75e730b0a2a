"""Tensor interpolation: lerp and slerp, embeddings for a frame's recipe, and its initial noise.

Torch, but no model. Everything follows the seed documents: slerp in float32 over the whole
flattened tensor with a lerp fallback when the two are nearly parallel; noise made on the CPU from
a generator seeded per frame, so a frame's starting latent never depends on its batch::

    cond = conditioning(job.view.cond, embeddings)        # {"prompt_embeds": ..., "pooled_prompt_embeds": ...}
    latent = noise_for(job.view.noise, (4, 8, 8))

An embedding entry is a dict of tensors (``prompt_embeds`` and, for SDXL/SD3, ``pooled_prompt_embeds``);
every tensor in it is interpolated the same way, so sequence AND pooled embeddings travel together.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import torch

from pipeline.plan.keys import round_float
from pipeline.plan.recipe import Cond, Noise

Entry = dict[str, torch.Tensor]
DOT_THRESHOLD = 0.9995


def lerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """Straight-line interpolation, computed in float32 and cast back."""
    out = v0.float() + (v1.float() - v0.float()) * t
    return out.to(v0.dtype)


def cosine(v0: torch.Tensor, v1: torch.Tensor) -> float:
    """The cosine of the angle between two tensors, each taken whole (flattened), in float32."""
    a, b = v0.float(), v1.float()
    return float((a * b).sum() / (a.norm() * b.norm()))


def slerp(
    v0: torch.Tensor,
    v1: torch.Tensor,
    t: float,
    dot_threshold: float = DOT_THRESHOLD,
    *,
    dot: float | None = None,
) -> torch.Tensor:
    """Spherical interpolation over the whole flattened tensor (Karpathy's gist, as in the Keras example).

    ``dot``: the cosine to use instead of that of ``v0`` and ``v1``. Slerping two stacked tensors
    and taking one slice is, element for element, this with the stacks' cosine on the two slices.
    """
    a, b = v0.float(), v1.float()
    if dot is None:
        dot = cosine(a, b)
    if abs(dot) > dot_threshold:
        return lerp(v0, v1, t)
    theta0 = math.acos(dot)
    sin_theta0 = math.sin(theta0)
    s0 = math.sin(theta0 - theta0 * t) / sin_theta0
    s1 = math.sin(theta0 * t) / sin_theta0
    return (s0 * a + s1 * b).to(v0.dtype)


METHODS = {"lerp": lerp, "slerp": slerp}


def mix(a: Entry, b: Entry, t: float, method: str) -> Entry:
    """Interpolate every tensor of two embedding entries."""
    fn = METHODS[method]
    return {name: fn(a[name], b[name], t) for name in a}


def blend(parts: Sequence[Sequence[Any]], embeddings: Mapping[str, Entry]) -> Entry:
    """A weighted prompt blend: the weighted sum of the entries (weights already sum to 1)."""
    first = embeddings[parts[0][0]]
    if len(parts) == 1:
        return first
    out = {name: torch.zeros_like(t, dtype=torch.float32) for name, t in first.items()}
    for key, weight in parts:
        for name, tensor in embeddings[key].items():
            out[name] += float(weight) * tensor.float()
    return {name: out[name].to(first[name].dtype) for name in out}


def walk_direction(entry: Entry, direction: Any) -> Entry:
    """The unit step of a walk: ``ones_like`` (the Keras example) or a seeded random direction."""
    if direction == "ones":
        return {name: torch.ones_like(t) for name, t in entry.items()}
    gen = torch.Generator("cpu").manual_seed(int(direction["random"]))
    return {
        name: torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype)
        for name, t in entry.items()
    }


def grid_rows_cosine(corners: Sequence[Entry], cols: int) -> dict[str, float]:
    """Per tensor name, the cosine between a grid's whole top row and whole bottom row.

    The Keras example ("Random walks with Stable Diffusion 3", keras.io) builds the top row as
    ``slerp(e1, e2)`` and the bottom row as ``slerp(e3, e4)`` at ``linspace(0, 1, cols)``, then
    slerps the two rows, stacked, into each other: one angle for the whole row pair, from this
    cosine.
    """
    k1, k2, k3, k4 = corners
    # The u of each column as the planner writes it (rounded like every recipe number).
    us = [round_float(c / (cols - 1)) if cols > 1 else 0.0 for c in range(cols)]
    out = {}
    for name in k1:
        top = torch.stack([slerp(k1[name], k2[name], u).float() for u in us])
        bottom = torch.stack([slerp(k3[name], k4[name], u).float() for u in us])
        out[name] = cosine(top, bottom)
    return out


def conditioning(
    cond: Cond | Mapping[str, Any],
    embeddings: Mapping[str, Entry],
    memo: MutableMapping[Any, Any] | None = None,
) -> Entry:
    """The embedding entry for one frame's conditioning (``job.view.cond``, or its plain dict).

    ``memo``: a dict the caller keeps across frames of one plan, for what many frames share.
    """
    c = cond if isinstance(cond, Cond) else Cond(cond)
    kind = c.kind
    if kind == "grid":
        corners = [embeddings[k] for k in c.corners]
        k1, k2, k3, k4 = corners
        top = mix(k1, k2, c.u, c.method)
        bottom = mix(k3, k4, c.u, c.method)
        cols = c.whole_rows
        if cols is not None:
            # grid method 'rows': this cell of the slerp of the two whole rows (one angle per row pair).
            key = ("grid rows", *c.corners, cols)  # every frame of the grid's middle rows needs it
            dots = memo.get(key) if memo is not None else None
            if dots is None:
                dots = grid_rows_cosine(corners, cols)
                if memo is not None:
                    memo[key] = dots
            return {name: slerp(top[name], bottom[name], c.v, dot=dots[name]) for name in top}
        return mix(top, bottom, c.v, c.method)
    a = blend(c.a, embeddings)
    if kind == "walk":
        step = walk_direction(a, c.walk_direction)
        offset = c.walk_offset
        return {name: (a[name].float() + offset * step[name].float()).to(a[name].dtype) for name in a}
    if kind == "morph":
        assert c.b is not None
        return mix(a, blend(c.b, embeddings), c.t, c.method)
    return a


def seeded_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise from a CPU generator: the same seed gives the same latent anywhere."""
    gen = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32)


def noise_for(noise: Noise | Mapping[str, Any], shape: Sequence[int]) -> torch.Tensor:
    """A frame's initial latent (float32, CPU) from its noise (``job.view.noise``, or its plain dict)."""
    n = noise if isinstance(noise, Noise) else Noise(noise)
    kind = n.kind
    if kind == "circle":
        first, second = n.circle
        x, y = seeded_noise(first, shape), seeded_noise(second, shape)
        angle = 2 * math.pi * n.s
        # cos^2 + sin^2 = 1 keeps the variance of the mix that of a single noise at every frame.
        return math.cos(angle) * x + math.sin(angle) * y
    x = seeded_noise(n.seed, shape)
    if kind == "travel":
        assert n.to is not None
        return slerp(x, seeded_noise(n.to, shape), n.t)
    return x
