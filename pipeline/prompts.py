"""Prompt text -> CLIP tokens: AUTOMATIC1111 attention weighting and 75-token chunks.

The syntax is AUTOMATIC1111's (``modules/prompt_parser.py``, ``parse_prompt_attention``):
``(word)`` multiplies the attention to ``word`` by 1.1, ``[word]`` divides it by 1.1, ``(word:1.3)``
sets the factor, brackets nest and multiply, and ``\\(`` ``\\)`` ``\\[`` ``\\]`` are literal brackets.
A prompt longer than one CLIP window is cut into chunks of 75 tokens, each encoded on its own between
BOS and EOS and the results joined along the sequence, as AUTOMATIC1111 and compel do::

    parse_weighted("a (red:1.5) [cat]")   # [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('cat', 0.909...)]
    ids, weights = weighted_tokens(tokenizer, "a (red:1.5) cat", "weighted")
    chunks = chunked(ids, weights, tokenizer, "chunk")

Nothing here imports torch: the planner uses :func:`may_need_parser` to decide what goes into an
embedding's key, and the renderer (``pipeline.renderer``) encodes the chunks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# Bump when the parse or the chunking changes: it is in every key of a prompt that goes through here.
PARSER_VERSION = 1

# Tokens of one chunk between its BOS and EOS (CLIP's window of 77 less the two).
CHUNK_TOKENS = 75

_SYNTAX = re.compile(r"[()\[\]\\]")

# AUTOMATIC1111's tokenizer of the attention syntax, less BREAK (not supported: it stays text).
_ATTENTION = re.compile(
    r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|]|
[^\\()\[\]:]+|
:
""",
    re.X,
)


def parse_weighted(text: str) -> list[tuple[str, float]]:
    """``text`` as (fragment, weight) pairs, neighbours of equal weight merged (AUTOMATIC1111's rule).

    Unclosed brackets weigh to the end of the text; a stray ``)`` or ``]`` is literal text.
    """
    res: list[list[Any]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= factor

    for m in _ATTENTION.finditer(text):
        part, weight = m.group(0), m.group(1)
        if part.startswith("\\"):
            res.append([part[1:], 1.0])
        elif part == "(":
            round_open.append(len(res))
        elif part == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif part == ")" and round_open:
            multiply(round_open.pop(), 1.1)
        elif part == "]" and square_open:
            multiply(square_open.pop(), 1 / 1.1)
        else:
            res.append([part, 1.0])
    for pos in round_open:
        multiply(pos, 1.1)
    for pos in square_open:
        multiply(pos, 1 / 1.1)
    if not res:
        return [("", 1.0)]
    merged = [res[0]]
    for part, weight in res[1:]:
        if weight == merged[-1][1]:
            merged[-1][0] += part
        else:
            merged.append([part, weight])
    return [(str(p), float(w)) for p, w in merged]


def has_syntax(text: str) -> bool:
    return bool(_SYNTAX.search(text))


def may_need_parser(text: str, prompt_format: str, learned: list[str]) -> bool:
    """Whether ``text`` may encode differently from diffusers' plain ``encode_prompt``.

    It may when it has weighting syntax (and weighting is on) or may be longer than one chunk. A BPE
    token spans at least one non-space character, so a text of at most 75 of them fits, unless a
    learned embedding's token (several vectors, several tokens) is in it. Keys of the other texts stay
    as they were before long prompts and weighting existed.
    """
    if prompt_format == "weighted" and has_syntax(text):
        return True
    if any(token and token in text for token in learned):
        return True
    return len("".join(text.split())) > CHUNK_TOKENS


def weighted_tokens(
    tokenizer: Any, text: str, prompt_format: str, convert: Any = None
) -> tuple[list[int], list[float]]:
    """The token ids of ``text`` (no BOS/EOS) and each one's weight.

    ``convert``: a function applied to each fragment before tokenizing (diffusers'
    ``maybe_convert_prompt``, which expands a learned embedding's token into its vectors' tokens).
    """
    parts = parse_weighted(text) if prompt_format == "weighted" else [(text, 1.0)]
    ids: list[int] = []
    weights: list[float] = []
    for part, weight in parts:
        if convert is not None:
            part = convert(part)
        got = tokenizer(part, add_special_tokens=False, truncation=False).input_ids
        ids += got
        weights += [weight] * len(got)
    return ids, weights


@dataclass(frozen=True)
class Chunks:
    """A prompt's CLIP windows: each of ``window`` ids (BOS, 75 tokens or padding, EOS) and weights."""

    ids: list[list[int]]
    weights: list[list[float]]
    masks: list[list[int]]  # the tokenizer's attention mask: 1 up to EOS, 0 on the padding
    tokens: int  # the prompt's tokens, without BOS/EOS
    dropped: list[int]  # the ids cut off (long_prompts: truncate)


def chunked(ids: list[int], weights: list[float], tokenizer: Any, long_prompts: str) -> Chunks:
    """Cut ``ids`` into 75-token chunks (or keep the first, ``long_prompts: truncate``), each padded
    with the tokenizer's pad token (EOS for SD 1.x, ``!`` for SD 2.x, as diffusers pads) to 75 and
    put between BOS and EOS."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    keep = ids if long_prompts == "chunk" else ids[:CHUNK_TOKENS]
    out_ids: list[list[int]] = []
    out_weights: list[list[float]] = []
    masks: list[list[int]] = []
    for start in range(0, max(len(keep), 1), CHUNK_TOKENS):
        part = keep[start : start + CHUNK_TOKENS]
        part_w = weights[start : start + CHUNK_TOKENS]
        fill = CHUNK_TOKENS - len(part)
        out_ids.append([bos, *part, eos] + [pad] * fill)
        out_weights.append([1.0, *part_w, 1.0] + [1.0] * fill)
        masks.append([1] * (len(part) + 2) + [0] * fill)
    return Chunks(out_ids, out_weights, masks, len(ids), ids[len(keep) :])
