"""Tensor interpolation: lerp and slerp, embeddings for a frame's recipe, and its initial noise.

Torch, but no model. Everything follows the seed documents: slerp in float32 over the whole
flattened tensor with a lerp fallback when the two are nearly parallel; noise made on the CPU from
a generator seeded per frame, so a frame's starting latent never depends on its batch::

    cond = conditioning(recipe["cond"], embeddings)       # {"prompt_embeds": ..., "pooled_prompt_embeds": ...}
    latent = noise_for(recipe["noise"], (4, 8, 8))

An embedding entry is a dict of tensors (``prompt_embeds`` and, for SDXL/SD3, ``pooled_prompt_embeds``);
every tensor in it is interpolated the same way, so sequence AND pooled embeddings travel together.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

Entry = dict[str, torch.Tensor]
DOT_THRESHOLD = 0.9995


def lerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """Straight-line interpolation, computed in float32 and cast back."""
    out = v0.float() + (v1.float() - v0.float()) * t
    return out.to(v0.dtype)


def slerp(v0: torch.Tensor, v1: torch.Tensor, t: float, dot_threshold: float = DOT_THRESHOLD) -> torch.Tensor:
    """Spherical interpolation over the whole flattened tensor (Karpathy's gist, as in the Keras example)."""
    a, b = v0.float(), v1.float()
    dot = float((a * b).sum() / (a.norm() * b.norm()))
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


def conditioning(cond: Mapping[str, Any], embeddings: Mapping[str, Entry]) -> Entry:
    """The embedding entry for one frame's conditioning recipe (see ``pipeline.planner``)."""
    if "grid" in cond:
        k1, k2, k3, k4 = (embeddings[k] for k in cond["grid"])
        top = mix(k1, k2, cond["u"], cond["method"])
        bottom = mix(k3, k4, cond["u"], cond["method"])
        return mix(top, bottom, cond["v"], cond["method"])
    a = blend(cond["a"], embeddings)
    if "walk" in cond:
        step = walk_direction(a, cond["walk"]["direction"])
        offset = float(cond["walk"]["offset"])
        return {name: (a[name].float() + offset * step[name].float()).to(a[name].dtype) for name in a}
    if "b" in cond:
        return mix(a, blend(cond["b"], embeddings), cond["t"], cond["method"])
    return a


def seeded_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise from a CPU generator: the same seed gives the same latent anywhere."""
    gen = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32)


def noise_for(noise: Mapping[str, Any], shape: Sequence[int]) -> torch.Tensor:
    """A frame's initial latent (float32, CPU) from its noise recipe."""
    if "circle" in noise:
        x = seeded_noise(noise["circle"][0], shape)
        y = seeded_noise(noise["circle"][1], shape)
        angle = 2 * math.pi * float(noise["s"])
        # cos^2 + sin^2 = 1 keeps the variance of the mix that of a single noise at every frame.
        return math.cos(angle) * x + math.sin(angle) * y
    x = seeded_noise(noise["seed"], shape)
    if "to" in noise:
        return slerp(x, seeded_noise(noise["to"], shape), float(noise["t"]))
    return x
