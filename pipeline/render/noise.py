"""A frame's noise: its initial latents, its generator, and handing the latents to diffusers.

Every frame has its own noise, made on the CPU from its noise recipe (``pipeline.render.interpolate``),
so its pixels never depend on the batch it lands in or the device::

    latents = initial_latents(pipe.vae, jobs, height, width, device, dtype)
    with injected_noise(pipe, latents):            # img2img, inpaint, depth2img: see below
        images = pipe(image=..., generator=generators(jobs), ...).images
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from pipeline.plan.keys import key_of
from pipeline.plan.planner import FrameJob
from pipeline.render.interpolate import noise_for


def initial_latents(
    vae: Any, jobs: Sequence[FrameJob], height: int, width: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """The frames' initial noise, one latent per job, shaped for ``vae`` at ``width`` x ``height``."""
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (vae.config.latent_channels, height // scale, width // scale)
    latents = torch.stack([noise_for(job.view.noise, shape) for job in jobs])
    return latents.to(device, dtype)


def generators(jobs: Sequence[FrameJob]) -> list[torch.Generator]:
    """A generator per frame, seeded from its noise recipe.

    Per-step noise of ancestral samplers and VAE sampling come from each frame's own generator:
    frames with the same seed get the same extra noise too, and a change elsewhere in the key (a
    library version) does not reshuffle it.
    """
    return [torch.Generator("cpu").manual_seed(int(key_of(job.view.noise.raw)[:15], 16)) for job in jobs]


@contextlib.contextmanager
def injected_noise(pipe: Any, noise: torch.Tensor) -> Iterator[None]:
    """Make the mode pipeline's ``prepare_latents`` use our per-frame noise instead of drawing its own.

    img2img, inpaint and depth2img pipelines draw their noise once, with ``randn_tensor``, in
    ``prepare_latents``. For that one call (the latent-shaped draw) we hand back our noise, so seed
    travel and circle walks work in every mode and a frame's noise never depends on its batch. If
    diffusers ever stops drawing there, we fail loudly.

    This is the one place that patches diffusers: it offers no documented way to hand these
    pipelines the noise (checked with diffusers 0.42.1). The SD 1.x/2.x img2img and depth2img
    pipelines take no ``latents`` argument; the SDXL and SD3 img2img pipelines take ``latents`` as
    the already-noised start, skipping the VAE encoding and the noise draw (we would have to redo
    their ``prepare_latents``); the inpaint pipelines take ``latents`` as pure noise and start from
    it alone (``noise * init_noise_sigma``), leaving out the image at a strength below 1.
    """
    module = importlib.import_module(type(pipe).__module__)
    original = module.randn_tensor
    used = []

    def draw(
        shape: Any, generator: Any = None, device: Any = None, dtype: Any = None, layout: Any = None
    ) -> torch.Tensor:
        if not used and tuple(shape) == tuple(noise.shape):
            used.append(True)
            return noise.to(device=device, dtype=dtype)
        return original(shape, generator=generator, device=device, dtype=dtype, layout=layout)

    module.randn_tensor = draw
    try:
        yield
    finally:
        module.randn_tensor = original
    if not used:
        raise RuntimeError(
            f"{type(pipe).__name__} drew no latent noise; this diffusers version is not supported"
        )
