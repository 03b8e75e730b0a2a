"""The ``--plan`` table and ``--plan --json``: every frame, its key, what it shows, and whether it is
cached or why not (``pipeline.plan.history``), with long prompts' token counts and the soundtrack's beats.
Reads the plan through the recipe views (``FrameJob.view``); imports no torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import typer

from pipeline.audio.timeline import scene_timeline
from pipeline.plan.planner import Plan
from pipeline.plan.prompts import (
    CHUNK_TOKENS,
    T5_TOKENS,
    TokenCount,
    count_tokens,
    load_tokenizer,
    may_be_long,
    t5_tokenizer,
    weighted_tokens,
)
from pipeline.plan.recipe import Blend, Cond, Noise
from pipeline.render.environment import RenderEnv
from pipeline.scene.core import Scene


class _Describe:
    """One-line descriptions of frame conditioning for the plan table and ``--plan --json``."""

    def __init__(self, p: Plan) -> None:
        self.plan = p
        # Frames share their keyframes' blend lists, so each is described once (by identity: the
        # lists live as long as the plan, which outlives this object).
        self._blends: dict[int, str] = {}

    def blend(self, parts: Blend) -> str:
        found = self._blends.get(id(parts))
        if found is None:
            p = self.plan
            if len(parts) == 1:
                found = _short(p.text(parts[0][0]))
            else:
                found = " + ".join(f"{_short(p.text(k), 18)}×{w:g}" for k, w in parts)
            self._blends[id(parts)] = found
        return found

    def cond(self, cond: Cond) -> str:
        kind = cond.kind
        if kind == "grid":
            return f"grid u={cond.u:g} v={cond.v:g}"
        if kind == "walk":
            return f"{self.blend(cond.a)} +{cond.walk_offset:g}"
        if kind == "morph":
            assert cond.b is not None
            return f"{self.blend(cond.a)} → {self.blend(cond.b)} @{cond.t:.3f}"
        return self.blend(cond.a)


def _describe_noise(noise: Noise) -> str:
    kind = noise.kind
    if kind == "circle":
        a, b = noise.circle
        return f"circle {a},{b} s={noise.s:.3f}"
    if kind == "travel":
        return f"{noise.seed}→{noise.to} @{noise.t:.3f}"
    return str(noise.seed)


def _short(text: str, width: int = 32) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _prompt_counts(scene: Scene, env: RenderEnv, p: Plan) -> dict[str, TokenCount]:
    """The token count of each prompt that may pass one window (embedding key -> count), from the
    model's tokenizer on disk; empty when there is none to read (a hub model not downloaded)."""
    # Only texts that may pass one window are counted (a token spans at least one non-space
    # character): a scene of short prompts never reads the tokenizer.
    long = {key: str(r["text"]) for key, r in p.embeddings.items() if may_be_long(str(r["text"]))}
    tokenizer = load_tokenizer(env.tokenizer) if long else None
    if tokenizer is None:
        return {}
    return {
        key: count_tokens(tokenizer, text, scene.prompt_format, scene.long_prompts, env.family)
        for key, text in long.items()
    }


def _t5_cuts(scene: Scene, env: RenderEnv, p: Plan) -> dict[str, tuple[int, str]]:
    """SD3 with ``t5: true``: the prompts T5 cuts (embedding key -> (T5 tokens, the text dropped)).

    T5 takes ``T5_TOKENS - 1`` tokens and its end token whatever ``long_prompts`` says (as diffusers'
    ``max_sequence_length`` 256); counted with the model's ``tokenizer_3/tokenizer.json`` through the
    ``tokenizers`` library (no transformers, no torch), on the fragments the renderer encodes."""
    if env.family != "sd3" or not scene.t5 or env.tokenizer is None:
        return {}
    file = Path(env.tokenizer).parent / "tokenizer_3" / "tokenizer.json"
    # A T5 token spans at least one non-space character, so only texts that may pass a CLIP window
    # (75 of them) can pass T5's 255: most scenes never read this tokenizer.
    long = {key: str(r["text"]) for key, r in p.embeddings.items() if may_be_long(str(r["text"]))}
    if not long or not file.is_file():
        return {}
    t5 = t5_tokenizer(file)

    def tokenize(text: str, **_: Any) -> SimpleNamespace:
        return SimpleNamespace(input_ids=t5.encode(text, add_special_tokens=False).ids)

    keep, out = T5_TOKENS - 1, {}
    for key, text in long.items():
        ids = weighted_tokens(tokenize, text, scene.prompt_format)[0]
        if len(ids) > keep:
            out[key] = (len(ids), t5.decode(ids[keep:]))
    return out


def _frame_tokens(cond: Cond, counts: dict[str, TokenCount]) -> dict[str, Any]:
    """A frame's prompt tokens for ``--plan --json``: the most of its prompts, and any text cut."""
    if not counts:
        return {}  # no prompt may pass one window (most scenes): nothing to look up per frame
    found = [counts[k] for k in cond.embedding_keys() if k in counts]
    if not found:
        return {}
    out: dict[str, Any] = {"tokens": max(c.tokens for c in found), "chunks": max(c.chunks for c in found)}
    cut = [c.cut for c in found if c.cut]
    if cut:
        out["cut"] = cut
    return out


def print_plan(scene: Scene, env: RenderEnv, p: Plan, status: list[str], as_json: bool) -> None:
    describe = _Describe(p)
    counts = _prompt_counts(scene, env, p)
    t5_cuts = _t5_cuts(scene, env, p)
    timeline = scene_timeline(scene)
    beats = set(timeline.ref_frames("beat")) if timeline is not None and timeline.analysis else None
    if as_json:
        rows = []
        for j, s in zip(p, status, strict=True):
            r = j.view
            cond = r.cond
            rows.append(
                {
                    "frame": j.frame,
                    "key": j.key,
                    "cached": s == "cached",
                    "status": s,
                    "prompt": describe.cond(cond),
                    **_frame_tokens(cond, counts),
                    **(
                        {"t5_cut": [t5_cuts[k][1] for k in cond.embedding_keys() if k in t5_cuts]}
                        if t5_cuts and any(k in t5_cuts for k in cond.embedding_keys())
                        else {}
                    ),
                    # The recipe's own dicts, as the frame's key digests them (the LoRA scales too).
                    "cond": cond.raw,
                    "noise": r.noise.raw,
                    "scalars": r.all_scalars,
                    "mode": r.mode.name,
                    **({"beat": j.frame in beats} if beats is not None else {}),
                }
            )
        # One object per line: readable, and without indent the encoder is the fast C one.
        encode = json.JSONEncoder(ensure_ascii=False).encode
        typer.echo("[\n" + ",\n".join(map(encode, rows)) + "\n]")
        return
    typer.echo(
        f"{scene.path.name}: {len(p)} frames, {scene.width}x{scene.height}, {scene.steps} steps, model {env.model} on {env.device}/{env.dtype}"
    )
    header = f"{'frame':>6}  {'key':12}  {'prompt':54}  {'noise':22}  {'values':28}  status"
    typer.echo(header)
    for j, s in zip(p, status, strict=True):
        r = j.view
        values = " ".join(f"{k}={v:g}" for k, v in r.scalars.items())
        if r.mode.name != "txt2img":
            values = f"{r.mode.name} {values}"
        typer.echo(
            f"{j.frame:>6}  {j.key[:12]}  {_short(describe.cond(r.cond), 54):54}  "
            f"{_short(_describe_noise(r.noise), 22):22}  {_short(values, 28):28}  {s}"
        )
    for key, count in counts.items():
        if count.tokens <= CHUNK_TOKENS:
            continue
        text = _short(p.text(key), 40)
        if count.cut:
            typer.echo(
                f"prompt {text!r}: {count.tokens} tokens; the last {count.tokens - CHUNK_TOKENS} are cut: {count.cut!r}"
            )
        else:
            typer.echo(
                f"prompt {text!r}: {count.tokens} tokens, encoded in {count.chunks} chunks of {CHUNK_TOKENS}"
            )
    for key, (tokens, cut) in t5_cuts.items():
        typer.echo(
            f"prompt {_short(p.text(key), 40)!r}: {tokens} T5 tokens; SD3's T5 takes {T5_TOKENS - 1} and "
            f"drops the last {tokens - T5_TOKENS + 1}: {_short(cut, 60)!r}"
        )
    if timeline is not None:
        typer.echo(timeline.describe())  # where the beats fall
    cached = sum(1 for s in status if s == "cached")
    claimed = sum(1 for s in status if s.startswith("claimed by"))
    busy = f" ({claimed} of them being rendered by another process)" if claimed else ""
    typer.echo(f"{cached} cached, {len(status) - cached} to render{busy}")
