"""Scheduler names a scene may use, and building one from a model's own scheduler config.

The names are plain data so that validating a scene never imports diffusers or torch; only
:func:`build_scheduler` (called by the renderer) does::

    build_scheduler("dpmpp_2m_karras", pipe.scheduler.config)

Each entry is the diffusers class and the config values that make it that sampler. Everything
else (betas, timestep spacing, prediction type) comes from the model's own config, as diffusers
recommends with ``from_config``.
"""

from __future__ import annotations

from typing import Any

SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False},
    ),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
    "flow_match_euler": ("FlowMatchEulerDiscreteScheduler", {}),
}


def scheduler_names() -> list[str]:
    """The names a scene's ``scheduler:`` may take."""
    return sorted(SCHEDULERS)


def build_scheduler(name: str, base_config: Any) -> Any:
    """A diffusers scheduler called ``name``, built from the model's own scheduler config."""
    import diffusers  # deferred: importing diffusers imports torch

    class_name, overrides = SCHEDULERS[name]
    cls = getattr(diffusers, class_name)
    return cls.from_config(base_config, **overrides)
