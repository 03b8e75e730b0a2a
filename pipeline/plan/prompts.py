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
embedding's key, and the renderer (``pipeline.render.renderer``) encodes the chunks.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Bump when the parse or the chunking changes: it is in every key of a prompt that goes through here.
PARSER_VERSION = 1

# The model families whose prompts are weighted and chunked here (SD3: its two CLIP encoders; its T5,
# when on, is weighted on its own tokens, see ``T5_TOKENS``).
WEIGHTED_FAMILIES = ("sd", "sdxl", "sd3")

# Tokens of one chunk between its BOS and EOS (CLIP's window of 77 less the two).
CHUNK_TOKENS = 75

# SD3's T5 sequence: diffusers' ``max_sequence_length`` default (its EOS included). Every SD3 embedding
# ends with these rows (T5's, or zeros without T5); T5 tokens past it are cut, with a warning.
T5_TOKENS = 256

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
            start = round_open.pop()
            try:
                factor = float(weight)
            except ValueError:  # ':1.2.3)' or ':.)': AUTOMATIC1111 raises; here it is text, ')' closes
                res.append([part[: part.rindex(")")], 1.0])
                factor = 1.1
            multiply(start, factor)
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


def may_need_parser(
    text: str, prompt_format: str, learned: list[str], tokenizer: Any = None, tokens: int | None = None
) -> bool:
    """Whether ``text`` may encode differently from diffusers' plain ``encode_prompt``.

    It may when it has weighting syntax (and weighting is on) or is longer than one chunk: ``tokens``
    long when its count is known (:func:`token_counts`), else counted with ``tokenizer`` when there is
    one, else when it has more than 75 non-space characters (a BPE token spans at least one), and
    whenever a learned embedding's token (several vectors, several tokens) is in it. Keys of the other
    texts stay as they were before long prompts and weighting.
    """
    if prompt_format == "weighted" and has_syntax(text):
        return True
    if any(token and token in text for token in learned):
        return True
    if not may_be_long(text):
        return False
    if tokens is not None:
        return tokens > CHUNK_TOKENS
    return tokenizer is None or len(tokenizer(text).input_ids) > CHUNK_TOKENS


def may_be_long(text: str) -> bool:
    """Whether ``text`` may have more than 75 tokens: a BPE token spans at least one non-space character."""
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
        # verbose=False: transformers would warn of a sequence past the window, which is what we handle.
        got = tokenizer(part, add_special_tokens=False, truncation=False, verbose=False).input_ids
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


@dataclass(frozen=True)
class TokenCount:
    """What ``--plan`` says of one prompt: its tokens, the windows it is encoded in, the text cut."""

    tokens: int
    chunks: int
    cut: str  # the text the encoding drops ('' when none)


def count_tokens(tokenizer: Any, text: str, prompt_format: str, long_prompts: str, family: str) -> TokenCount:
    """Count ``text``'s CLIP tokens as the renderer will encode them (chunked or cut as the scene says;
    SD3's T5 tokens are not counted here). A learned embedding's token counts as one token here."""
    fmt = prompt_format if family in WEIGHTED_FAMILIES else "plain"
    ids = weighted_tokens(tokenizer, text, fmt)[0]
    if family in WEIGHTED_FAMILIES and long_prompts == "chunk":
        return TokenCount(len(ids), max(1, -(-len(ids) // CHUNK_TOKENS)), "")
    cut = tokenizer.decode(ids[CHUNK_TOKENS:]) if len(ids) > CHUNK_TOKENS else ""
    return TokenCount(len(ids), 1, cut)


class _Ids:
    def __init__(self, ids: list[int]) -> None:
        self.input_ids = ids


class ClipTokenizer:
    """CLIP's tokenizer from a diffusers ``tokenizer`` folder (``vocab.json``, ``merges.txt``), built
    with the ``tokenizers`` library as transformers' CLIP converter builds it, so that ``--plan`` and
    the planner count tokens without importing transformers or torch. Called as transformers'
    tokenizers are (``tokenizer(text, add_special_tokens=False).input_ids``); tests/test_prompts.py
    checks that it gives transformers' ids."""

    def __init__(self, folder: str) -> None:
        from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

        bpe = models.BPE.from_file(
            f"{folder}/vocab.json",
            f"{folder}/merges.txt",
            unk_token="<|endoftext|>",
            end_of_word_suffix="</w>",
            continuing_subword_prefix="",
            fuse_unk=False,
        )
        tok = Tokenizer(bpe)
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(
                    Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                    behavior="removed",
                    invert=True,
                ),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        self._tok = tok

    def __call__(self, text: str, **_: Any) -> _Ids:
        return _Ids(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids`` as transformers' CLIP tokenizer decodes it (words apart, bytes joined)."""
        text = "".join(self._tok.id_to_token(i) or "" for i in ids).replace("</w>", " ")
        return bytes(_BYTE_OF.get(c, 32) for c in text).decode("utf-8", errors="replace").strip()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's (and CLIP's) reversible map of bytes to printable characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(b)
        else:
            chars.append(256 + extra)
            extra += 1
    return dict(zip(range(256), map(chr, chars), strict=True))


_BYTE_OF = {c: b for b, c in _bytes_to_unicode().items()}


_TOKENIZERS: dict[str, ClipTokenizer | None] = {}


def load_tokenizer(folder: str | None) -> ClipTokenizer | None:
    """The tokenizer of a ``tokenizer`` folder (once per process), or None where it cannot be read."""
    if folder is None:
        return None
    if folder not in _TOKENIZERS:
        try:
            _TOKENIZERS[folder] = ClipTokenizer(folder)
        except Exception:  # missing or unreadable files: the render will say so; --plan counts nothing
            _TOKENIZERS[folder] = None
    return _TOKENIZERS[folder]


def t5_tokenizer(file: Path) -> Any:
    """SD3's T5 tokenizer of a ``tokenizer.json`` as transformers' ``T5Tokenizer`` builds it (which the
    renderer uses): the file's Unigram model, SentencePiece's character map as the only normalizer,
    whitespace split then Metaspace (so runs of spaces and line breaks count as one)."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers

    t5 = Tokenizer.from_file(str(file))
    spec = json.loads(file.read_text(encoding="utf-8")).get("normalizer") or {}
    maps = [n for n in [spec, *spec.get("normalizers", [])] if n and n.get("type") == "Precompiled"]
    charsmap = maps[0].get("precompiled_charsmap") if maps else None
    t5.normalizer = normalizers.Precompiled(base64.b64decode(charsmap)) if charsmap else None
    t5.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    t5.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    return t5


def scene_texts(scene: Any) -> list[str]:
    """Every prompt text a scene's frames are encoded from, each once: the keyframes' prompts (each
    text of a blend) and negative prompts, the scene's negative prompt, a walk's or a grid's prompts."""
    texts: list[str] = [scene.negative_prompt]
    for kf in scene.keyframes:
        texts += [part.text for part in kf.prompt or ()]
        if kf.negative_prompt is not None:
            texts.append(kf.negative_prompt)
    if scene.walk is not None:
        texts.append(scene.walk.prompt)
    if scene.grid is not None:
        texts += scene.grid.prompts
    return list(dict.fromkeys(texts))


def _count_entry(tokenizer_fingerprint: str, text: str) -> str:
    # Apart from the file-hash entries (stamps) of the same memo; the text by its digest (texts are long).
    return "tokens " + hashlib.sha256(f"{tokenizer_fingerprint}\0{text}".encode()).hexdigest()


def token_counts(
    folder: str | None, fingerprint: str | None, texts: Iterable[str], memo: MutableMapping[str, Any]
) -> dict[str, int]:
    """The token count of each of ``texts`` that may pass one window (text -> count), with the tokenizer
    in ``folder`` whose files' hash is ``fingerprint``: from ``memo`` where it has them, else counted
    (reading the tokenizer only then, about 0.05 s) and remembered in ``memo``.

    The memo is the one the file hashes are kept in (``pipeline.store.records.FILE_DIGESTS``), so a
    no-op re-run of a scene with long prompts never reads the tokenizer. Empty without a tokenizer.
    """
    out: dict[str, int] = {}
    if folder is None or not fingerprint:
        return out
    tokenizer = None
    for text in texts:
        if not may_be_long(text):
            continue  # a text of 75 non-space characters or fewer fits: no count needed
        entry = _count_entry(fingerprint, text)
        count = memo.get(entry)
        if type(count) is not int:
            if tokenizer is None:
                tokenizer = load_tokenizer(folder)
                if tokenizer is None:
                    return out  # unreadable: the planner cannot count either
            count = memo[entry] = len(tokenizer(text).input_ids)
        out[text] = count
    return out
