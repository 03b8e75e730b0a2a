"""Weighted and long prompts on SD3 (``tiny-sd3``, and a copy of it with a tiny T5 for ``t5: true``):
CLIP-L and CLIP-G chunked and weighted as for SDXL, T5 weighted on its own tokens, laid out as
diffusers' ``StableDiffusion3Pipeline.encode_prompt`` lays out its embeddings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.plan.planner import plan
from pipeline.plan.prompts import PARSER_VERSION, T5_TOKENS
from pipeline.render.environment import resolve_env
from pipeline.scene.load import load_scene
from pipeline.store.cache import CacheDir
from tests.conftest import run_render
from tests.test_prompts import LONG, _key_recipe, _plan_output, _renderer, _scene

ROOT = Path(__file__).resolve().parent.parent

# 'a dog on a hill ,' (6 tokens) and 114 'cat': 120 CLIP tokens, two windows.
LONG_120 = "a dog on a hill, " + "cat " * 114


@pytest.fixture(scope="module")
def with_t5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny-sd3`` with a tiny random T5 encoder (width 128, the transformer's ``joint_attention_dim``)
    and a small Unigram tokenizer in T5's form (``</s>`` appended, ``<pad>`` 0), as ``text_encoder_3`` and
    ``tokenizer_3``: enough to check the T5 rows against diffusers' own without downloading T5."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    out = tmp_path_factory.mktemp("t5") / "tiny-sd3-t5"
    shutil.copytree(ROOT / "pipeline" / "embedded" / "tiny-sd3", out)
    pieces = ["▁a", "▁dog", "▁cat", "▁on", "▁grass", "▁hill", "▁", ","]
    pieces += [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("():.15[]")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(p, -i / 10 - (5.0 if len(p) == 1 else 0.0)) for i, p in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0
    )
    tokenizer.save_pretrained(out / "tokenizer_3")
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(vocab), d_model=128, d_kv=8, d_ff=64, num_layers=1, num_heads=2)
    T5EncoderModel(config).save_pretrained(out / "text_encoder_3")
    index = json.loads((out / "model_index.json").read_text())
    index["text_encoder_3"] = ["transformers", "T5EncoderModel"]
    index["tokenizer_3"] = ["transformers", type(tokenizer).__name__]
    (out / "model_index.json").write_text(json.dumps(index))
    return out


def _setup(tmp_path: Path, model: str, extra: str = "", prompt: str = "(dog:1.5)") -> tuple[object, object]:
    """A renderer on ``model`` and its plan, for a one-frame scene of ``prompt``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    with CacheDir(tmp_path / "cache") as cache:  # read by encode_prompts only, not by _encode
        return _renderer(_scene(tmp_path, extra, prompt, model=model), cache)


def _diffusers(pipe: object, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' own SD3 embeddings of ``text`` (CLIP cut at 77, T5 at 256), as a pipeline call makes
    them (under no_grad: T5's kernels with autograd on round differently)."""
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(  # type: ignore[attr-defined]
            text, None, None, device="cpu", do_classifier_free_guidance=False
        )
    return embeds, pooled


def _mean_kept(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """AUTOMATIC1111's "original" emphasis, written out: weighted, rescaled to the former mean (the
    weights alone where that mean is next to nothing, as ``pipeline.render.encode.emphasis`` rules)."""
    before, after = z.mean(), (z * w.view(1, -1, 1)).mean()
    if min(abs(before), abs(after)) <= 1e-6 * z.abs().mean():
        return z * w.view(1, -1, 1)
    return z * w.view(1, -1, 1) * (before / after)


def _reference(pipe: object, fragments: list[tuple[str, float]]) -> torch.Tensor:
    """The SD3 rule computed with transformers alone: each CLIP's 75-token windows (BOS, tokens, EOS,
    the tokenizer's padding) from its penultimate layer, weighted; the two CLIPs side by side,
    zero-padded to 128; then T5's 256 rows (its fragments' tokens, EOS, padding; weighted) or zeros."""
    sides = []
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):  # type: ignore[attr-defined]
        ids: list[int] = []
        weights: list[float] = []
        for text, weight in fragments:
            got = tokenizer(text, add_special_tokens=False).input_ids
            ids, weights = ids + got, weights + [weight] * len(got)
        out = []
        for start in range(0, len(ids), 75):
            window = ids[start : start + 75]
            fill = 75 - len(window)
            full = [tokenizer.bos_token_id, *window, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * fill
            w = torch.tensor([1.0, *weights[start : start + 75], 1.0] + [1.0] * fill)
            with torch.no_grad():
                z = encoder(torch.tensor([full]), output_hidden_states=True).hidden_states[-2]
            out.append(_mean_kept(z, w))
        sides.append(torch.cat(out, dim=1))
    clip = torch.nn.functional.pad(torch.cat(sides, dim=-1), (0, 128 - 64))
    t5_tok, t5 = getattr(pipe, "tokenizer_3", None), getattr(pipe, "text_encoder_3", None)
    if t5 is None:
        return torch.cat([clip, torch.zeros(1, T5_TOKENS, 128)], dim=1)
    ids, weights = [], []
    for text, weight in fragments:
        got = t5_tok(text, add_special_tokens=False).input_ids
        ids, weights = ids + got, weights + [weight] * len(got)
    fill = T5_TOKENS - 1 - len(ids)
    full = [*ids, t5_tok.eos_token_id] + [t5_tok.pad_token_id] * fill
    with torch.no_grad():
        z = t5(torch.tensor([full]))[0]
    return torch.cat([clip, _mean_kept(z, torch.tensor([*weights, 1.0] + [1.0] * fill))], dim=1)


@pytest.mark.parametrize("t5", [False, True])
def test_sd3_unweighted_short_prompt_is_diffusers_own(tmp_path: Path, with_t5: Path, t5: bool) -> None:
    model, extra = (str(with_t5), "t5: true\n") if t5 else ("tiny-sd3", "")
    renderer, jobs = _setup(tmp_path, model, extra)
    prompts = _key_recipe(jobs)["prompts"]
    assert prompts == {"format": "weighted", "long": "chunk", "parser": PARSER_VERSION}
    embeds, pooled = _diffusers(renderer.pipe, "a dog on grass")
    # The weighted path with weights of 1 and one window: diffusers' own embeddings, bit for bit.
    ours = renderer._encode("a dog on grass", prompts)
    assert ours["prompt_embeds"].shape == (1, 77 + T5_TOKENS, 128)
    assert torch.equal(ours["prompt_embeds"], embeds)
    assert torch.equal(ours["pooled_prompt_embeds"], pooled)
    # And the plain path (a short prompt without syntax is keyed as before: no 'prompts').
    assert torch.equal(renderer._encode("a dog on grass")["prompt_embeds"], embeds)
    (tmp_path / "short").mkdir()
    scene = load_scene(_scene(tmp_path / "short", extra, "a dog on grass", model=model))
    assert "prompts" not in _key_recipe(plan(scene, resolve_env(scene, device="cpu")))


@pytest.mark.parametrize("t5", [False, True])
def test_sd3_weight_changes_the_conditioning(tmp_path: Path, with_t5: Path, t5: bool) -> None:
    model, extra = (str(with_t5), "t5: true\n") if t5 else ("tiny-sd3", "")
    renderer, jobs = _setup(tmp_path, model, extra)
    prompts = _key_recipe(jobs)["prompts"]
    plain = renderer._encode("dog", prompts)
    weighted = renderer._encode("(dog:1.5)", prompts)
    diff = (weighted["prompt_embeds"] - plain["prompt_embeds"]).abs()
    assert diff[:, :77].max() > 1e-2  # the CLIP rows
    assert bool(diff[:, 77:].max() > 1e-2) is t5  # T5's rows (zeros without T5)
    assert torch.equal(weighted["pooled_prompt_embeds"], plain["pooled_prompt_embeds"])  # unweighted
    expected = _reference(renderer.pipe, [("dog", 1.5)])
    assert torch.allclose(weighted["prompt_embeds"], expected, atol=1e-6, rtol=0)
    # Weighted and long at once: the weights follow their tokens into the second window.
    text = "a (dog:1.3), " + "cat " * 90 + "[hill]"
    both = renderer._encode(text, prompts)["prompt_embeds"]
    parts = [("a ", 1.0), ("dog", 1.3), (", " + "cat " * 90, 1.0), ("hill", 1 / 1.1)]
    assert torch.allclose(both, _reference(renderer.pipe, parts), atol=1e-6, rtol=0)


def test_sd3_long_prompt_is_chunked_and_differs_from_the_cut_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    renderer, jobs = _setup(tmp_path / "a", "tiny-sd3", prompt=LONG_120)
    recipe = _key_recipe(jobs)
    assert recipe["prompts"] == {"format": "weighted", "long": "chunk", "parser": PARSER_VERSION}
    chunked = renderer._encode(LONG_120, recipe["prompts"])
    assert chunked["prompt_embeds"].shape == (1, 2 * 77 + T5_TOKENS, 128)
    cut_embeds, cut_pooled = _diffusers(renderer.pipe, LONG_120)
    # First window: the cut prompt's; then the second window; then the T5 rows, all as diffusers'.
    assert torch.equal(chunked["prompt_embeds"][:, :77], cut_embeds[:, :77])
    assert torch.equal(chunked["prompt_embeds"][:, 154:], cut_embeds[:, 77:])
    assert torch.equal(chunked["pooled_prompt_embeds"], cut_pooled)
    empty, _ = _diffusers(renderer.pipe, "")
    assert (chunked["prompt_embeds"][:, 77:154] - empty[:, :77]).abs().max() > 1e-2
    assert torch.allclose(chunked["prompt_embeds"], _reference(renderer.pipe, [(LONG_120, 1.0)]), atol=1e-6)
    # long_prompts: truncate: diffusers' own cut embeddings, with a warning of what was cut.
    capsys.readouterr()
    renderer, jobs = _setup(tmp_path / "b", "tiny-sd3", "long_prompts: truncate\n", LONG_120)
    prompts = _key_recipe(jobs)["prompts"]
    assert prompts["long"] == "truncate"
    cut = renderer._encode(LONG_120, prompts)
    assert torch.equal(cut["prompt_embeds"], cut_embeds)
    err = capsys.readouterr().err
    assert "is 120 tokens; long_prompts: truncate drops the last 45: 'cat cat" in err


def test_sd3_plain_format_passes_the_brackets_as_text(tmp_path: Path) -> None:
    renderer, jobs = _setup(tmp_path / "a", "tiny-sd3", "prompt_format: plain\n", "a (dog:1.5)")
    assert "prompts" not in _key_recipe(jobs)  # short: diffusers' own encoding, keyed as before
    literal = renderer._encode("a (dog:1.5)")["prompt_embeds"]
    assert torch.equal(literal, _diffusers(renderer.pipe, "a (dog:1.5)")[0])
    weighted_renderer, jobs = _setup(tmp_path / "b", "tiny-sd3", "", "a (dog:1.5)")
    weighted = weighted_renderer._encode("a (dog:1.5)", _key_recipe(jobs)["prompts"])["prompt_embeds"]
    assert (literal - weighted).abs().max() > 1e-2


def test_a_t5_prompt_past_256_tokens_is_cut_with_a_warning(
    tmp_path: Path, with_t5: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = "dog " * 300  # 300 CLIP tokens (4 windows) and 300 T5 tokens
    renderer, jobs = _setup(tmp_path, str(with_t5), "t5: true\n", text)
    capsys.readouterr()
    entry = renderer._encode(text, _key_recipe(jobs)["prompts"])
    assert entry["prompt_embeds"].shape == (1, 4 * 77 + T5_TOKENS, 128)
    # T5's rows are diffusers' own (it cuts at max_sequence_length 256 too).
    assert torch.equal(entry["prompt_embeds"][:, 4 * 77 :], _diffusers(renderer.pipe, text)[0][:, 77:])
    err = capsys.readouterr().err
    assert "is 300 T5 tokens; SD3's T5 takes 255 (diffusers' max_sequence_length 256" in err
    assert "drops the last 45: 'dog dog" in err
    # One CLIP window (75 tokens) but 301 T5 tokens: diffusers' own encoding, keyed as before, and
    # the T5 cut is said all the same (diffusers' own warning is silenced).
    text = "x" * 300
    renderer, jobs = _setup(tmp_path / "short", str(with_t5), "t5: true\n", text)
    assert "prompts" not in _key_recipe(jobs)
    capsys.readouterr()
    assert torch.equal(renderer._encode(text)["prompt_embeds"], _diffusers(renderer.pipe, text)[0])
    assert "is 301 T5 tokens; SD3's T5 takes 255" in capsys.readouterr().err


@pytest.mark.parametrize("t5", [False, True])
def test_sd3_morph_with_weighted_and_long_prompts_renders(tmp_path: Path, with_t5: Path, t5: bool) -> None:
    # A morph from a long prompt (two windows) to a weighted one (one window), against a weighted
    # negative prompt: the embeddings are padded to two windows before T5's rows to blend.
    model = str(with_t5) if t5 else "tiny-sd3"
    path = tmp_path / "scene.yaml"
    path.write_text(
        f"model: {model}\nsize: [32, 32]\nsteps: 2\nframes: 3\nnoise: fixed\n{'t5: true' if t5 else ''}\n"
        f"negative_prompt: '[blurry]'\nkeyframes:\n  - {{frame: 0, prompt: {LONG!r}}}\n"
        "  - {frame: 2, prompt: 'a (dog:1.5) on a hill'}\n",
        encoding="utf-8",
    )
    assert run_render(path, tmp_path / "cache", "--batch-size", "3")["rendered"] == 3
    # The last frame (one window) rendered alone: the same bytes as in its batch with longer prompts.
    alone = tmp_path / "alone"
    alone.mkdir()
    text = path.read_text(encoding="utf-8").replace("frames: 3", "frames: 1")
    text = text.replace(f"  - {{frame: 0, prompt: {LONG!r}}}\n", "").replace("frame: 2", "frame: 0")
    (alone / "scene.yaml").write_text(text, encoding="utf-8")
    assert run_render(alone / "scene.yaml", alone / "cache")["rendered"] == 1
    keys = []
    for scene_path, frame in ((path, 2), (alone / "scene.yaml", 0)):
        scene = load_scene(scene_path)
        keys.append(plan(scene, resolve_env(scene, device="cpu"))[frame].key)
    assert keys[0] == keys[1]
    with CacheDir(tmp_path / "cache") as mixed, CacheDir(alone / "cache") as single:
        assert mixed.frames.get(keys[0]) == single.frames.get(keys[1]) is not None


def test_sd3_plan_shows_token_counts_and_chunks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _scene(tmp_path, "", LONG_120, frames=2, model="tiny-sd3")
    out = _plan_output(path, capsys)
    assert "prompt 'a dog on a hill, cat cat cat cat cat ca…': 120 tokens, encoded in 2 chunks of 75\n" in out
    rows = json.loads(_plan_output(path, capsys, "--json"))
    assert (rows[0]["tokens"], rows[0]["chunks"], "cut" in rows[0]) == (120, 2, False)
    path.write_text(path.read_text().replace("steps: 2", "steps: 2\nlong_prompts: truncate"))
    assert "120 tokens; the last 45 are cut: 'cat cat cat" in _plan_output(path, capsys)


def test_sd3_padding_goes_between_the_clip_windows_and_t5(tmp_path: Path, with_t5: Path) -> None:
    # A one-window prompt blended with a two-window one is padded with the empty prompt's CLIP window
    # after its own window and before its T5 rows, so that windows meet windows and T5 rows T5 rows.
    path = tmp_path / "scene.yaml"
    path.write_text(
        f"model: {with_t5}\nt5: true\nsize: [32, 32]\nsteps: 2\nframes: 3\n"
        f"keyframes:\n  - {{frame: 0, prompt: {LONG!r}}}\n  - {{frame: 2, prompt: 'a (dog:1.5)'}}\n",
        encoding="utf-8",
    )
    with CacheDir(tmp_path / "cache") as cache:
        renderer, jobs = _renderer(path, cache)
        blend = jobs[1]
        short = blend.recipe["cond"]["b"][0][0]
        renderer.encode_prompts(
            [short, blend.recipe["cond"]["a"][0][0], *[k for k, _ in blend.recipe["neg"]["a"]]]
        )
        assert renderer._chunks(blend) == 2
        own, empty = renderer.embeddings[short]["prompt_embeds"], renderer._encode("")["prompt_embeds"]
        with renderer._padded(2, [blend]):
            padded = renderer.embeddings[short]["prompt_embeds"]
        assert padded.shape == (1, 2 * 77 + T5_TOKENS, 128)
        assert torch.equal(padded[:, :77], own[:, :77])
        assert torch.equal(padded[:, 77:154], empty[:, :77])
        assert torch.equal(padded[:, 154:], own[:, 77:])


def test_sd3_plan_shows_what_t5_cuts(
    tmp_path: Path, with_t5: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The same count and text the render's warning gives (test_a_t5_prompt_past_256_tokens_is_cut_with_a_warning),
    # before any model loads: 300 T5 tokens, 255 kept.
    path = _scene(tmp_path, "t5: true\n", "dog " * 300, model=str(with_t5))
    # --plan counts without transformers, as transformers' T5Tokenizer (which renders) tokenizes.
    from transformers import AutoTokenizer

    from pipeline.plan.prompts import t5_tokenizer

    ours = t5_tokenizer(with_t5 / "tokenizer_3" / "tokenizer.json")
    theirs = AutoTokenizer.from_pretrained(with_t5 / "tokenizer_3")
    for text in ["dog " * 300, "  a dog  on\n grass, ", "(dog:1.5) cat", "a\t\tdog"]:
        assert (
            ours.encode(text, add_special_tokens=False).ids
            == theirs(text, add_special_tokens=False).input_ids
        )
    out = _plan_output(path, capsys)
    assert (
        "prompt 'dog dog dog dog dog dog dog dog dog dog…': 300 T5 tokens; SD3's T5 takes 255 and drops the last 45: 'dog dog dog"
        in out
    )
    rows = json.loads(_plan_output(path, capsys, "--json"))
    assert rows[0]["t5_cut"] == ["dog " * 44 + "dog"]
    # Without T5 nothing is cut there, and a short prompt is never counted.
    path.write_text(path.read_text().replace("t5: true\n", ""))
    assert "T5 tokens" not in _plan_output(path, capsys)
    (tmp_path / "short").mkdir()
    short = _scene(tmp_path / "short", "t5: true\n", "a dog", model=str(with_t5))
    assert "T5 tokens" not in _plan_output(short, capsys)
