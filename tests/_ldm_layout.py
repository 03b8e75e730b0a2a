"""Test helper: a diffusers model folder written back as one single-file checkpoint in the original
(LDM / AUTOMATIC1111) layout, the reverse of diffusers' own single-file conversion::

    state = to_single_file(Path("pipeline/embedded/tiny"))       # {"model.diffusion_model....": tensor}
    safetensors.torch.save_file(state, "tiny.safetensors")

The key mapping is the inverse of ``diffusers.loaders.single_file_utils`` (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``, and for
SD3 ``convert_sd3_transformer_checkpoint_to_diffusers``: see :func:`sd3_to_single_file`);
tests check the round trip through those functions, so a wrong inverse cannot pass unnoticed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

_RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
]
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return dict(_RESNET).get(head, head) + "." + tail


def unet_key(key: str, config: dict[str, Any]) -> str:
    """A diffusers UNet2DConditionModel key in the original layout (without 'model.diffusion_model.')."""
    # Each block takes layers_per_block + 1 places: a down block's last is its downsampler, an up block
    # has one layer more and its upsampler sits in that last place.
    per = config["layers_per_block"] + 1
    for new, old in _UNET_TOP.items():
        if key.startswith(new + "."):
            return old + key[len(new) :]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = 1 + b * per + j
        return f"input_blocks.{i}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{i}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = b * per + j
        return f"output_blocks.{i}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{i}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        b = int(m[1])
        has_attention = "CrossAttn" in config["up_block_types"][b]
        return f"output_blocks.{b * per + per - 1}.{2 if has_attention else 1}.conv.{m[2]}"
    raise KeyError(f"no original name for UNet key {key}")


def vae_key(key: str, config: dict[str, Any]) -> str:
    """A diffusers AutoencoderKL key in the original layout (without 'first_stage_model.')."""
    n = len(config["up_block_types"])
    key = key.replace("conv_norm_out", "norm_out")
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
        rest = (
            m[2]
            .replace("group_norm", "norm")
            .replace("to_q", "q")
            .replace("to_k", "k")
            .replace("to_v", "v")
            .replace("to_out.0", "proj_out")
        )
        return f"{m[1]}.mid.attn_1.{rest}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
        return f"decoder.up.{n - 1 - int(m[1])}.upsample.{m[2]}"
    return key  # conv_in, conv_out, norm_out, quant_conv, post_quant_conv


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in state.items():
        new = vae_key(key, config)
        if ".mid.attn_1." in new and new.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # the original attention projections are 1x1 convolutions
        out[prefix + new] = value.contiguous()
    return out


def clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    """A transformers CLIP text model in the original layout: its keys under ``prefix`` + 'text_model.'."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}


def open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    """A CLIPTextModelWithProjection in OpenCLIP's layout (SDXL's second text encoder)."""
    out: dict[str, Any] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        k = key.removeprefix("text_model.")
        if k == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
        elif k == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = value
        elif k.startswith("final_layer_norm."):
            out[prefix + "ln_final." + k.split(".")[-1]] = value
        elif k == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif k == "embeddings.position_ids":
            continue
        elif m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)", k):
            qkv.setdefault(f"{m[1]}.{m[3]}", {})[m[2]] = value
        else:
            m = re.match(r"encoder\.layers\.(\d+)\.(.*)", k)
            assert m, key
            rest = (
                m[2]
                .replace("layer_norm1", "ln_1")
                .replace("layer_norm2", "ln_2")
                .replace("mlp.fc1", "mlp.c_fc")
                .replace("mlp.fc2", "mlp.c_proj")
                .replace("self_attn", "attn")
            )
            out[f"{prefix}transformer.resblocks.{m[1]}.{rest}"] = value
    for name, parts in qkv.items():
        layer, kind = name.split(".")
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]]
        )
    return out


def _component(folder: Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    weights = sorted((folder / name).glob("*.safetensors"))
    config = json.loads((folder / name / "config.json").read_text())
    return load_file(str(weights[0])), config


def to_single_file(folder: Path, *, vae: bool = True) -> dict[str, torch.Tensor]:
    """The SD 1.x or SDXL model in ``folder`` as one original-layout state dict (``vae=False``: no VAE)."""
    index = json.loads((folder / "model_index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    unet, config = _component(folder, "unet")
    out.update({"model.diffusion_model." + unet_key(k, config): v for k, v in unet.items()})
    if vae:
        state, config = _component(folder, "vae")
        out.update(vae_to_ldm(state, config, "first_stage_model."))
    text, _ = _component(folder, "text_encoder")
    if "text_encoder_2" in index:
        out.update(clip_to_ldm(text, "conditioner.embedders.0.transformer."))
        text2, _ = _component(folder, "text_encoder_2")
        out.update(open_clip_to_ldm(text2, "conditioner.embedders.1.model."))
    else:
        out.update(clip_to_ldm(text, "cond_stage_model.transformer."))
    return {k: v.contiguous() for k, v in out.items()}


# SD3's MMDiT: diffusers' name -> the original (SAI / ComfyUI) name, both without their prefixes.
_SD3_TOP = {
    "pos_embed.pos_embed": "pos_embed",
    "pos_embed.proj.": "x_embedder.proj.",
    "time_text_embed.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
    "time_text_embed.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
    "time_text_embed.text_embedder.linear_1.": "y_embedder.mlp.0.",
    "time_text_embed.text_embedder.linear_2.": "y_embedder.mlp.2.",
    "context_embedder.": "context_embedder.",
    "proj_out.": "final_layer.linear.",
}
_SD3_BLOCK = {
    "attn.to_out.0.": "x_block.attn.proj.",
    "attn.to_add_out.": "context_block.attn.proj.",
    "norm1.linear.": "x_block.adaLN_modulation.1.",
    "norm1_context.linear.": "context_block.adaLN_modulation.1.",
    "ff.net.0.proj.": "x_block.mlp.fc1.",
    "ff.net.2.": "x_block.mlp.fc2.",
    "ff_context.net.0.proj.": "context_block.mlp.fc1.",
    "ff_context.net.2.": "context_block.mlp.fc2.",
}


def _swap_halves(value: torch.Tensor) -> torch.Tensor:
    """diffusers' ``swap_scale_shift`` (shift, scale -> scale, shift), its own inverse."""
    first, second = value.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def sd3_transformer_to_original(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, Any]:
    """A diffusers SD3Transformer2DModel in the original layout (without 'model.diffusion_model.'): q, k
    and v joined into one ``qkv`` per stream, and the last block's context modulation and the final
    modulation with their halves swapped back. No qk norm or dual attention (the tiny has neither)."""
    assert not config.get("qk_norm") and not config.get("dual_attention_layers")
    last = config["num_layers"] - 1
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key.startswith("norm_out.linear."):
            out["final_layer.adaLN_modulation.1." + key.rsplit(".", 1)[1]] = _swap_halves(value)
            continue
        m = re.match(r"transformer_blocks\.(\d+)\.(.*)", key)
        if m is None:
            (new,) = [v + key[len(k) :] for k, v in _SD3_TOP.items() if key.startswith(k)]
            out[new] = value
            continue
        i, rest = int(m[1]), m[2]
        if re.match(r"attn\.(to|add)_[qkv](_proj)?\.", rest):
            continue  # joined below
        (new,) = [v + rest[len(k) :] for k, v in _SD3_BLOCK.items() if rest.startswith(k)]
        if i == last and rest.startswith("norm1_context."):
            value = _swap_halves(value)
        out[f"joint_blocks.{i}.{new}"] = value
    for i in range(config["num_layers"]):
        for kind in ("weight", "bias"):
            x = [state[f"transformer_blocks.{i}.attn.to_{c}.{kind}"] for c in "qkv"]
            ctx = [state[f"transformer_blocks.{i}.attn.add_{c}_proj.{kind}"] for c in "qkv"]
            out[f"joint_blocks.{i}.x_block.attn.qkv.{kind}"] = torch.cat(x)
            out[f"joint_blocks.{i}.context_block.attn.qkv.{kind}"] = torch.cat(ctx)
    return out


def sd3_to_single_file(folder: Path) -> dict[str, torch.Tensor]:
    """The SD3 model in ``folder`` (without T5) as one original-layout state dict, as SAI's
    ``sd3_medium_incl_clips.safetensors`` lays it out: the MMDiT under 'model.diffusion_model.', the VAE
    under 'first_stage_model.', CLIP-L and CLIP-G in transformers' own layout under
    'text_encoders.clip_l.transformer.' and 'text_encoders.clip_g.transformer.'."""
    out: dict[str, torch.Tensor] = {}
    state, config = _component(folder, "transformer")
    out.update(
        {"model.diffusion_model." + k: v for k, v in sd3_transformer_to_original(state, config).items()}
    )
    state, config = _component(folder, "vae")
    out.update(vae_to_ldm(state, config, "first_stage_model."))
    for name, prefix in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
        state, _ = _component(folder, name)
        out.update({f"text_encoders.{prefix}.transformer.{k}": v for k, v in state.items()})
    return {k: v.contiguous() for k, v in out.items()}
