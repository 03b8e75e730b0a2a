"""Weighted and long prompts (SD 1.x/2.x): AUTOMATIC1111's attention syntax, 75-token chunks, the
``prompt_format: plain`` and ``long_prompts: truncate`` opt-outs, what goes into the embedding keys,
and a render with them on the embedded ``tiny`` model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pipeline.plan.planner import plan
from pipeline.plan.prompts import PARSER_VERSION, parse_weighted
from pipeline.render.environment import resolve_env
from pipeline.render.models import load_pipeline, resolve_model
from pipeline.render.renderer import FrameRenderer, configure
from pipeline.scene.load import load_scene
from pipeline.store.cache import CacheDir
from tests.conftest import run_render

ROOT = Path(__file__).resolve().parent.parent

LONG = "a dog on a hill, " + "cat " * 100  # 'a dog on a hill ,' (6 tokens) and 100 'cat': 106 tokens


def test_parse_follows_automatic1111() -> None:
    assert parse_weighted("a (red:1.5) [cat]") == [("a ", 1.0), ("red", 1.5), (" ", 1.0), ("cat", 1 / 1.1)]
    assert parse_weighted("((dog))") == [("dog", 1.1 * 1.1)]
    assert parse_weighted(r"\(dog\) [x") == [("(dog) ", 1.0), ("x", 1 / 1.1)]  # unclosed: to the end
    assert parse_weighted("a) b:c") == [("a) b:c", 1.0)]  # stray brackets and colons are text
    assert parse_weighted("") == [("", 1.0)]
    # A weight that is no number (AUTOMATIC1111 raises ValueError): text, and the bracket closes.
    assert parse_weighted("(a:1.2.3) b") == [("a:1.2.3", 1.1), (" b", 1.0)]
    assert parse_weighted("(a:.)") == [("a:.", 1.1)]


def _scene(
    folder: Path, extra: str = "", prompt: str = "a dog", frames: int = 1, model: str = "tiny"
) -> Path:
    path = folder / "scene.yaml"
    path.write_text(
        f"model: {model}\nsize: [32, 32]\nsteps: 2\nframes: {frames}\n{extra}"
        f"keyframes:\n  - {{frame: 0, prompt: {prompt!r}}}\n",
        encoding="utf-8",
    )
    return path


def _renderer(path: Path, cache: CacheDir) -> tuple[FrameRenderer, object]:
    scene = load_scene(path)
    ref = resolve_model(scene.model, scene.base_dir)
    jobs = plan(scene, resolve_env(scene, device="cpu", ref=ref))
    pipe = configure(load_pipeline(ref, device="cpu", dtype="float32"), scene)
    return FrameRenderer(pipe, scene, jobs, cache, device="cpu", dtype="float32"), jobs


def _key_recipe(jobs: object) -> dict:
    (recipe,) = [r for r in jobs.embeddings.values() if r["text"] != ""]  # type: ignore[attr-defined]
    return recipe


def _embedding(
    tmp_path: Path, text: str, extra: str = "", *, bias: float = 0.0
) -> tuple[torch.Tensor, FrameRenderer, dict]:
    folder = tmp_path / str(abs(hash((text, extra))))
    folder.mkdir()
    with CacheDir(folder / "cache") as cache:
        renderer, jobs = _renderer(_scene(folder, extra, text), cache)
        if bias:
            with torch.no_grad():
                renderer.pipe.text_encoder.final_layer_norm.bias.fill_(bias)
        recipe = _key_recipe(jobs)
        return renderer._encode(text, recipe.get("prompts"))["prompt_embeds"], renderer, recipe


def _reference(pipe: object, fragments: list[tuple[str, float]]) -> torch.Tensor:
    """The rule computed with transformers alone: each fragment's tokens with its weight, cut in windows
    of 75 between BOS and EOS (padded with the tokenizer's pad token), each window encoded, multiplied
    by its weights and rescaled to its former mean, the windows joined."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder  # type: ignore[attr-defined]
    ids: list[int] = []
    weights: list[float] = []
    for text, weight in fragments:
        got = tokenizer(text, add_special_tokens=False).input_ids
        ids += got
        weights += [weight] * len(got)
    out = []
    for start in range(0, len(ids), 75):
        window = ids[start : start + 75]
        fill = 75 - len(window)
        full = [tokenizer.bos_token_id, *window, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * fill
        w = torch.tensor([1.0, *weights[start : start + 75], 1.0] + [1.0] * fill).view(1, -1, 1)
        with torch.no_grad():
            z = encoder(torch.tensor([full]))[0]
        before, after = z.mean(), (z * w).mean()
        small = min(abs(before), abs(after)) <= 1e-6 * z.abs().mean()
        out.append(z * w if small else z * w * (before / after))
    return torch.cat(out, dim=1)


def test_long_prompt_is_chunked_and_differs_from_the_cut_one(tmp_path: Path) -> None:
    chunked, renderer, recipe = _embedding(tmp_path, LONG)
    assert recipe["prompts"] == {"format": "weighted", "long": "chunk", "parser": PARSER_VERSION}
    assert chunked.shape == (1, 154, 32)  # two windows of 77
    assert torch.allclose(chunked, _reference(renderer.pipe, [(LONG, 1.0)]), atol=1e-6, rtol=0)
    cut, _, cut_recipe = _embedding(tmp_path, LONG, "long_prompts: truncate\n")
    assert cut.shape == (1, 77, 32)
    # The first window is the cut prompt (diffusers' own encoding); the second holds the rest.
    plain, _ = renderer.pipe.encode_prompt(LONG, "cpu", 1, False)
    assert torch.allclose(cut, plain, atol=1e-6, rtol=0)
    assert torch.allclose(chunked[:, :77], cut, atol=1e-6, rtol=0)
    assert (chunked[:, 77:] - renderer._encode("")["prompt_embeds"]).abs().max() > 1e-2
    assert cut_recipe["prompts"]["long"] == "truncate"


def test_truncate_warns_with_the_tokens_dropped_and_the_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _embedding(tmp_path, LONG, "long_prompts: truncate\n")
    err = capsys.readouterr().err
    assert "is 106 tokens; long_prompts: truncate drops the last 31: 'cat cat" in err


@pytest.mark.parametrize("bias", [0.0, 0.1])
def test_weight_changes_the_conditioning_as_automatic1111_computes_it(tmp_path: Path, bias: float) -> None:
    # The tiny model's final layer norm has no bias: its embeddings have a mean of ~0, too small to
    # rescale to. With a bias (as real CLIP encoders have) the mean is rescaled to as AUTOMATIC1111 does.
    weighted, renderer, recipe = _embedding(tmp_path, "a (dog:1.5) on [grass]", bias=bias)
    assert recipe["prompts"]["format"] == "weighted"
    plain, _, plain_recipe = _embedding(tmp_path, "a dog on grass", bias=bias)
    assert "prompts" not in plain_recipe  # a short prompt without syntax: its key as before
    assert (weighted - plain).abs().max() > 1e-2
    expected = _reference(renderer.pipe, [("a ", 1.0), ("dog", 1.5), (" on ", 1.0), ("grass", 1 / 1.1)])
    assert torch.allclose(weighted, expected, atol=1e-6, rtol=0)
    # Weighted and long at once: the weights follow their tokens into the second window.
    text = "a (dog:1.3), " + "cat " * 90 + "[fog]"
    both, _, _ = _embedding(tmp_path, text, bias=bias)
    parts = [("a ", 1.0), ("dog", 1.3), (", " + "cat " * 90, 1.0), ("fog", 1 / 1.1)]
    assert torch.allclose(both, _reference(renderer.pipe, parts), atol=1e-6, rtol=0)


def test_plain_format_passes_the_text_literally(tmp_path: Path) -> None:
    literal, renderer, recipe = _embedding(tmp_path, "a (dog:1.5)", "prompt_format: plain\n")
    assert "prompts" not in recipe  # short: diffusers' own encoding, keyed as before
    expected, _ = renderer.pipe.encode_prompt("a (dog:1.5)", "cpu", 1, False)
    assert torch.equal(literal, expected)
    weighted, _, _ = _embedding(tmp_path, "a (dog:1.5)")
    assert (literal - weighted).abs().max() > 1e-2


def test_render_with_weighted_and_long_prompts(tmp_path: Path) -> None:
    # Frame 0 a long prompt (two windows), frame 1 a weighted one (one window), both against a short
    # negative prompt: frames of different lengths render in calls of their own, each padded to its own.
    path = tmp_path / "scene.yaml"
    path.write_text(
        "model: tiny\nsize: [32, 32]\nsteps: 2\nframes: 2\nnoise: fixed\nnegative_prompt: blurry\n"
        f"curve: step\nkeyframes:\n  - {{frame: 0, prompt: {LONG!r}}}\n"
        "  - {frame: 1, prompt: 'a (dog:1.5)'}\n",
        encoding="utf-8",
    )
    report = run_render(path, tmp_path / "cache", "--batch-size", "2")
    assert report["rendered"] == 2
    # The long frame rendered alone gives the same pixels as in its mixed batch.
    alone = tmp_path / "alone"
    alone.mkdir()
    text = path.read_text(encoding="utf-8").replace("frames: 2", "frames: 1")
    (alone / "scene.yaml").write_text(text.split("  - {frame: 1")[0], encoding="utf-8")
    assert run_render(alone / "scene.yaml", alone / "cache")["rendered"] == 1
    keys = []
    for scene_path in (path, alone / "scene.yaml"):
        scene = load_scene(scene_path)
        keys.append(plan(scene, resolve_env(scene, device="cpu"))[0].key)
    assert keys[0] == keys[1]
    with CacheDir(tmp_path / "cache") as mixed, CacheDir(alone / "cache") as single:
        assert mixed.frames.get(keys[0]) == single.frames.get(keys[1]) is not None


def _plan_output(path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(path), "--plan", "--cache-dir", str(path.parent / "cache"), *extra])
    assert exc.value.code in (0, None)
    out, err = capsys.readouterr()
    assert "Token indices sequence length" not in err  # transformers' own warning stays quiet
    return out


def test_plan_shows_token_counts_and_what_is_cut(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    path = _scene(tmp_path, "", LONG, frames=2)
    out = _plan_output(path, capsys)
    assert "prompt 'a dog on a hill, cat cat cat cat cat ca…': 106 tokens, encoded in 2 chunks of 75\n" in out
    rows = json.loads(_plan_output(path, capsys, "--json"))
    assert (rows[0]["tokens"], rows[0]["chunks"], "cut" in rows[0]) == (106, 2, False)
    path.write_text(path.read_text().replace("steps: 2", "steps: 2\nlong_prompts: truncate"))
    out = _plan_output(path, capsys)
    assert "106 tokens; the last 31 are cut: 'cat cat cat" in out
    rows = json.loads(_plan_output(path, capsys, "--json"))
    assert (rows[0]["tokens"], rows[0]["chunks"], rows[0]["cut"]) == (106, 1, ["cat " * 30 + "cat"])


TEXTS = [
    "A cute dog in a beautiful field of lavander colorful flowers everywhere, perfect lighting, leica "
    "summicron 35mm f2.0, kodak portra 400, film grain",
    "Ünïcode  ça   va? it's 12345 cats!!! émoji 🐱 don't",
    "x" * 300,
    LONG,
]


def test_plan_tokenizer_gives_transformers_ids() -> None:
    from transformers import CLIPTokenizer

    from pipeline.plan.prompts import ClipTokenizer

    folder = ROOT / "pipeline" / "embedded" / "tiny" / "tokenizer"
    ours, theirs = ClipTokenizer(str(folder)), CLIPTokenizer.from_pretrained(str(folder))
    for text in TEXTS:
        ids = ours(text).input_ids
        assert ids == theirs(text, add_special_tokens=False, verbose=False).input_ids
        assert ours.decode(ids) == theirs.decode(ids)


def test_a_long_text_of_few_tokens_keeps_its_key(tmp_path: Path) -> None:
    # 156 non-space characters but 38 tokens (the dog_cat example): counted, not guessed, so its
    # embedding key is the one it had before long prompts existed.
    scene = load_scene(_scene(tmp_path, prompt=TEXTS[0]))
    env = resolve_env(scene, device="cpu")
    assert env.tokenizer is not None
    assert "prompts" not in _key_recipe(plan(scene, env))
    # Without a tokenizer on disk the planner cannot count: the key names the prompt format.
    from dataclasses import replace

    assert "prompts" in _key_recipe(plan(scene, replace(env, tokenizer=None)))


# -- SDXL: two encoders side by side, the pooled embedding from the second one's first chunk ------------


def test_sdxl_weighted_and_long_prompts(tmp_path: Path) -> None:
    with CacheDir(tmp_path / "cache") as cache:
        renderer, jobs = _renderer(_scene(tmp_path, "", "(dog:1.5)", model="tiny-sdxl"), cache)
        pipe, prompts = renderer.pipe, _key_recipe(jobs)["prompts"]
        assert prompts == {"format": "weighted", "long": "chunk", "parser": PARSER_VERSION}

        def plain(text: str) -> tuple[torch.Tensor, torch.Tensor]:
            embeds, _, pooled, _ = pipe.encode_prompt(text, device="cpu", do_classifier_free_guidance=False)
            return embeds, pooled

        # One window without weights: the chunked path is diffusers' own encoding.
        ours = renderer._encode("a dog on grass", prompts)
        embeds, pooled = plain("a dog on grass")
        assert ours["prompt_embeds"].shape == (1, 77, 64)  # the two encoders' 32 + 32
        assert torch.allclose(ours["prompt_embeds"], embeds, atol=1e-6, rtol=0)
        assert torch.allclose(ours["pooled_prompt_embeds"], pooled, atol=1e-6, rtol=0)
        # A weight changes the conditioning, not the pooled embedding (as in AUTOMATIC1111).
        weighted = renderer._encode("a (dog:1.5) on grass", prompts)
        assert (weighted["prompt_embeds"] - embeds).abs().max() > 1e-2
        assert torch.allclose(weighted["pooled_prompt_embeds"], pooled, atol=1e-6, rtol=0)
        # A long prompt: two windows; the first is the cut prompt, the pooled embedding the cut one's.
        long = renderer._encode(LONG, prompts)
        cut_embeds, cut_pooled = plain(LONG)
        assert long["prompt_embeds"].shape == (1, 154, 64)
        assert torch.allclose(long["prompt_embeds"][:, :77], cut_embeds, atol=1e-6, rtol=0)
        assert torch.allclose(long["pooled_prompt_embeds"], cut_pooled, atol=1e-6, rtol=0)


def test_sdxl_render_with_weighted_and_long_prompts(tmp_path: Path) -> None:
    path = tmp_path / "scene.yaml"
    path.write_text(
        "model: tiny-sdxl\nsize: [32, 32]\nsteps: 2\nframes: 2\nnoise: fixed\nnegative_prompt: '[blurry]'\n"
        f"curve: step\nkeyframes:\n  - {{frame: 0, prompt: {LONG!r}}}\n"
        "  - {frame: 1, prompt: 'a (dog:1.5)'}\n",
        encoding="utf-8",
    )
    assert run_render(path, tmp_path / "cache", "--batch-size", "2")["rendered"] == 2


def test_learned_embedding_token_in_a_weighted_prompt(tmp_path: Path) -> None:
    # A textual-inversion token is expanded per fragment, as diffusers expands it in a whole prompt:
    # unweighted, the chunked path gives diffusers' own encoding; weighted, the token's vector changes.
    shutil.copytree(ROOT / "scenes" / "inputs", tmp_path / "inputs")
    extra = "embeddings:\n  - {path: inputs/tom_tiny.safetensors, token: '<tom>'}\n"
    with CacheDir(tmp_path / "cache") as cache:
        renderer, jobs = _renderer(_scene(tmp_path, extra, "a cartoon of (<tom>:1.4)"), cache)
        prompts = _key_recipe(jobs)["prompts"]
        plain, _ = renderer.pipe.encode_prompt("a cartoon of <tom>", "cpu", 1, False)
        ours = renderer._encode("a cartoon of <tom>", prompts)["prompt_embeds"]
        assert torch.allclose(ours, plain, atol=1e-6, rtol=0)
        weighted = renderer._encode("a cartoon of (<tom>:1.4)", prompts)["prompt_embeds"]
        assert (weighted - plain).abs().max() > 1e-2
        expected = _reference(renderer.pipe, [("a cartoon of ", 1.0), ("<tom>", 1.4)])
        assert torch.allclose(weighted, expected, atol=1e-6, rtol=0)
