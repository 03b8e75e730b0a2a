"""Embedding keys: the key of each prompt text's embedding, and the table the renderer encodes from.

An embedding's key names what makes its bytes: the family, the text encoders' fingerprints, clip
skip, T5, learned embeddings, device, dtype and the libraries that compute it; and, for a text that
may encode otherwise than diffusers' plain ``encode_prompt`` (weighting syntax, or longer than one
CLIP window), the prompt format and parser::

    emb = Embeddings(scene, env)
    emb.key("a red cat")                      # '3f1c...' (64 hex)
    emb.blend(parts)                          # [['3f1c...', 0.5], ['9a2b...', 0.5]]
    emb.table['3f1c...']["text"]              # 'a red cat'
"""

from __future__ import annotations

from typing import Any

from pipeline.plan.keys import key_of, round_float
from pipeline.plan.prompts import (
    PARSER_VERSION,
    WEIGHTED_FAMILIES,
    load_tokenizer,
    may_be_long,
    may_need_parser,
)
from pipeline.render.environment import RenderEnv
from pipeline.render.models import T5_COMPONENTS, TEXT_COMPONENTS
from pipeline.scene.core import Scene
from pipeline.scene.schema import PromptPart

EMBEDDING_VERSION = 1
# The libraries whose code makes an embedding's bytes: torch (the numerics), transformers (the text
# encoders), tokenizers (the token ids) and diffusers (its ``encode_prompt`` picks the layer, pads,
# truncates and loads textual inversions). An upgrade of any of them must not reuse old embeddings.
EMBEDDING_LIBRARIES: tuple[str, ...] = ("diffusers", "tokenizers", "torch", "transformers")


class Embeddings:
    """Makes (and remembers) the key of each prompt text's embedding."""

    def __init__(self, scene: Scene, env: RenderEnv):
        components = TEXT_COMPONENTS.get(env.family, TEXT_COMPONENTS["sd"])
        if env.family == "sd3" and scene.t5:
            components = components + T5_COMPONENTS
        self.common = {
            "kind": "embedding",
            "v": EMBEDDING_VERSION,
            "family": env.family,
            "encoders": {c: env.fingerprint.get(c, "") for c in components},
            "clip_skip": scene.clip_skip,
            "t5": bool(scene.t5 and env.family == "sd3"),
            "learned": [[e.token or "", env.files[e.path]] for e in scene.embeddings],
            "device": env.device,
            "dtype": env.dtype,
            "libraries": {k: v for k, v in env.libraries.items() if k in EMBEDDING_LIBRARIES},
        }
        # Texts that may encode otherwise than diffusers' plain encode_prompt (weighting
        # syntax, or longer than one CLIP window) name the prompt format and parser in their key; the
        # keys of the other texts stay as they were before weighting and long prompts existed.
        self.prompts = (
            {"format": scene.prompt_format, "long": scene.long_prompts, "parser": PARSER_VERSION}
            if env.family in WEIGHTED_FAMILIES
            else None
        )
        self.learned = [e.token or "" for e in scene.embeddings]
        self._tokenizer_folder = env.tokenizer
        # Counts made with the env's tokenizer; none where there is none to count with.
        self._token_counts = env.token_counts if env.tokenizer is not None else {}
        self.by_text: dict[str, str] = {}
        self.table: dict[str, dict[str, Any]] = {}
        self.blends: dict[tuple[tuple[str, float], ...], list[list[Any]]] = {}

    def key(self, text: str) -> str:
        found = self.by_text.get(text)
        if found is None:
            recipe = {**self.common, "text": text}
            if self.prompts and self._may_need_parser(text):
                recipe["prompts"] = self.prompts
            found = key_of(recipe)
            self.by_text[text] = found
            self.table[found] = recipe
        return found

    def _may_need_parser(self, text: str) -> bool:
        fmt = str(self.prompts["format"])  # type: ignore[index]
        count = self._token_counts.get(text)
        if count is not None:  # counted on an earlier run (kept in the cache: RenderEnv.token_counts)
            return may_need_parser(text, fmt, self.learned, tokens=count)
        # The tokenizer is read only for a text that may be long (most scenes never read it).
        tokenizer = load_tokenizer(self._tokenizer_folder) if may_be_long(text) else None
        return may_need_parser(text, fmt, self.learned, tokenizer)

    def blend(self, parts: list[PromptPart]) -> list[list[Any]]:
        """A prompt as [[embedding key, weight], ...]; equal prompts give the same (shared) list."""
        sig = tuple((p.text, p.weight) for p in parts)
        found = self.blends.get(sig)
        if found is None:
            total = sum(p.weight for p in parts)
            found = self.blends[sig] = [[self.key(p.text), round_float(p.weight / total)] for p in parts]
        return found
