"""The batch renderer: frame jobs in, images out, through diffusers pipelines.

Laid out like a diffusers pipeline, in numbered steps: ``encode_prompts`` (through the embedding
cache), ``prepare_latents`` (per-frame CPU noise) and ``denoise`` (the diffusers pipeline of the
frame's mode, with ``prompt_embeds``/``pooled_prompt_embeds``/``negative_*`` and the noise passed
in, decoded by its VAE)::

    renderer = FrameRenderer(pipe, scene, plan, cache, device="cpu", dtype="float32")
    images = renderer.render_batch(batch)        # one PIL image per job, in order

PNG encoding and the cache write are the caller's (``pipeline.render.loop`` does them in a writer thread
while the next batch renders). A batch is frames of one ``FrameJob.batch_group`` (``pipeline.render.loop``
forms the batches); it goes through one pipeline call. Each frame brings its own prompt and
negative prompt, its own noise and generator (for ancestral samplers and VAE sampling), its own
guidance scale (:class:`PerFrameGuidance`) and, for feedback, its own motion, so its pixels never
depend on the batch it lands in. A feedback frame starts from the frame before it, read from the
cache, so the caller renders feedback chains in waves (see ``pipeline.render.loop``).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pipeline.modes import MODES, pipeline_class
from pipeline.plan.planner import FrameJob, Plan
from pipeline.plan.prompts import WEIGHTED_FAMILIES
from pipeline.render.denoise import PerFrameGuidance, denoise_calls, denoiser, guidance_embedded, in_order
from pipeline.render.encode import PromptEncoder, pad_windows, windows
from pipeline.render.environment import read_input
from pipeline.render.interpolate import Entry, conditioning
from pipeline.render.noise import generators, initial_latents, injected_noise
from pipeline.scene.core import Scene
from pipeline.schedulers import build_scheduler
from pipeline.store.cache import CacheDir


def configure(pipe: Any, scene: Scene) -> Any:
    """Apply the scene's sampler to a freshly loaded pipeline.

    Its learned embeddings and LoRA files are loaded by :class:`FrameRenderer`, which knows the
    content hashes the plan was made with and loads exactly those bytes.
    """
    if scene.scheduler:
        pipe.scheduler = build_scheduler(scene.scheduler, pipe.scheduler.config)
    return pipe


def load_learned(pipe: Any, scene: Scene, files: Mapping[str, str]) -> None:
    """Load the scene's learned embeddings and LoRA weights into ``pipe`` from the planned bytes.

    Each file is read once, checked against the hash its frames and embeddings are keyed by
    (:func:`read_input`), and handed to diffusers as tensors, as diffusers itself would read the file.
    """
    for emb in scene.embeddings:
        data = read_input(scene, files, files[emb.path])
        pipe.load_textual_inversion(_embedding_tensors(data), token=emb.token)
    net = denoiser(pipe)
    for lora in scene.loras:
        data = read_input(scene, files, files[lora.path])
        # LoRA weights go into the denoiser only: embeddings are cached apart from any LoRA scale.
        prefix = "transformer" if hasattr(pipe, "transformer") and pipe.transformer is not None else "unet"
        tensors = _weight_tensors(data, safetensors=lora.path.endswith(".safetensors"))
        net.load_lora_adapter(tensors, prefix=prefix, adapter_name=scene.lora_name(lora))


def _weight_tensors(data: bytes, *, safetensors: bool) -> dict[str, Any]:
    """A weights file's tensors from its bytes: safetensors, or a pickle read with ``weights_only``
    (what diffusers' ``load_state_dict`` does for a file of that suffix)."""
    if safetensors:
        return dict(load_safetensors(data))
    return dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))


def _embedding_tensors(data: bytes) -> dict[str, Any]:
    """A learned embedding's tensors: diffusers tries safetensors whatever the suffix, then a pickle."""
    try:
        return dict(load_safetensors(data))
    except Exception:  # SafetensorError: not a safetensors file
        return _weight_tensors(data, safetensors=False)


def motion(image: Image.Image, zoom: float, angle: float, tx: float, ty: float) -> Image.Image:
    """Deforum-style 2D motion, in Deforum's order: shift by ``tx``, ``ty`` pixels first, then zoom and
    rotate (``angle`` degrees, counter-clockwise on screen) about the centre; the edges reflect.

    As the zoom comes second it scales the shift too: ``tx=4`` at ``zoom=2`` moves content 8 pixels.
    """
    if zoom == 1.0 and angle == 0.0 and tx == 0.0 and ty == 0.0:
        return image
    w, h = image.size
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None] / 255.0
    a = math.radians(angle)
    # affine_grid maps output coordinates to input ones, in [-1, 1]: the inverse of the motion.
    cos, sin = math.cos(a) / zoom, math.sin(a) / zoom
    theta = torch.tensor(
        [[[cos, -sin * h / w, -2 * tx / w], [sin * w / h, cos, -2 * ty / h]]], dtype=torch.float32
    )
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(
        x, grid, mode="bicubic", padding_mode="reflection", align_corners=False
    )
    arr = (out[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(arr)


class FrameRenderer:
    """Renders frame jobs of one plan with one loaded pipeline (and its mode siblings)."""

    def __init__(self, pipe: Any, scene: Scene, plan: Plan, cache: CacheDir, *, device: str, dtype: str):
        self.pipe = pipe
        self.scene = scene
        self.plan = plan
        self.cache = cache
        self.family = plan.base["family"]
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.embeddings: dict[str, Entry] = {}
        self.encoded = 0  # embeddings computed this run (the rest came from the cache)
        self._mode_pipes: dict[str, Any] = {}
        self._images: dict[str, Image.Image] = {}
        self._shared: dict[Any, Any] = {}  # what many frames' conditioning shares (a grid's row angle)
        self._shared_padded: dict[int, dict[Any, Any]] = {}  # the same, per chunk count of long prompts
        self._empty: torch.Tensor | None = None  # the empty prompt's embedding: pads long prompts
        self.encoder = PromptEncoder(pipe, self.family, self.device)
        load_learned(pipe, scene, plan.files)

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
            entry = self._encode(self.plan.text(key), self.plan.embeddings[key].get("prompts"))
            self.cache.embeddings.put(key, save_safetensors(entry))
            self.embeddings[key] = entry
            self.encoded += 1

    def _encode(self, text: str, prompts: Mapping[str, Any] | None = None) -> Entry:
        """One prompt's embedding entry (``pipeline.render.encode``)."""
        return self.encoder.encode(text, prompts, self.scene.clip_skip or 0)

    def _negative(self, job: FrameJob) -> Entry:
        neg = job.view.neg
        assert neg is not None  # called only for frames with a negative side (guidance > 1)
        entry = conditioning(neg, self.embeddings, self._shared)
        # SDXL uses zeros, not the encoding of "", for an empty negative prompt (force_zeros_for_empty_prompt).
        if (
            self.family == "sdxl"
            and neg.b is None
            and len(neg.a) == 1
            and self.plan.text(neg.a[0][0]) == ""
            and getattr(self.pipe.config, "force_zeros_for_empty_prompt", False)
        ):
            return {k: torch.zeros_like(v) for k, v in entry.items()}
        return entry

    # 2. Per-frame initial noise, made on the CPU (``pipeline.render.noise``).
    def prepare_latents(self, jobs: Sequence[FrameJob]) -> torch.Tensor:
        return initial_latents(
            self.pipe.vae, jobs, self.scene.height, self.scene.width, self.device, self.dtype
        )

    def _generators(self, jobs: Sequence[FrameJob]) -> list[torch.Generator]:
        return generators(jobs)

    def _timesteps_left(self, pipe: Any, strength: float) -> int:
        """How many timesteps an image-to-image call at ``strength`` runs, counted as diffusers 0.42's
        ``get_timesteps`` slices the scheduler's schedule (SD3 truncates the skipped steps instead)."""
        steps = self.scene.steps
        scheduler = pipe.scheduler
        scheduler.set_timesteps(steps)  # the call sets them again itself; this only reads their count
        if self.family == "sd3":
            start = int(max(steps - min(steps * strength, steps), 0))
        else:
            start = max(steps - min(int(steps * strength), steps), 0)
        return len(scheduler.timesteps[start * getattr(scheduler, "order", 1) :])

    def _mode_pipe(self, mode: str) -> Any:
        name = pipeline_class(self.family, mode)
        if type(self.pipe).__name__ == name:
            return self.pipe
        if name not in self._mode_pipes:
            # Imported here, as in load_pipeline: diffusers' log level is set before its first import.
            import diffusers

            self._mode_pipes[name] = getattr(diffusers, name).from_pipe(self.pipe)
            self._mode_pipes[name].set_progress_bar_config(disable=True)
        return self._mode_pipes[name]

    def _image(self, digest: str, mode: str = "RGB") -> Image.Image:
        """An input image by content hash, resized to the scene's size."""
        key = f"{digest}:{mode}"
        if key not in self._images:
            # Decoded from the bytes that hash to the key's digest, never from a second read of the file.
            data = read_input(self.scene, self.plan.files, digest)
            with Image.open(io.BytesIO(data)) as im:
                self._images[key] = im.convert(mode).resize(
                    (self.scene.width, self.scene.height), Image.LANCZOS
                )
        return self._images[key]

    def _previous(self, job: FrameJob) -> Image.Image | None:
        prev = job.view.mode.prev
        if prev is None:
            return None
        blob = self.cache.frames.get(prev)
        if blob is None:
            raise RuntimeError(
                f"frame {job.frame - 1} is missing from the cache; feedback frame {job.frame} needs it"
            )
        return Image.open(io.BytesIO(blob)).convert("RGB")

    # 3. Denoise with the mode's diffusers pipeline (which also decodes with the VAE).
    @torch.no_grad()
    def denoise(self, jobs: Sequence[FrameJob], latents: torch.Tensor) -> list[Image.Image]:
        """Images of ``jobs`` from their initial ``latents``, in as few pipeline calls as their
        settings allow: one for jobs of one ``batch_group`` (each with its own guidance scale),
        except with a denoiser that takes the scale as an input, where each scale has its call."""
        calls = denoise_calls(jobs, self.scene.steps, self.family, embedded=guidance_embedded(self.pipe))
        if len(calls) == 1:
            return self._call(jobs, latents)
        return in_order(
            calls.items(), lambda _, picks: self._call([jobs[i] for i in picks], latents[picks]), len(jobs)
        )

    def _call(self, jobs: Sequence[FrameJob], latents: torch.Tensor) -> list[Image.Image]:
        """One pipeline call for jobs of one batch group."""
        recipe = jobs[0].view  # mode, LoRA scales and denoised steps are equal across the call
        conds = [conditioning(j.view.cond, self.embeddings, self._shared) for j in jobs]
        scales = [j.view.guidance for j in jobs]
        guided = recipe.neg is not None
        # Without guidance (no negative side) the scale is never read: any frame's will do.
        guidance = PerFrameGuidance(scales) if guided and len(set(scales)) > 1 else scales[0]
        kwargs: dict[str, Any] = {
            "num_inference_steps": self.scene.steps,
            "guidance_scale": guidance,
            "generator": self._generators(jobs),
            "output_type": "pil",
        }
        for name in conds[0]:
            kwargs[name] = torch.cat([c[name] for c in conds]).to(self.device, self.dtype)
        if guided:
            negs = [self._negative(j) for j in jobs]
            for name in negs[0]:
                kwargs[f"negative_{name}"] = torch.cat([n[name] for n in negs]).to(self.device, self.dtype)
        if loras := recipe.lora:
            names = list(loras)
            denoiser(self.pipe).set_adapters(names, [float(loras[n]) for n in names])

        name, inputs = self._mode_inputs(jobs)
        kwargs.update(inputs)
        if "strength" in MODES[name].scalars:
            # Strengths of one call leave the same denoising steps (batch_group): any of them will do.
            kwargs["strength"] = float(recipe.scalars["strength"])
        pipe = self._mode_pipe(name)
        if "strength" in kwargs and not self._timesteps_left(pipe, kwargs["strength"]):
            # A strength this low leaves the pipeline no timestep at all (steps x strength < 1 with
            # DDIM, Euler...): diffusers would fail there with a tensor-shape error. The frame is its
            # start image as it is, as strength 0 keeps the image. (PNDM's schedule repeats its last
            # timestep, so there diffusers still runs one step, and so do we.)
            return [im.convert("RGB") for im in kwargs["image"]]
        if "height" in inspect.signature(pipe.__call__).parameters:
            # Some mode pipelines (SD3 img2img) would otherwise resize the init image to their default size.
            kwargs.update(height=self.scene.height, width=self.scene.width)
        if "image" not in kwargs:  # starts from noise alone: the pipeline takes it as its latents
            images = pipe(latents=latents, **kwargs).images
        else:
            with injected_noise(pipe, latents), warnings.catch_warnings():
                # depth2img runs its depth estimator under torch.autocast(dtype=the model's dtype); in
                # float32 torch says it disables autocast, which is what we want: not news for the user.
                warnings.filterwarnings(
                    "ignore",
                    message=r"In \w+ autocast, but the target dtype is not supported",
                    category=UserWarning,
                )
                images = pipe(**kwargs).images
        if isinstance(guidance, PerFrameGuidance):
            guidance.check_used(pipe)
        return list(images)

    def _mode_inputs(self, jobs: Sequence[FrameJob]) -> tuple[str, dict[str, Any]]:
        """The mode a call renders in and its pipeline's image arguments, from the mode recipe of the
        call's frames (equal across it): one branch per mode; the rest of a mode is ``pipeline.modes``."""
        mode = jobs[0].view.mode
        name, n = mode.name, len(jobs)
        if name == "txt2img":
            return name, {}
        if name == "feedback":
            starts = [self._previous(j) for j in jobs]
            if all(s is None for s in starts) and mode.init is None:
                return "txt2img", {}  # the first frame of a chain with no init image: nothing to feed back
            fallback = self._image(mode.init) if mode.init is not None else None
            moved = []
            for j, start in zip(jobs, starts, strict=True):
                s = j.view.scalars
                base = start if start is not None else fallback
                moved.append(motion(base, s["zoom"], s["angle"], s["translate_x"], s["translate_y"]))
            return name, {"image": moved}
        if name == "img2img":
            return name, {"image": [self._image(mode.init)] * n}
        if name == "inpaint":
            return name, {
                "image": [self._image(mode.init)] * n,
                "mask_image": [self._image(mode.mask, "L")] * n,
            }
        if name == "depth2img":
            inputs: dict[str, Any] = {"image": [self._image(mode.init)] * n}
            if mode.depth not in (None, "estimated"):
                depth = torch.from_numpy(np.asarray(self._image(mode.depth, "L"), dtype=np.float32) / 255.0)
                inputs["depth_map"] = depth[None].repeat(n, 1, 1)
            return name, inputs
        raise NotImplementedError(
            f"mode {name} is in pipeline.modes but has no branch in FrameRenderer._mode_inputs"
        )

    def render_batch(self, batch: Sequence[FrameJob]) -> list[Image.Image]:
        """Render one batch (one batch group; each feedback frame's previous frame already cached):
        an RGB image per job, in order. The caller encodes and stores them."""
        self.encode_prompts(key for job in batch for key in job.view.embedding_keys())
        # Frames whose prompts have different chunk counts (long prompts) get their own calls: each
        # frame's embeddings are padded to its own longest, never to its batch's.
        groups: dict[int, list[int]] = {}
        for i, job in enumerate(batch):
            groups.setdefault(self._chunks(job), []).append(i)
        if len(groups) == 1:
            with self._padded(next(iter(groups)), batch):
                return self.denoise(batch, self.prepare_latents(batch))

        def padded(chunks: int, picks: list[int]) -> list[Image.Image]:
            jobs = [batch[i] for i in picks]
            with self._padded(chunks, jobs):
                return self.denoise(jobs, self.prepare_latents(jobs))

        return in_order(groups.items(), padded, len(batch))

    def _chunks(self, job: FrameJob) -> int:
        """The most 77-token windows among a frame's prompt and negative prompt embeddings."""
        if self.family not in WEIGHTED_FAMILIES:
            return 1
        return max(
            windows(self.embeddings[k]["prompt_embeds"], self.family) for k in job.view.embedding_keys()
        )

    @contextlib.contextmanager
    def _padded(self, chunks: int, jobs: Sequence[FrameJob]) -> Iterator[None]:
        """While denoising ``jobs``: their embeddings padded to ``chunks`` windows with the embedding of
        the empty prompt, as AUTOMATIC1111 and compel pad the shorter of prompt and negative prompt, so
        that they (and keyframes of different lengths) blend and batch."""
        if chunks == 1:
            yield
            return
        if self._empty is None:
            self._empty = self._encode("")["prompt_embeds"]
        full, shared = self.embeddings, self._shared
        padded: dict[str, Entry] = {}
        for key in {k for job in jobs for k in job.view.embedding_keys()}:
            entry = dict(full[key])
            entry["prompt_embeds"] = pad_windows(entry["prompt_embeds"], self._empty, chunks, self.family)
            padded[key] = entry
        self.embeddings = padded
        self._shared = self._shared_padded.setdefault(chunks, {})
        try:
            yield
        finally:
            self.embeddings, self._shared = full, shared
