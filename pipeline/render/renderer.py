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
import importlib
import inspect
import io
import math
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pipeline.plan.keys import key_of
from pipeline.plan.planner import FrameJob, Plan
from pipeline.plan.prompts import CHUNK_TOKENS, WEIGHTED_FAMILIES, chunked, weighted_tokens
from pipeline.render.environment import read_input
from pipeline.render.interpolate import Entry, conditioning, noise_for
from pipeline.render.models import ModelError
from pipeline.scene.core import Scene
from pipeline.schedulers import build_scheduler
from pipeline.store.cache import CacheDir

# The diffusers pipeline class for each (family, mode). Mode pipelines share the loaded components.
PIPELINES: dict[tuple[str, str], str] = {
    ("sd", "txt2img"): "StableDiffusionPipeline",
    ("sd", "img2img"): "StableDiffusionImg2ImgPipeline",
    ("sd", "feedback"): "StableDiffusionImg2ImgPipeline",
    ("sd", "inpaint"): "StableDiffusionInpaintPipeline",
    ("sd", "depth2img"): "StableDiffusionDepth2ImgPipeline",
    ("sdxl", "txt2img"): "StableDiffusionXLPipeline",
    ("sdxl", "img2img"): "StableDiffusionXLImg2ImgPipeline",
    ("sdxl", "feedback"): "StableDiffusionXLImg2ImgPipeline",
    ("sdxl", "inpaint"): "StableDiffusionXLInpaintPipeline",
    ("sd3", "txt2img"): "StableDiffusion3Pipeline",
    ("sd3", "img2img"): "StableDiffusion3Img2ImgPipeline",
    ("sd3", "feedback"): "StableDiffusion3Img2ImgPipeline",
    ("sd3", "inpaint"): "StableDiffusion3InpaintPipeline",
}


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
    denoiser = _denoiser(pipe)
    for lora in scene.loras:
        data = read_input(scene, files, files[lora.path])
        # LoRA weights go into the denoiser only: embeddings are cached apart from any LoRA scale.
        prefix = "transformer" if hasattr(pipe, "transformer") and pipe.transformer is not None else "unet"
        tensors = _weight_tensors(data, safetensors=lora.path.endswith(".safetensors"))
        denoiser.load_lora_adapter(tensors, prefix=prefix, adapter_name=scene.lora_name(lora))


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


def _denoiser(pipe: Any) -> Any:
    return pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet


class PerFrameGuidance(float):
    """A classifier-free guidance scale that is each frame's own inside one batched pipeline call.

    diffusers' pipelines (every family and mode we use, 0.42) take one float and combine the two
    halves of the batch as ``uncond + self.guidance_scale * (text - uncond)``, the scale on the
    left. This float is the first frame's scale, so every ``> 1`` test the pipeline makes answers
    as for each frame of the batch (``FrameJob.batch_group`` keeps guided and unguided frames
    apart); multiplied with a batch tensor it scales sample ``i`` by ``scales[i]``, each product
    computed in float32 and rounded once to the tensor's dtype, as ``tensor * float`` rounds it: a
    frame's pixels are those of a one-frame call with its own scale. ``used`` counts the tensor
    products, so a diffusers that stops multiplying this way is caught (:meth:`check_used`).
    """

    scales: tuple[float, ...]
    used: int

    def __new__(cls, scales: Sequence[float]) -> PerFrameGuidance:
        obj = super().__new__(cls, scales[0])
        obj.scales = tuple(float(s) for s in scales)
        obj.used = 0
        return obj

    def __mul__(self, other: Any) -> Any:
        if not isinstance(other, torch.Tensor):
            return float(self) * other
        if other.ndim == 0 or other.shape[0] != len(self.scales):
            raise RuntimeError(
                f"per-frame guidance for {len(self.scales)} frames met a tensor of shape {tuple(other.shape)}"
            )
        wide = torch.float64 if other.dtype == torch.float64 else torch.float32
        scale = torch.tensor(self.scales, dtype=wide, device=other.device)
        self.used += 1
        return (other.to(wide) * scale.view(-1, *([1] * (other.ndim - 1)))).to(other.dtype)

    __rmul__ = __mul__

    def check_used(self, pipe: Any) -> None:
        if self.used == 0 and len(set(self.scales)) > 1:
            raise RuntimeError(
                f"{type(pipe).__name__} did not apply its guidance scale as a factor on the left; "
                "per-frame guidance does not support this diffusers version"
            )


def guidance_embedded(pipe: Any) -> bool:
    """Whether the denoiser takes the guidance scale as an input (LCM-style ``time_cond_proj_dim``):
    then frames with different scales cannot share a call."""
    return getattr(getattr(_denoiser(pipe), "config", None), "time_cond_proj_dim", None) is not None


@contextlib.contextmanager
def injected_noise(pipe: Any, noise: torch.Tensor) -> Iterator[None]:
    """Make the mode pipeline's ``prepare_latents`` use our per-frame noise instead of drawing its own.

    img2img, inpaint and depth2img pipelines take no ``latents`` argument; they draw their noise
    once, with ``randn_tensor``, in ``prepare_latents``. For that one call (the latent-shaped
    draw) we hand back our noise, so seed travel and circle walks work in every mode and a frame's
    noise never depends on its batch. If diffusers ever stops drawing there, we fail loudly.
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

    @torch.no_grad()
    def _encode(self, text: str, prompts: Mapping[str, Any] | None = None) -> Entry:
        """One prompt's embedding entry. ``prompts``: the key's prompt format (``pipeline.plan.planner``
        names it for SD 1.x/2.x texts that may be weighted or long); without it, diffusers' own
        encoding, cut at one CLIP window as before."""
        # clip_skip applies to every prompt, negative prompts too (as AUTOMATIC1111 and ComfyUI do;
        # diffusers' pipelines skip layers for the positive prompt only): both sides of classifier-free
        # guidance then come from the same CLIP layer. Every prompt is encoded here, one at a time.
        clip_skip = self.scene.clip_skip or None
        pipe = self.pipe
        if clip_skip:
            self._check_clip_skip(clip_skip)
        if self.family == "sd" and prompts is not None:
            entry = {"prompt_embeds": self._sd_weighted(text, prompts, clip_skip or 0)}
        elif self.family == "sdxl" and prompts is not None:
            entry = self._sdxl_weighted(text, prompts, clip_skip or 0)
        elif self.family == "sd" and clip_skip:
            entry = {"prompt_embeds": self._sd_skipped(text, clip_skip)}
        elif self.family == "sd":
            embeds, _ = pipe.encode_prompt(
                text,
                self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
            )
            entry = {"prompt_embeds": embeds}
        elif self.family == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(
                text,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
                clip_skip=clip_skip,
            )
            entry = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        else:
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt=text,
                prompt_2=None,
                prompt_3=None,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
                clip_skip=clip_skip,
            )
            entry = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if prompts is None:
            self._warn_cut(text)
        # Stored as float32 on the CPU: interpolation is done in float32 whatever the device.
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in entry.items()}

    def _check_clip_skip(self, clip_skip: int) -> None:
        """A clip_skip past the first layer is bad input (exit 2), not an IndexError deep in an encoder.

        SD 1.x/2.x take ``hidden_states[-(clip_skip + 1)]``, SDXL and SD3 ``[-(clip_skip + 2)]``, of a
        tuple holding the token embeddings and then each of the encoder's layers.
        """
        offset = 1 if self.family == "sd" else 2
        for name in ("text_encoder", "text_encoder_2"):
            encoder = getattr(self.pipe, name, None)
            layers = getattr(getattr(encoder, "config", None), "num_hidden_layers", None)
            if isinstance(layers, int) and clip_skip + offset > layers + 1:
                raise ModelError(
                    f"clip_skip: {clip_skip} skips more layers than the model's {name} has ({layers}); "
                    f"with this model clip_skip can be at most {layers + 1 - offset}"
                )

    def _warn_cut(self, text: str) -> None:
        """Say what diffusers' own encoding cuts from a prompt past one CLIP window (it says nothing)."""
        tokenizer = getattr(self.pipe, "tokenizer", None)
        if tokenizer is None or not text:
            return
        ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
        if len(ids) > CHUNK_TOKENS:
            _warn_dropped(text, len(ids), tokenizer.decode(ids[CHUNK_TOKENS:]), self.family)

    def _sd_weighted(self, text: str, prompts: Mapping[str, Any], clip_skip: int) -> torch.Tensor:
        """SD 1.x/2.x embeddings of a weighted and/or long prompt, as AUTOMATIC1111 computes them.

        Each 75-token chunk goes through the text encoder on its own (BOS, tokens, EOS, padding); its
        output is multiplied token by token by the weights, then rescaled to the mean it had before
        (AUTOMATIC1111's "original" emphasis); the chunks are joined along the sequence.
        """
        from diffusers.loaders import TextualInversionLoaderMixin

        pipe = self.pipe
        convert = None
        if isinstance(pipe, TextualInversionLoaderMixin):
            convert = lambda part: pipe.maybe_convert_prompt(part, pipe.tokenizer)  # noqa: E731
        ids, weights = weighted_tokens(pipe.tokenizer, text, str(prompts["format"]), convert)
        chunks = chunked(ids, weights, pipe.tokenizer, str(prompts["long"]))
        if chunks.dropped:
            _warn_dropped(text, chunks.tokens, pipe.tokenizer.decode(chunks.dropped), self.family)
        out = []
        for chunk_ids, chunk_weights, mask in zip(chunks.ids, chunks.weights, chunks.masks, strict=True):
            z = self._sd_hidden(torch.tensor([chunk_ids]), torch.tensor([mask]), clip_skip).float()
            out.append(emphasis(z, torch.tensor(chunk_weights, dtype=torch.float32, device=z.device)))
        return torch.cat(out, dim=1)

    def _sdxl_weighted(self, text: str, prompts: Mapping[str, Any], clip_skip: int) -> Entry:
        """SDXL embeddings of a weighted and/or long prompt: each encoder's chunks as for SD 1.x/2.x,
        from the layer diffusers' ``encode_prompt`` takes (``hidden_states[-(clip_skip + 2)]``, no
        norm), the two encoders' outputs side by side; the pooled embedding is the second encoder's
        for the first chunk, unweighted (as AUTOMATIC1111 takes it)."""
        from diffusers.loaders import TextualInversionLoaderMixin

        pipe = self.pipe
        sides, pooled = [], None
        for tokenizer, encoder in (
            (pipe.tokenizer, pipe.text_encoder),
            (pipe.tokenizer_2, pipe.text_encoder_2),
        ):
            if encoder is None:  # a refiner has only the second encoder
                continue
            convert = None
            if isinstance(pipe, TextualInversionLoaderMixin):
                convert = lambda part, tok=tokenizer: pipe.maybe_convert_prompt(part, tok)  # noqa: E731
            ids, weights = weighted_tokens(tokenizer, text, str(prompts["format"]), convert)
            chunks = chunked(ids, weights, tokenizer, str(prompts["long"]))
            if chunks.dropped and not sides:
                _warn_dropped(text, chunks.tokens, tokenizer.decode(chunks.dropped), self.family)
            out = []
            for n, (chunk_ids, chunk_weights) in enumerate(zip(chunks.ids, chunks.weights, strict=True)):
                got = encoder(torch.tensor([chunk_ids]).to(self.device), output_hidden_states=True)
                if n == 0 and got[0].ndim == 2:  # CLIPTextModelWithProjection: its text_embeds
                    pooled = got[0]
                z = got.hidden_states[-(clip_skip + 2)].float()
                out.append(emphasis(z, torch.tensor(chunk_weights, dtype=torch.float32, device=z.device)))
            sides.append(torch.cat(out, dim=1))
        return {"prompt_embeds": torch.cat(sides, dim=-1), "pooled_prompt_embeds": pooled}

    def _sd_hidden(self, ids: torch.Tensor, mask: torch.Tensor, clip_skip: int) -> torch.Tensor:
        """The SD 1.x/2.x text encoder's output for one window of token ids (``clip_skip`` as in
        :meth:`_sd_skipped`); ``mask`` is used where the encoder's config asks for it, as diffusers does."""
        encoder = self.pipe.text_encoder
        attention = mask.to(self.device) if getattr(encoder.config, "use_attention_mask", False) else None
        if not clip_skip:
            return encoder(ids.to(self.device), attention_mask=attention)[0]
        out = encoder(ids.to(self.device), attention_mask=attention, output_hidden_states=True)
        norm = (
            encoder.text_model.final_layer_norm
            if hasattr(encoder, "text_model")
            else encoder.final_layer_norm
        )
        return norm(out.hidden_states[-(clip_skip + 1)]).to(encoder.dtype)

    def _sd_skipped(self, text: str, clip_skip: int) -> torch.Tensor:
        """SD 1.x/2.x embeddings from the CLIP layer ``clip_skip`` layers before the last.

        This is what diffusers' ``encode_prompt(clip_skip=...)`` computes: that layer's hidden state
        through the text model's final layer norm. Computed here from ``output_hidden_states``, as
        diffusers reaches the norm through ``text_encoder.text_model``, which transformers 5's
        ``CLIPTextModel`` no longer has. Tokens are made as diffusers makes them (textual-inversion
        tokens expanded, padded and truncated to the tokenizer's length).
        """
        from diffusers.loaders import TextualInversionLoaderMixin

        pipe, encoder = self.pipe, self.pipe.text_encoder
        if isinstance(pipe, TextualInversionLoaderMixin):
            text = pipe.maybe_convert_prompt(text, pipe.tokenizer)
        tokens = pipe.tokenizer(
            text,
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = (
            tokens.attention_mask.to(self.device)
            if getattr(encoder.config, "use_attention_mask", False)
            else None
        )
        out = encoder(tokens.input_ids.to(self.device), attention_mask=mask, output_hidden_states=True)
        # hidden_states: the token embeddings, then each layer's output; the last layer's is [-1].
        hidden = out.hidden_states[-(clip_skip + 1)]
        norm = (
            encoder.text_model.final_layer_norm
            if hasattr(encoder, "text_model")
            else encoder.final_layer_norm
        )
        return norm(hidden).to(encoder.dtype)

    def _negative(self, job: FrameJob) -> Entry:
        cond = job.recipe["neg"]
        entry = conditioning(cond, self.embeddings, self._shared)
        # SDXL uses zeros, not the encoding of "", for an empty negative prompt (force_zeros_for_empty_prompt).
        if (
            self.family == "sdxl"
            and "b" not in cond
            and len(cond["a"]) == 1
            and self.plan.text(cond["a"][0][0]) == ""
            and getattr(self.pipe.config, "force_zeros_for_empty_prompt", False)
        ):
            return {k: torch.zeros_like(v) for k, v in entry.items()}
        return entry

    # 2. Per-frame initial noise, made on the CPU.
    def prepare_latents(self, jobs: Sequence[FrameJob]) -> torch.Tensor:
        vae = self.pipe.vae
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        shape = (vae.config.latent_channels, self.scene.height // scale, self.scene.width // scale)
        latents = torch.stack([noise_for(job.recipe["noise"], shape) for job in jobs])
        return latents.to(self.device, self.dtype)

    def _generators(self, jobs: Sequence[FrameJob]) -> list[torch.Generator]:
        # Per-step noise of ancestral samplers and VAE sampling come from each frame's own generator,
        # seeded from its noise recipe: frames with the same seed get the same extra noise too, and a
        # change elsewhere in the key (a library version) does not reshuffle it.
        return [torch.Generator("cpu").manual_seed(int(key_of(job.recipe["noise"])[:15], 16)) for job in jobs]

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
        name = PIPELINES[(self.family, mode)]
        if type(self.pipe).__name__ == name:
            return self.pipe
        if name not in self._mode_pipes:
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
        prev = job.recipe["mode"].get("prev")
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
        steps, embedded = self.scene.steps, guidance_embedded(self.pipe)
        calls: dict[tuple[str, float | None], list[int]] = {}
        for i, job in enumerate(jobs):
            guidance = float(job.recipe["scalars"]["guidance"]) if embedded else None
            calls.setdefault((job.batch_group(steps, self.family), guidance), []).append(i)
        if len(calls) == 1:
            return self._call(jobs, latents)
        images: list[Image.Image] = [None] * len(jobs)  # type: ignore[list-item]
        for picks in calls.values():
            for i, image in zip(picks, self._call([jobs[i] for i in picks], latents[picks]), strict=True):
                images[i] = image
        return images

    def _call(self, jobs: Sequence[FrameJob], latents: torch.Tensor) -> list[Image.Image]:
        """One pipeline call for jobs of one batch group."""
        recipe = jobs[0].recipe  # mode, LoRA scales and denoised steps are equal across the call
        scalars, mode = recipe["scalars"], recipe["mode"]
        conds = [conditioning(j.recipe["cond"], self.embeddings, self._shared) for j in jobs]
        scales = [float(j.recipe["scalars"]["guidance"]) for j in jobs]
        # Without guidance (no negative side) the scale is never read: any frame's will do.
        guidance = PerFrameGuidance(scales) if "neg" in recipe and len(set(scales)) > 1 else scales[0]
        kwargs: dict[str, Any] = {
            "num_inference_steps": self.scene.steps,
            "guidance_scale": guidance,
            "generator": self._generators(jobs),
            "output_type": "pil",
        }
        for name in conds[0]:
            kwargs[name] = torch.cat([c[name] for c in conds]).to(self.device, self.dtype)
        if "neg" in recipe:
            negs = [self._negative(j) for j in jobs]
            for name in negs[0]:
                kwargs[f"negative_{name}"] = torch.cat([n[name] for n in negs]).to(self.device, self.dtype)
        if "lora" in scalars:
            names = list(scalars["lora"])
            _denoiser(self.pipe).set_adapters(names, [float(scalars["lora"][n]) for n in names])

        name = mode["mode"]
        if name == "feedback":
            starts = [self._previous(j) for j in jobs]
            if all(s is None for s in starts) and "init" not in mode:
                name = "txt2img"  # the first frame of a chain with no init image: nothing to feed back
            else:
                fallback = self._image(mode["init"]) if "init" in mode else None
                moved = []
                for j, start in zip(jobs, starts, strict=True):
                    s = j.recipe["scalars"]
                    base = start if start is not None else fallback
                    moved.append(motion(base, s["zoom"], s["angle"], s["translate_x"], s["translate_y"]))
                kwargs["image"] = moved
                # Strengths of one call leave the same denoising steps (batch_group): any of them will do.
                kwargs["strength"] = float(scalars["strength"])
        elif name in ("img2img", "inpaint", "depth2img"):
            kwargs["image"] = [self._image(mode["init"])] * len(jobs)
            kwargs["strength"] = float(scalars["strength"])
            if name == "inpaint":
                kwargs["mask_image"] = [self._image(mode["mask"], "L")] * len(jobs)
            if name == "depth2img" and mode.get("depth", "estimated") != "estimated":
                depth = torch.from_numpy(
                    np.asarray(self._image(mode["depth"], "L"), dtype=np.float32) / 255.0
                )
                kwargs["depth_map"] = depth[None].repeat(len(jobs), 1, 1)
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
        if name == "txt2img":
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

    def render_batch(self, batch: Sequence[FrameJob]) -> list[Image.Image]:
        """Render one batch (one batch group; each feedback frame's previous frame already cached):
        an RGB image per job, in order. The caller encodes and stores them."""
        self.encode_prompts(key for job in batch for key in _frame_embedding_keys(job))
        # Frames whose prompts have different chunk counts (long prompts) get their own calls: each
        # frame's embeddings are padded to its own longest, never to its batch's.
        groups: dict[int, list[int]] = {}
        for i, job in enumerate(batch):
            groups.setdefault(self._chunks(job), []).append(i)
        if len(groups) == 1:
            with self._padded(next(iter(groups)), batch):
                return self.denoise(batch, self.prepare_latents(batch))
        images: list[Image.Image] = [None] * len(batch)  # type: ignore[list-item]
        for chunks, picks in groups.items():
            jobs = [batch[i] for i in picks]
            with self._padded(chunks, jobs):
                for i, image in zip(picks, self.denoise(jobs, self.prepare_latents(jobs)), strict=True):
                    images[i] = image
        return images

    def _chunks(self, job: FrameJob) -> int:
        """The most 77-token windows among a frame's prompt and negative prompt embeddings."""
        if self.family not in WEIGHTED_FAMILIES:
            return 1
        window = CHUNK_TOKENS + 2
        return max(self.embeddings[k]["prompt_embeds"].shape[1] // window for k in _frame_embedding_keys(job))

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
        for key in {k for job in jobs for k in _frame_embedding_keys(job)}:
            entry = dict(full[key])
            have = entry["prompt_embeds"].shape[1] // (CHUNK_TOKENS + 2)
            entry["prompt_embeds"] = torch.cat(
                [entry["prompt_embeds"]] + [self._empty] * (chunks - have), dim=1
            )
            padded[key] = entry
        self.embeddings = padded
        self._shared = self._shared_padded.setdefault(chunks, {})
        try:
            yield
        finally:
            self.embeddings, self._shared = full, shared


def emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One window's embeddings ``z`` (1, tokens, width) weighted token by token and rescaled to the mean
    they had (AUTOMATIC1111's "original" emphasis). Where that mean is next to nothing against the
    values (a final layer norm without bias, as in the embedded tiny models), the quotient of two
    roundings would be noise or a division by zero: the weights then apply alone."""
    weighted = z * weights.view(1, -1, 1)
    before, after, size = z.mean(), weighted.mean(), z.abs().mean()
    if min(before.abs(), after.abs()) <= 1e-6 * size:
        return weighted
    return weighted * (before / after)


def _warn_dropped(text: str, tokens: int, cut: str, family: str) -> None:
    """A prompt lost tokens: say how many and which text (diffusers' own warning is silenced)."""
    why = (
        "long_prompts: truncate"
        if family in WEIGHTED_FAMILIES
        else f"{family} prompts are cut at one CLIP window"
    )
    print(
        f"warning: prompt {text[:60]!r}{'...' if len(text) > 60 else ''} is {tokens} tokens; "
        f"{why} drops the last {tokens - CHUNK_TOKENS}: {cut!r}",
        file=sys.stderr,
    )


def _frame_embedding_keys(job: FrameJob) -> list[str]:
    return [key for part in ("cond", "neg") for key in _embedding_keys(job.recipe.get(part))]


def _embedding_keys(cond: dict[str, Any] | None) -> list[str]:
    if not cond:
        return []
    if "grid" in cond:
        return list(cond["grid"])
    keys = [k for k, _ in cond["a"]]
    if "b" in cond:
        keys += [k for k, _ in cond["b"]]
    return keys
