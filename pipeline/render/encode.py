"""Prompt encoding: a prompt's text in, its embedding entry out, for the text encoders of one pipeline.

The family's own way (diffusers' ``encode_prompt``), or AUTOMATIC1111's for weighted and long
prompts of SD 1.x/2.x, SDXL and SD3 (75-token chunks, token weights with the "original" emphasis; SD3's
T5 weighted on its own tokens), and ``clip_skip`` for every prompt, negative prompts too::

    encoder = PromptEncoder(pipe, "sd", torch.device("cpu"))
    entry = encoder.encode("a (dog:1.5)", prompts, clip_skip=2)   # {"prompt_embeds": ..., maybe "pooled_prompt_embeds"}

The embedding cache around it (which keys to encode, storing them, padding long prompts of one
call) is the renderer's (``pipeline.render.renderer``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch

from pipeline.plan.prompts import CHUNK_TOKENS, T5_TOKENS, WEIGHTED_FAMILIES, chunked, weighted_tokens
from pipeline.render.interpolate import Entry
from pipeline.render.modelfiles import ModelError


class PromptEncoder:
    """Encodes prompts with the text encoders of ``pipe``, a pipeline of model ``family``."""

    def __init__(self, pipe: Any, family: str, device: torch.device):
        self.pipe = pipe
        self.family = family
        self.device = device

    @torch.no_grad()
    def encode(self, text: str, prompts: Mapping[str, Any] | None = None, clip_skip: int = 0) -> Entry:
        """One prompt's embedding entry. ``prompts``: the key's prompt format (``pipeline.plan.planner``
        names it for SD 1.x/2.x texts that may be weighted or long); without it, diffusers' own
        encoding, cut at one CLIP window as before."""
        # clip_skip applies to every prompt, negative prompts too (as AUTOMATIC1111 and ComfyUI do;
        # diffusers' pipelines skip layers for the positive prompt only): both sides of classifier-free
        # guidance then come from the same CLIP layer. Every prompt is encoded here, one at a time.
        clip_skip = clip_skip or None  # the scene's: 0 takes the family's usual layer
        pipe = self.pipe
        if clip_skip:
            self._check_clip_skip(clip_skip)
        if self.family == "sd" and prompts is not None:
            entry = {"prompt_embeds": self._sd_weighted(text, prompts, clip_skip or 0)}
        elif self.family == "sdxl" and prompts is not None:
            entry = self._sdxl_weighted(text, prompts, clip_skip or 0)
        elif self.family == "sd3" and prompts is not None:
            entry = self._sd3_weighted(text, prompts, clip_skip or 0)
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
        t5 = getattr(self.pipe, "tokenizer_3", None)
        if self.family == "sd3" and t5 is not None and getattr(self.pipe, "text_encoder_3", None) is not None:
            _warn_t5_cut(text, t5(text, add_special_tokens=False, verbose=False).input_ids, t5)

    def _sd_weighted(self, text: str, prompts: Mapping[str, Any], clip_skip: int) -> torch.Tensor:
        """SD 1.x/2.x embeddings of a weighted and/or long prompt, as AUTOMATIC1111 computes them.

        Each 75-token chunk goes through the text encoder on its own (BOS, tokens, EOS, padding); its
        output is multiplied token by token by the weights, then rescaled to the mean it had before
        (AUTOMATIC1111's "original" emphasis); the chunks are joined along the sequence.
        """
        pipe = self.pipe
        convert = _converter(pipe, pipe.tokenizer)
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
        sides, pooled = self._clip_sides(text, prompts, clip_skip)
        return {
            "prompt_embeds": torch.cat(sides, dim=-1),
            "pooled_prompt_embeds": pooled[-1] if pooled else None,
        }

    def _sd3_weighted(self, text: str, prompts: Mapping[str, Any], clip_skip: int) -> Entry:
        """SD3 embeddings of a weighted and/or long prompt, laid out as diffusers' ``encode_prompt``
        lays them out: CLIP-L and CLIP-G side by side (each chunked and weighted as for SDXL), zero-padded
        to T5's width, then T5's ``T5_TOKENS`` rows along the sequence (zeros without T5). The pooled
        embedding is both CLIPs' for the first chunk, unweighted, side by side (as diffusers joins them).
        T5 has no 75-token window: its tokens get their weights on T5's own tokenization (the same
        emphasis), and those past ``T5_TOKENS`` are cut, with a warning, as diffusers cuts them."""
        sides, pooled = self._clip_sides(text, prompts, clip_skip)
        clip = torch.cat(sides, dim=-1)
        t5 = self._t5_weighted(text, str(prompts["format"]))
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {
            "prompt_embeds": torch.cat([clip, t5.to(clip.dtype)], dim=-2),
            "pooled_prompt_embeds": torch.cat(pooled, dim=-1),
        }

    def _clip_sides(
        self, text: str, prompts: Mapping[str, Any], clip_skip: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """SDXL's and SD3's two CLIP encoders: each one's chunks, weighted and joined along the sequence
        (from ``hidden_states[-(clip_skip + 2)]``, no norm, as diffusers takes them), and the pooled
        embedding (``text_embeds``) of each encoder with a projection, from its first chunk."""
        pipe = self.pipe
        sides, pooled = [], []
        for tokenizer, encoder in (
            (pipe.tokenizer, pipe.text_encoder),
            (pipe.tokenizer_2, pipe.text_encoder_2),
        ):
            if encoder is None:  # a refiner has only the second encoder
                continue
            convert = _converter(pipe, tokenizer)
            ids, weights = weighted_tokens(tokenizer, text, str(prompts["format"]), convert)
            chunks = chunked(ids, weights, tokenizer, str(prompts["long"]))
            if chunks.dropped and not sides:
                _warn_dropped(text, chunks.tokens, tokenizer.decode(chunks.dropped), self.family)
            out = []
            for n, (chunk_ids, chunk_weights) in enumerate(zip(chunks.ids, chunks.weights, strict=True)):
                got = encoder(torch.tensor([chunk_ids]).to(self.device), output_hidden_states=True)
                if n == 0 and got[0].ndim == 2:  # CLIPTextModelWithProjection: its text_embeds
                    pooled.append(got[0])
                z = got.hidden_states[-(clip_skip + 2)].float()
                out.append(emphasis(z, torch.tensor(chunk_weights, dtype=torch.float32, device=z.device)))
            sides.append(torch.cat(out, dim=1))
        return sides, pooled

    def _t5_weighted(self, text: str, prompt_format: str) -> torch.Tensor:
        """SD3's T5 rows (1, ``T5_TOKENS``, width) of a weighted prompt: the tokens of each fragment
        with its weight, then EOS and padding to ``T5_TOKENS`` as diffusers' ``_get_t5_prompt_embeds``
        pads (no attention mask, as there), encoded at once and weighted with the emphasis of the CLIP
        windows. Without T5, the zeros diffusers puts in its place."""
        pipe = self.pipe
        encoder, tokenizer = getattr(pipe, "text_encoder_3", None), getattr(pipe, "tokenizer_3", None)
        if encoder is None or tokenizer is None:
            width = pipe.transformer.config.joint_attention_dim
            return torch.zeros((1, T5_TOKENS, width), device=self.device, dtype=pipe.text_encoder.dtype)
        ids, weights = weighted_tokens(tokenizer, text, prompt_format)
        _warn_t5_cut(text, ids, tokenizer)
        ids, weights = ids[: T5_TOKENS - 1], weights[: T5_TOKENS - 1]
        fill = T5_TOKENS - 1 - len(ids)
        full = [*ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * fill
        z = encoder(torch.tensor([full]).to(self.device))[0].float()
        return emphasis(z, torch.tensor([*weights, 1.0] + [1.0] * fill, dtype=torch.float32, device=z.device))

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
        pipe, encoder = self.pipe, self.pipe.text_encoder
        convert = _converter(pipe, pipe.tokenizer)
        if convert is not None:
            text = convert(text)
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


def windows(embeds: torch.Tensor, family: str) -> int:
    """How many 77-token CLIP windows a ``prompt_embeds`` holds (SD3's end in ``T5_TOKENS`` T5 rows)."""
    t5 = T5_TOKENS if family == "sd3" else 0
    return (embeds.shape[1] - t5) // (CHUNK_TOKENS + 2)


def pad_windows(embeds: torch.Tensor, empty: torch.Tensor, chunks: int, family: str) -> torch.Tensor:
    """``embeds`` padded to ``chunks`` CLIP windows with the first window of ``empty`` (the empty
    prompt's embedding), after its own windows: for SD3 before its T5 rows, so that windows and T5
    rows of prompts of different lengths line up to blend."""
    window = CHUNK_TOKENS + 2
    have = windows(embeds, family)
    end = have * window
    return torch.cat([embeds[:, :end]] + [empty[:, :window]] * (chunks - have) + [embeds[:, end:]], dim=1)


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
        f"warning: prompt {_shown(text)} is {tokens} tokens; "
        f"{why} drops the last {tokens - CHUNK_TOKENS}: {cut!r}",
        file=sys.stderr,
    )


def _warn_t5_cut(text: str, ids: list[int], tokenizer: Any) -> None:
    """SD3's T5 takes ``T5_TOKENS`` tokens, its end token included, whatever ``long_prompts`` says (as
    diffusers' ``max_sequence_length`` 256 does): say what a longer prompt loses there."""
    keep = T5_TOKENS - 1
    if len(ids) > keep:
        print(
            f"warning: prompt {_shown(text)} is {len(ids)} T5 tokens; SD3's T5 takes {keep} (diffusers' "
            f"max_sequence_length {T5_TOKENS}, its end token included) and drops the last "
            f"{len(ids) - keep}: {tokenizer.decode(ids[keep:])!r}",
            file=sys.stderr,
        )


def _shown(text: str) -> str:
    return f"{text[:60]!r}{'...' if len(text) > 60 else ''}"


def _converter(pipe: Any, tokenizer: Any) -> Callable[[str], str] | None:
    """diffusers' expansion of learned-embedding tokens for ``tokenizer``, where ``pipe`` loads them."""
    # Imported here, not at the top: diffusers must first be imported by load_pipeline, which sets
    # its log level before (this module is imported before the model loads).
    from diffusers.loaders import TextualInversionLoaderMixin

    if not isinstance(pipe, TextualInversionLoaderMixin):
        return None
    return lambda part: pipe.maybe_convert_prompt(part, tokenizer)
