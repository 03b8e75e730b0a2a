"""The batch renderer: frame jobs in, PNG bytes out, through a diffusers pipeline.

Laid out like a diffusers pipeline, in numbered steps: ``encode_prompts`` (through the embedding
cache), ``prepare_latents`` (per-frame CPU noise), ``denoise`` (the pipeline's own loop, with
``prompt_embeds``/``negative_prompt_embeds``/``latents`` passed in) and ``decode``::

    renderer = FrameRenderer(pipe, scene, plan, cache, device="cpu", dtype="float32")
    for job, png in renderer.render(jobs, batch_size=4):
        cache.frames.put(job.key, png)

Frames that share their scalar settings go through the pipeline together. Each frame brings its own
latent and its own generator, so its pixels do not depend on the batch it lands in.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pipeline.cache import CacheDir
from pipeline.interpolate import Entry, conditioning, noise_for
from pipeline.planner import FrameJob, Plan
from pipeline.scene import Scene
from pipeline.schedulers import build_scheduler

DEFAULT_BATCH = {"cpu": 4, "mps": 4, "cuda": 8}


def default_batch_size(device: str) -> int:
    """Frames per pipeline call: small on CPU (no gain from more), larger on a GPU."""
    return DEFAULT_BATCH.get(device, 4)


def batches(jobs: Sequence[FrameJob], size: int) -> Iterator[list[FrameJob]]:
    """Group jobs with equal settings (in frame order) and cut each group into batches of ``size``."""
    groups: dict[str, list[FrameJob]] = {}
    for job in jobs:
        groups.setdefault(job.batch_group, []).append(job)
    for group in groups.values():
        for i in range(0, len(group), size):
            yield group[i : i + size]


def encode_png(image: Any) -> bytes:
    """PNG bytes of a PIL image (fast compression: frames are written once and read a few times)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def configure(pipe: Any, scene: Scene) -> Any:
    """Apply the scene's sampler and learned weights to a freshly loaded pipeline."""
    if scene.scheduler:
        pipe.scheduler = build_scheduler(scene.scheduler, pipe.scheduler.config)
    for emb in scene.embeddings:
        pipe.load_textual_inversion(str(scene.resolve(emb.path)), token=emb.token)
    return pipe


class FrameRenderer:
    """Renders frame jobs of one plan with one loaded pipeline."""

    def __init__(self, pipe: Any, scene: Scene, plan: Plan, cache: CacheDir, *, device: str, dtype: str):
        self.pipe = pipe
        self.scene = scene
        self.plan = plan
        self.cache = cache
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.embeddings: dict[str, Entry] = {}
        self.encoded = 0  # embeddings computed this run (the rest came from the cache)

    # 1. Prompts -> embeddings, through the embedding cache.
    def encode_prompts(self, keys: Iterable[str]) -> None:
        """Make sure every embedding in ``keys`` is loaded: from the cache, else encoded and stored."""
        for key in keys:
            if key in self.embeddings:
                continue
            blob = self.cache.embeddings.get(key)
            if blob is not None:
                self.embeddings[key] = load_safetensors(blob)
                continue
            entry = self._encode(self.plan.text(key))
            self.cache.embeddings.put(key, save_safetensors(entry))
            self.embeddings[key] = entry
            self.encoded += 1

    @torch.no_grad()
    def _encode(self, text: str) -> Entry:
        clip_skip = self.scene.clip_skip or None
        embeds, _ = self.pipe.encode_prompt(
            text, self.device, num_images_per_prompt=1, do_classifier_free_guidance=False, clip_skip=clip_skip
        )
        # Stored as float32 on the CPU: interpolation is done in float32 whatever the device.
        return {"prompt_embeds": embeds.detach().to("cpu", torch.float32).contiguous()}

    # 2. Per-frame initial latents, made on the CPU.
    def prepare_latents(self, jobs: Sequence[FrameJob]) -> torch.Tensor:
        vae_scale = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        shape = (
            self.pipe.vae.config.latent_channels,
            self.scene.height // vae_scale,
            self.scene.width // vae_scale,
        )
        latents = torch.stack([noise_for(job.recipe["noise"], shape) for job in jobs])
        return latents.to(self.device, self.dtype)

    def _generators(self, jobs: Sequence[FrameJob]) -> list[torch.Generator]:
        # Per-step noise of ancestral samplers comes from each frame's own generator, seeded from its key.
        return [torch.Generator("cpu").manual_seed(int(job.key[:15], 16)) for job in jobs]

    # 3. Denoise with the pipeline's own loop.
    @torch.no_grad()
    def denoise(self, jobs: Sequence[FrameJob], latents: torch.Tensor) -> torch.Tensor:
        recipe = jobs[0].recipe  # scalars and mode are equal across a batch
        cond = torch.cat([conditioning(j.recipe["cond"], self.embeddings)["prompt_embeds"] for j in jobs])
        kwargs: dict[str, Any] = {}
        if "neg" in recipe:
            kwargs["negative_prompt_embeds"] = torch.cat(
                [conditioning(j.recipe["neg"], self.embeddings)["prompt_embeds"] for j in jobs]
            ).to(self.device, self.dtype)
        result = self.pipe(
            prompt_embeds=cond.to(self.device, self.dtype),
            latents=latents,
            num_inference_steps=self.scene.steps,
            guidance_scale=float(recipe["scalars"]["guidance"]),
            height=self.scene.height,
            width=self.scene.width,
            generator=self._generators(jobs),
            output_type="latent",
            **kwargs,
        )
        return result.images

    # 4. Decode latents to images.
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Any]:
        vae = self.pipe.vae
        image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=[True] * len(image))

    def render(self, jobs: Sequence[FrameJob], batch_size: int) -> Iterator[tuple[list[FrameJob], list[bytes]]]:
        """Render ``jobs`` batch by batch; yields each finished batch so it can be stored at once."""
        needed = set()
        for job in jobs:
            for part in ("cond", "neg"):
                cond = job.recipe.get(part)
                if cond:
                    needed.update(_embedding_keys(cond))
        self.encode_prompts(sorted(needed))
        for batch in batches(jobs, batch_size):
            latents = self.denoise(batch, self.prepare_latents(batch))
            images = self.decode(latents)
            yield batch, [encode_png(img) for img in images]


def _embedding_keys(cond: dict[str, Any]) -> list[str]:
    if "grid" in cond:
        return list(cond["grid"])
    keys = [k for k, _ in cond["a"]]
    if "b" in cond:
        keys += [k for k, _ in cond["b"]]
    return keys
