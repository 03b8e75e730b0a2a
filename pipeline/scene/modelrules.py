"""The rules about a scene's model: it is one (``model:``, ``config:``, ``vae:``), and it can do what
the scene asks of it (modes, learned embeddings, ``clip_skip``, T5).

Both read the model's files only (a checkpoint's header, a folder's configs): no torch, no network,
nothing loaded. :func:`check_model` runs with the scene rules; :func:`check_against_model` once the
model is resolved, still before anything loads::

    problems = check_against_model(scene, pipeline_class="StableDiffusionPipeline", family="sd", components={})
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.modes import modes_for
from pipeline.render.modelfiles import check_model_spec
from pipeline.render.singlefile import check_checkpoint_options, check_vae_spec
from pipeline.scene.inputfiles import read_weights_header
from pipeline.scene.inputrules import embedding_token
from pipeline.scene.problems import Problem, shorten
from pipeline.scene.schema import SceneFields
from pipeline.scene.yamlio import YamlDoc


def check_model(scene: SceneFields) -> list[tuple[tuple[str, ...], str]]:
    """The scene's ``model:`` names a model (the check ``--model`` gets too, in ``pipeline.render.models``),
    a single-file model's configs are there and fit it (``config:``), and ``vae:`` names a VAE.
    Torch-free and without network: a checkpoint is judged by its header or its pickle's opcodes."""
    problems: list[tuple[tuple[str, ...], str]] = []
    problem = check_model_spec(scene.model, scene.base_dir)
    if problem:
        problems.append((("model",), f"model: {problem}"))
    else:
        found = check_checkpoint_options(scene.model, scene.config, scene.base_dir, scene.base_dir)
        problems += [((name,), message) for name, message in found]
    if scene.vae is not None and (why := check_vae_spec(scene.vae, scene.base_dir)):
        problems.append((("vae",), f"vae: {why}"))
    return problems


def check_against_model(
    scene: SceneFields,
    *,
    pipeline_class: str,
    family: str,
    components: dict[str, Any],
    model: str | None = None,
    folder: Path | None = None,
) -> list[Problem]:
    """What the scene asks of its model that the model cannot do: modes, learned embeddings, T5.

    ``model`` is the ``--model`` that replaces the scene's ``model:``, if any: the messages name the
    model that is used and where it came from. ``folder`` is the model's local files (``ModelRef.folder``),
    if there are any: learned-embedding tokens and sizes are then checked against its tokenizer and
    text encoder, which diffusers would otherwise refuse only once the model has loaded.
    """
    doc = scene._doc or YamlDoc(str(scene.path), None)
    problems: list[Problem] = []
    named = f"--model '{model}'" if model is not None else f"model '{scene.model}'"
    allowed = modes_for(pipeline_class)
    written = scene.keyframes and scene.keyframe_frames[0] == 0 and scene.keyframes[0].mode is not None
    uses = [] if written else [(("mode",), scene.mode)]
    # A keyframe's place in the file: schedules may have added keyframes before it.
    written_at = scene._written_index or range(len(scene.keyframes))
    uses += [
        (("keyframes", i, "mode"), kf.mode)
        for i, kf in zip(written_at, scene.keyframes, strict=True)
        if kf.mode is not None
    ]
    for at, mode in uses:
        if mode not in allowed:
            # A mode nobody wrote is the default: say so, as the position is then only the scene's start.
            unset = at == ("mode",) and at not in doc.marks
            default = f"; the scene sets no 'mode', so it is {mode}, the default" if unset else ""
            # With no 'mode' line to point at, the line that chose the model is where to look.
            place = ("model",) if unset and model is None and ("model",) in doc.marks else at
            problems.append(
                doc.problem(
                    place,
                    f"mode {mode} is not possible with {named} ({pipeline_class}); "
                    f"it renders: {', '.join(allowed)}{default}",
                )
            )
    if scene.embeddings and family != "sd":
        problems.append(
            doc.problem(
                ("embeddings",),
                f"learned embeddings work with SD 1.x/2.x models; {named} is {family}",
                key=True,
            )
        )
    if scene.embeddings and family == "sd" and folder is not None:
        problems += _check_embeddings_against(scene, doc, folder, named)
    if scene.clip_skip and folder is not None:
        problems += _check_clip_skip(scene, doc, folder, family, named)
    if scene.t5 and (family != "sd3" or not (components.get("text_encoder_3") or [None])[0]):
        problems.append(
            doc.problem(
                ("t5",),
                f"t5: true needs an SD3 model with a T5 text encoder; {named} has none",
                key=True,
            )
        )
    return problems


def _check_embeddings_against(scene: SceneFields, doc: YamlDoc, folder: Path, named: str) -> list[Problem]:
    """Learned embeddings against the model's tokenizer and text encoder, as diffusers will load them.

    diffusers refuses a token that the tokenizer already knows ('dog' is a word of CLIP's vocabulary,
    '<tom>' is not), and an embedding whose vectors are not the text encoder's width.
    """
    problems: list[Problem] = []
    try:
        vocab = set(json.loads((folder / "tokenizer" / "vocab.json").read_text(encoding="utf-8")))
        added = folder / "tokenizer" / "added_tokens.json"
        if added.is_file():
            vocab |= set(json.loads(added.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        vocab = set()
    try:
        config = json.loads((folder / "text_encoder" / "config.json").read_text(encoding="utf-8"))
        width = config.get("hidden_size") if isinstance(config, dict) else None
    except (OSError, ValueError):
        width = None
    for i, emb in enumerate(scene.embeddings):
        token = embedding_token(scene, emb)
        at = ("embeddings", i, "token" if emb.token else "path")
        if token is not None and (token in vocab or f"{token}_1" in vocab):
            problems.append(
                doc.problem(
                    at,
                    f"embedding {i + 1}: the token '{shorten(token, 40)}' is already a word of the tokenizer of "
                    f"{named}; choose a new one, e.g. '<{shorten(token, 30).strip('<>')}>'",
                )
            )
        try:
            tensors = read_weights_header(scene.resolve(emb.path))
        except (OSError, RuntimeError, ValueError):
            continue
        shape = next(iter(tensors.values())) if isinstance(tensors, dict) and len(tensors) == 1 else None
        if isinstance(width, int) and shape and shape[-1] != width:
            problems.append(
                doc.problem(
                    ("embeddings", i, "path"),
                    f"embedding {i + 1}: its vectors have {shape[-1]} values, the text encoder of {named} "
                    f"takes {width}; it was made for another model",
                )
            )
    return problems


def _check_clip_skip(
    scene: SceneFields, doc: YamlDoc, folder: Path, family: str, named: str
) -> list[Problem]:
    """``clip_skip`` within the layers of the model's text encoders (an IndexError once loaded)."""
    # SD 1.x/2.x take the last layer's output for clip_skip 0; SDXL and SD3 the one before it.
    offset = 1 if family == "sd" else 2
    for name in ("text_encoder", "text_encoder_2"):
        try:
            layers = int(json.loads((folder / name / "config.json").read_text())["num_hidden_layers"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if scene.clip_skip + offset > layers + 1:
            return [
                doc.problem(
                    ("clip_skip",),
                    f"clip_skip {scene.clip_skip} skips more layers than {named}'s {name} has ({layers}); "
                    f"at most {layers + 1 - offset}",
                )
            ]
    return []
