"""Single-file checkpoints (``model: x.safetensors`` / ``x.ckpt``) and the ``vae:`` override.

The checkpoints are made here from the embedded models, written back in the original (LDM) layout by
``tests/_ldm_layout.py``; a checkpoint must render the pixels of the folder it came from.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import pipeline
from pipeline.render.checkpoints import inspect_checkpoint
from pipeline.render.modelfiles import EMBEDDED_DIR, ModelError, ModelRef
from pipeline.render.models import load_pipeline, resolve_model
from pipeline.scene.problems import Problem
from tests._ldm_layout import sd3_to_single_file, to_single_file, vae_to_ldm

SCENE: dict[str, Any] = {
    "model": "tiny",
    "size": [32, 32],
    "steps": 2,
    "seed": 5,
    "keyframes": [{"frame": 0, "prompt": "a dog"}, {"frame": 2, "prompt": "a cat"}],
    "outputs": ["frames/"],
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny.safetensors, tiny.ckpt (both from the embedded tiny) and tiny-sdxl.safetensors."""
    folder = tmp_path_factory.mktemp("checkpoints")
    state = to_single_file(EMBEDDED_DIR / "tiny")
    save_file(state, str(folder / "tiny.safetensors"))
    torch.save({"state_dict": state, "global_step": 1}, str(folder / "tiny.ckpt"))
    save_file(to_single_file(EMBEDDED_DIR / "tiny-sdxl"), str(folder / "tiny-sdxl.safetensors"))
    return folder


def _scene(tmp_path: Path, name: str = "scene", **changes: Any) -> Path:
    """A scene file whose lines start with 'model:' (a problem at 1:8), then 'config:' and 'vae:' if given."""
    data = {**SCENE, **changes}
    data = {k: data[k] for k in ("model", "config", "vae") if k in data} | data
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _open(path: Path, tmp_path: Path) -> pipeline.Session:
    return pipeline.open(path, cache_dir=tmp_path / "cache", device="cpu")


def _rendered(session: pipeline.Session) -> pipeline.Session:
    session.render()
    return session


def _pixels(session: pipeline.Session) -> list[bytes]:
    return [im.tobytes() for im in session.frames()]


# 1. The converter the tests use is the exact inverse of diffusers' single-file conversion.


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_the_test_converter_round_trips_through_diffusers_conversion(name: str) -> None:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    state = to_single_file(EMBEDDED_DIR / name)
    for component, convert in (("unet", convert_ldm_unet_checkpoint), ("vae", convert_ldm_vae_checkpoint)):
        original = load_file(str(EMBEDDED_DIR / name / component / "diffusion_pytorch_model.safetensors"))
        config = json.loads((EMBEDDED_DIR / name / component / "config.json").read_text())
        back = convert(state, config)
        assert back.keys() == original.keys()
        assert all(torch.equal(back[k], original[k]) for k in original)


# 2. Single files render the pixels of their folder; their content is in the keys.


@pytest.mark.parametrize(
    ("name", "suffix"), [("tiny", ".safetensors"), ("tiny", ".ckpt"), ("tiny-sdxl", ".safetensors")]
)
def test_a_single_file_renders_the_pixels_of_the_folder_it_came_from(
    files: Path, tmp_path: Path, name: str, suffix: str
) -> None:
    shutil.copy(files / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    folder = _open(_scene(tmp_path, "folder", model=name), tmp_path)
    single = _open(_scene(tmp_path, "single", model=f"{name}{suffix}", config=name), tmp_path)
    assert single.problems == []
    assert single.env.model_kind == "file"
    # Another model, so other keys: the file's hash is in every component it holds weights for.
    assert not {j.key for j in single.plan()} & {j.key for j in folder.plan()}
    assert not set(single.plan().embeddings) & set(folder.plan().embeddings)
    assert folder.render().rendered == 3
    report = single.render()
    assert (report.rendered, report.cached) == (3, 0)
    assert _pixels(single) == _pixels(folder)
    again = _open(_scene(tmp_path, "single", model=f"{name}{suffix}", config=name), tmp_path).render()
    assert (again.rendered, again.cached) == (0, 3)


# SD3. diffusers' SD3 single-file loading gives CLIP-L the identity as its text projection, whatever the
# file holds (create_diffusers_clip_model_from_ldm sets it to torch.eye): a single file can only hold an SD3
# whose CLIP-L projection is the identity. The embedded tiny-sd3's is random, so the pixel test runs on a
# copy of it with the identity there, the form every SD3 single file loads in.


def _tiny_sd3_identity_clip_l(folder: Path) -> Path:
    out = folder / "tiny-sd3-eye"
    shutil.copytree(EMBEDDED_DIR / "tiny-sd3", out)
    weights = out / "text_encoder" / "model.safetensors"
    state = load_file(str(weights))
    projection = state["text_projection.weight"]
    state["text_projection.weight"] = torch.eye(projection.shape[0], dtype=projection.dtype)
    save_file(state, str(weights), metadata={"format": "pt"})
    return out


def test_the_sd3_converter_round_trips_through_diffusers_conversion() -> None:
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_sd3_transformer_checkpoint_to_diffusers,
    )

    folder = EMBEDDED_DIR / "tiny-sd3"
    state = sd3_to_single_file(folder)
    config = json.loads((folder / "vae" / "config.json").read_text())
    conversions = {
        "transformer/diffusion_pytorch_model": convert_sd3_transformer_checkpoint_to_diffusers(
            {k: v for k, v in state.items() if k.startswith("model.diffusion_model.")}
        ),
        "vae/diffusion_pytorch_model": convert_ldm_vae_checkpoint(state, config),
        "text_encoder/model": convert_ldm_clip_checkpoint(state, "text_encoders.clip_l.transformer."),
        "text_encoder_2/model": convert_ldm_clip_checkpoint(state, "text_encoders.clip_g.transformer."),
    }
    for name, back in conversions.items():
        original = load_file(str(folder / f"{name}.safetensors"))
        assert back.keys() == original.keys(), name
        assert all(torch.equal(back[k], original[k]) for k in original), name


def test_an_sd3_single_file_renders_the_pixels_of_the_folder_it_came_from(tmp_path: Path) -> None:
    folder_path = _tiny_sd3_identity_clip_l(tmp_path)
    save_file(sd3_to_single_file(folder_path), str(tmp_path / "sd3.safetensors"))
    layout = inspect_checkpoint(tmp_path / "sd3.safetensors")
    assert not isinstance(layout, str)
    assert (layout.family, layout.kind) == ("sd3", "sd3")
    assert sorted(layout.components) == ["text_encoder", "text_encoder_2", "transformer", "vae"]
    prompts = [{"frame": 0, "prompt": "a (dog:1.3)"}, {"frame": 2, "prompt": "a cat"}]
    folder = _open(_scene(tmp_path, "folder", model=folder_path.name, keyframes=prompts), tmp_path)
    single = _open(
        _scene(tmp_path, "single", model="sd3.safetensors", config=folder_path.name, keyframes=prompts),
        tmp_path,
    )
    assert single.problems == []
    assert single.env.model_kind == "file"
    assert not {j.key for j in single.plan()} & {j.key for j in folder.plan()}
    assert folder.render().rendered == 3
    assert (single.render().rendered, _pixels(single)) == (3, _pixels(folder))


def test_sd3_single_file_loading_gives_clip_l_the_identity_projection(tmp_path: Path) -> None:
    # Why the pixel test needs its copy: from the embedded tiny-sd3 as it is, the file's random CLIP-L
    # projection is not loaded. Its CLIP-G (of the same width) keeps its own projection (_second_clip).
    save_file(sd3_to_single_file(EMBEDDED_DIR / "tiny-sd3"), str(tmp_path / "sd3.safetensors"))
    pipe = load_pipeline(
        resolve_model("sd3.safetensors", tmp_path, config="tiny-sd3"), device="cpu", dtype="float32"
    )
    original = load_file(str(EMBEDDED_DIR / "tiny-sd3" / "text_encoder_2" / "model.safetensors"))
    assert torch.equal(pipe.text_encoder.text_projection.weight, torch.eye(32))
    assert torch.equal(pipe.text_encoder_2.text_projection.weight, original["text_projection.weight"].float())


def test_the_keys_hold_the_files_content_not_its_name(files: Path, tmp_path: Path) -> None:
    shutil.copy(files / "tiny.safetensors", tmp_path / "a.safetensors")
    shutil.copy(files / "tiny.safetensors", tmp_path / "b.safetensors")
    state = load_file(str(files / "tiny.safetensors"))
    state["model.diffusion_model.out.2.bias"] = state["model.diffusion_model.out.2.bias"] + 1
    save_file(state, str(tmp_path / "c.safetensors"))
    fp = {n: resolve_model(f"{n}.safetensors", tmp_path, config="tiny").fingerprint for n in "abc"}
    assert fp["a"] == fp["b"]
    changed = {k for k in fp["a"] if fp["a"][k] != fp["c"][k]}
    assert changed == {"unet", "vae", "text_encoder"}  # the components whose weights the file holds
    assert fp["a"]["tokenizer"] == resolve_model("tiny", tmp_path).fingerprint["tokenizer"]


def test_a_checkpoints_hash_is_memoised_by_its_stat(files: Path, tmp_path: Path) -> None:
    shutil.copy(files / "tiny.safetensors", tmp_path / "m.safetensors")
    memo: dict[str, Any] = {}
    first = resolve_model("m.safetensors", tmp_path, config="tiny", memo=memo)
    stamp = next(k for k in memo if k.startswith(str(tmp_path / "m.safetensors") + "|"))
    memo[stamp] = "0" * 64  # a remembered digest is used, not recomputed
    second = resolve_model("m.safetensors", tmp_path, config="tiny", memo=memo)
    assert second.fingerprint["unet"] != first.fingerprint["unet"]


def test_layouts_are_recognised_from_the_header_alone(files: Path, tmp_path: Path) -> None:
    sd = inspect_checkpoint(files / "tiny.safetensors")
    assert not isinstance(sd, str)
    assert (sd.family, sd.kind, sorted(sd.components)) == ("sd", "v1", ["text_encoder", "unet", "vae"])
    assert sd.default_config == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    xl = inspect_checkpoint(files / "tiny-sdxl.safetensors")
    assert not isinstance(xl, str)
    assert (xl.family, xl.kind) == ("sdxl", "xl_base")
    assert sorted(xl.components) == ["text_encoder", "text_encoder_2", "unet", "vae"]
    ckpt = inspect_checkpoint(files / "tiny.ckpt")
    assert not isinstance(ckpt, str) and ckpt.components == sd.components

    def t() -> torch.Tensor:
        return torch.zeros(1)

    cases = {
        "sd3": {
            "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": t(),
            "text_encoders.clip_l.x": t(),
        },
        "v2": {
            "model.diffusion_model.input_blocks.1.0.x": t(),
            "cond_stage_model.model.token_embedding.weight": t(),
        },
        "v1-inpainting": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 9, 3, 3)},
        "sd35_medium": {
            "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": t(),
            "model.diffusion_model.pos_embed": torch.zeros(1, 147456, 1),
        },
        "sd35_large": {"model.diffusion_model.joint_blocks.37.x_block.mlp.fc1.weight": t()},
    }
    for kind, state in cases.items():
        save_file(state, str(tmp_path / f"{kind}.safetensors"))
        found = inspect_checkpoint(tmp_path / f"{kind}.safetensors")
        assert not isinstance(found, str) and found.kind == kind


# 3. Bad files, missing configs: located problems before any model loads (exit 2).


def _problems(tmp_path: Path, **changes: Any) -> list[Any]:
    return _open(_scene(tmp_path, **changes), tmp_path).problems


def test_files_that_are_not_checkpoints_are_located_problems(tmp_path: Path) -> None:
    (tmp_path / "notes.ckpt").write_text("hello")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    save_file({"lora_unet_down.lora_up.weight": torch.zeros(1)}, str(tmp_path / "style.safetensors"))
    save_file({"encoder.conv_in.weight": torch.zeros(1)}, str(tmp_path / "vae.safetensors"))
    (tmp_path / "readme.txt").write_text("a model?")
    cases = {
        "notes.ckpt": "not a checkpoint: a .ckpt is a PyTorch file (a zip archive or a pickle) and this is neither",
        "garbage.safetensors": "not a safetensors file",
        "style.safetensors": "unknown checkpoint layout: no 'model.diffusion_model.' weights",
        "vae.safetensors": "it holds a VAE alone: give it as 'vae:'",
        "readme.txt": "is a file but not a checkpoint",
        "gone.safetensors": "checkpoint file 'gone.safetensors' not found",
    }
    for model, words in cases.items():
        problems = _problems(tmp_path, model=model, config="tiny")
        assert len(problems) == 1, (model, problems)
        assert isinstance(problems[0], Problem) and (problems[0].line, problems[0].col) == (1, 8)
        assert words in problems[0].message, (model, problems[0].message)
    assert "LoRA weights: list it under 'loras:'" in _problems(tmp_path, model="style.safetensors")[0].message


def test_the_cli_exits_2_with_file_line_and_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.cli import main

    (tmp_path / "notes.ckpt").write_text("hello")
    scene = _scene(tmp_path, model="notes.ckpt")
    with pytest.raises(SystemExit) as exc:
        main([str(scene), "--cache-dir", str(tmp_path / "cache"), "-q"])
    assert exc.value.code == 2
    assert f"{scene}:1:8: model: 'notes.ckpt': not a checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_missing_configs_are_a_located_problem_offline(
    files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty Hugging Face cache
    shutil.copy(files / "tiny.safetensors", tmp_path / "tiny.safetensors")
    problems = _problems(tmp_path, model="tiny.safetensors")
    assert [(p.line, p.col) for p in problems] == [(1, 8)]
    assert problems[0].message == (
        "model: a single file holds weights only, and the configs of this SD 1.x/2.x checkpoint "
        "('stable-diffusion-v1-5/stable-diffusion-v1-5', as diffusers uses) are not in the Hugging Face "
        "cache; set 'config:' to a diffusers folder of the same model family (or run once with network "
        "access to cache them)"
    )
    # A config of another family, a config that is no model, and config: for a folder model.
    wrong = _problems(tmp_path, model="tiny.safetensors", config="tiny-sdxl")
    assert [(p.line, p.col) for p in wrong] == [(2, 9)]
    assert (
        "it is a SDXL model (StableDiffusionXLPipeline) and the checkpoint is SD 1.x/2.x" in wrong[0].message
    )
    (tmp_path / "empty").mkdir()
    assert (
        "not a diffusers model folder"
        in _problems(tmp_path, model="tiny.safetensors", config="empty")[0].message
    )
    folder = _problems(tmp_path, model="tiny", config="tiny")
    assert [p.message for p in folder] == [
        "config: is for a single-file checkpoint; model 'tiny' has its own configs"
    ]


def test_configs_in_the_hugging_face_cache_are_used_offline(
    files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cache layout huggingface_hub writes: refs/main names the snapshot of the configs.
    repo = tmp_path / "hf" / "models--stable-diffusion-v1-5--stable-diffusion-v1-5"
    commit = "1" * 40
    snapshot = repo / "snapshots" / commit
    shutil.copytree(EMBEDDED_DIR / "tiny", snapshot, ignore=shutil.ignore_patterns("*.safetensors"))
    # Like the real entry: a safety checker listed, its config there (never loaded for a single file).
    index = json.loads((snapshot / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    (snapshot / "model_index.json").write_text(json.dumps(index))
    (snapshot / "safety_checker").mkdir()
    (snapshot / "safety_checker" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    shutil.copy(files / "tiny.safetensors", tmp_path / "tiny.safetensors")
    session = _open(_scene(tmp_path, model="tiny.safetensors"), tmp_path)
    assert session.problems == []
    with_config = _open(_scene(tmp_path, "b", model="tiny.safetensors", config="tiny"), tmp_path)
    assert [j.key for j in session.plan()] == [j.key for j in with_config.plan()]  # the same configs
    session.render()  # weights from the file only: the cache entry has none
    assert _pixels(session) == _pixels(_rendered(_open(_scene(tmp_path, "folder", model="tiny"), tmp_path)))


# 4. A .ckpt is a pickle: nothing in it runs.


class _Evil:
    """Unpickling this creates a file (what a hostile .ckpt would do, with worse commands)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4:UserWarning")
@pytest.mark.parametrize("form", ["zip", "legacy", "raw-protocol-4"])
def test_a_malicious_ckpt_runs_nothing_and_is_a_located_problem(tmp_path: Path, form: str) -> None:
    marker = tmp_path / "pwned"
    state: dict[str, Any] = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
        "evil": _Evil(marker),
    }
    path = tmp_path / "evil.ckpt"
    if form == "raw-protocol-4":  # a plain pickle (STACK_GLOBAL, memoised names): no tensor in it
        state["model.diffusion_model.input_blocks.0.0.weight"] = [0.0]
        path.write_bytes(pickle.dumps({"state_dict": state}, protocol=4))
    else:
        torch.save({"state_dict": state}, str(path), _use_new_zipfile_serialization=form == "zip")
    assert not marker.exists()
    problems = _problems(tmp_path, model="evil.ckpt", config="tiny")
    assert [(p.line, p.col) for p in problems] == [(1, 8)]
    assert "refused: loading it would call 'io.open'" in problems[0].message
    assert not marker.exists()
    # Past the check (as if it were skipped), diffusers' weights-only torch.load refuses it too.
    ref = ModelRef(
        "evil.ckpt",
        "file",
        EMBEDDED_DIR / "tiny",
        json.loads((EMBEDDED_DIR / "tiny" / "model_index.json").read_text()),
        checkpoint=path,
        from_file=frozenset({"unet"}),
    )
    with pytest.raises(ModelError, match=r"cannot load model 'evil\.ckpt'"):
        load_pipeline(ref, device="cpu", dtype="float32")
    assert not marker.exists()


# 5. vae: replaces the model's VAE; it is in the frame keys, not in the embedding keys.


def _other_vae(tmp_path: Path) -> Path:
    """A copy of tiny's VAE with other decoder weights, as a diffusers VAE folder."""
    folder = tmp_path / "my_vae"
    folder.mkdir()
    shutil.copy(EMBEDDED_DIR / "tiny" / "vae" / "config.json", folder / "config.json")
    state = load_file(str(EMBEDDED_DIR / "tiny" / "vae" / "diffusion_pytorch_model.safetensors"))
    state["decoder.conv_out.bias"] = state["decoder.conv_out.bias"] + 0.5
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def test_a_vae_override_changes_frame_keys_not_embedding_keys(tmp_path: Path) -> None:
    _other_vae(tmp_path)
    plain = _open(_scene(tmp_path, "plain"), tmp_path)
    swapped = _open(_scene(tmp_path, "swapped", vae="my_vae"), tmp_path)
    assert swapped.problems == []
    assert swapped.env.fingerprint["vae"] != plain.env.fingerprint["vae"]
    assert {k: v for k, v in swapped.env.fingerprint.items() if k != "vae"} == {
        k: v for k, v in plain.env.fingerprint.items() if k != "vae"
    }
    assert not {j.key for j in swapped.plan()} & {j.key for j in plain.plan()}
    assert set(swapped.plan().embeddings) == set(plain.plan().embeddings)
    plain.render()
    report = swapped.render()
    assert (report.rendered, report.embeddings_encoded) == (3, 0)  # the embeddings were cached
    assert _pixels(swapped) != _pixels(plain)
    again = _open(_scene(tmp_path, "swapped", vae="my_vae"), tmp_path).render()
    assert (again.rendered, again.cached) == (0, 3)


def test_a_vae_file_in_the_original_layout_renders_like_its_folder(tmp_path: Path) -> None:
    folder = _other_vae(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    save_file(vae_to_ldm(state, config), str(tmp_path / "my_vae.safetensors"))
    from_folder = _open(_scene(tmp_path, "a", vae="my_vae"), tmp_path)
    from_file = _open(_scene(tmp_path, "b", vae="my_vae.safetensors"), tmp_path)
    assert from_file.problems == []
    from_folder.render()
    from_file.render()
    assert _pixels(from_file) == _pixels(from_folder)


def test_a_vae_with_a_single_file_model(files: Path, tmp_path: Path) -> None:
    _other_vae(tmp_path)
    shutil.copy(files / "tiny.safetensors", tmp_path / "tiny.safetensors")
    folder = _open(_scene(tmp_path, "a", vae="my_vae"), tmp_path)
    single = _open(_scene(tmp_path, "b", model="tiny.safetensors", config="tiny", vae="my_vae"), tmp_path)
    assert single.env.fingerprint["vae"] == folder.env.fingerprint["vae"]
    folder.render()
    single.render()
    assert _pixels(single) == _pixels(folder)


def test_vae_problems_are_located_at_vae(tmp_path: Path) -> None:
    save_file({"lora_unet_down.lora_up.weight": torch.zeros(1)}, str(tmp_path / "style.safetensors"))
    (tmp_path / "empty").mkdir()
    cases = {
        "./nowhere/vae": "vae: './nowhere/vae' not found",
        "style.safetensors": "vae: 'style.safetensors' holds no VAE (no encoder and decoder weights)",
        "empty": "vae: folder 'empty' is not a diffusers VAE folder",
    }
    for vae, words in cases.items():
        problems = _problems(tmp_path, vae=vae)
        assert len(problems) == 1 and problems[0].message.startswith(words), problems
        assert (problems[0].line, problems[0].col) == (2, 6)


def test_a_checkpoint_without_a_vae_takes_the_config_folders(tmp_path: Path) -> None:
    save_file(to_single_file(EMBEDDED_DIR / "tiny", vae=False), str(tmp_path / "novae.safetensors"))
    single = _open(_scene(tmp_path, "single", model="novae.safetensors", config="tiny"), tmp_path)
    folder = _open(_scene(tmp_path, "folder"), tmp_path)
    assert single.problems == []
    assert single.env.fingerprint["vae"] == folder.env.fingerprint["vae"]  # the folder's VAE files
    assert single.env.fingerprint["unet"] != folder.env.fingerprint["unet"]
    single.render()
    folder.render()
    assert _pixels(single) == _pixels(folder)


def test_an_inpainting_checkpoint_with_a_txt2img_config_is_a_located_problem(tmp_path: Path) -> None:
    save_file(to_single_file(EMBEDDED_DIR / "tiny-inpaint"), str(tmp_path / "inpaint.safetensors"))
    problems = _problems(tmp_path, model="inpaint.safetensors", config="tiny")
    assert [(p.line, p.col) for p in problems] == [(2, 9)]
    assert problems[0].message.endswith(
        "the checkpoint's UNet takes 9 input channels (an inpainting checkpoint), the config's 4; "
        "use the config of a model of the same kind"
    )


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated:UserWarning")
@pytest.mark.parametrize("form", ["diffusers-layout file", "hub id"])
def test_other_vae_forms_render_like_the_vae_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    folder = _other_vae(tmp_path)
    if form == "hub id":
        commit = "2" * 40
        repo = tmp_path / "hf" / "models--someone--my-vae"
        shutil.copytree(folder, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
        spec = "someone/my-vae"
    else:
        shutil.copy(folder / "diffusion_pytorch_model.safetensors", tmp_path / "my_vae_diffusers.safetensors")
        spec = "my_vae_diffusers.safetensors"
    from_folder = _open(_scene(tmp_path, "a", vae="my_vae"), tmp_path)
    other = _open(_scene(tmp_path, "b", vae=spec), tmp_path)
    assert other.problems == []
    if form == "hub id":
        assert other.env.fingerprint["vae"] == f"hub:someone/my-vae@{commit}"
    from_folder.render()
    other.render()
    assert _pixels(other) == _pixels(from_folder)


def test_model_option_names_a_checkpoint_relative_to_the_current_folder(
    files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "scenes").mkdir()
    (tmp_path / "models").mkdir()
    shutil.copy(files / "tiny.safetensors", tmp_path / "models" / "tiny.safetensors")
    shutil.copy(files / "tiny.safetensors", tmp_path / "scenes" / "mine.safetensors")
    # config: is the scene's, relative to the scene, whichever checkpoint is used
    scene = _scene(tmp_path / "scenes", model="mine.safetensors", config="tiny")
    monkeypatch.chdir(tmp_path)
    session = pipeline.open(
        scene, model="models/tiny.safetensors", cache_dir=tmp_path / "cache", device="cpu"
    )
    assert session.problems == []
    assert session.env.model_kind == "file" and session.env.model == "models/tiny.safetensors"
    bad = pipeline.open(scene, model="models/gone.safetensors", cache_dir=tmp_path / "cache", device="cpu")
    assert len(bad.problems) == 1
    assert str(bad.problems[0]).startswith(
        "--model: checkpoint file 'models/gone.safetensors' not found (looked for"
    )


def test_planning_a_single_file_model_with_a_vae_imports_no_torch(files: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    _other_vae(tmp_path)
    shutil.copy(files / "tiny.ckpt", tmp_path / "tiny.ckpt")
    scene = _scene(tmp_path, model="tiny.ckpt", config="tiny", vae="my_vae")
    code = (
        "import sys, pipeline; "
        f"s = pipeline.open({str(scene)!r}, cache_dir={str(tmp_path / 'cache')!r}, device='cpu'); "
        "assert s.problems == [], s.problems; assert len(s.plan()) == 3; "
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).parent.parent, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_a_checkpoint_or_vae_file_changed_after_planning_stops_the_run(files: Path, tmp_path: Path) -> None:
    from pipeline.render.modelfiles import InputChanged, check_unchanged

    shutil.copy(files / "tiny.safetensors", tmp_path / "m.safetensors")
    vae = _other_vae(tmp_path)
    ref = resolve_model("m.safetensors", tmp_path, config="tiny", vae="my_vae")
    check_unchanged(ref)  # nothing changed yet
    for path in (tmp_path / "m.safetensors", vae / "diffusion_pytorch_model.safetensors"):
        ref = resolve_model("m.safetensors", tmp_path, config="tiny", vae="my_vae")
        path.write_bytes(path.read_bytes())  # the same bytes, written again: ctime moves
        with pytest.raises(InputChanged, match=r"changed during the run"):
            check_unchanged(ref)
