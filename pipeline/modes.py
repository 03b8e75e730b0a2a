"""Every pipeline mode in one table: what a frame of it depends on, what it needs, how it renders.

The scene rules (which images a mode needs, which modes a checkpoint allows), the planner (which
scalars go into a frame's key, which input images go into its mode recipe) and the renderer (which
diffusers class renders it) all read :data:`MODES`; nothing else names a mode's facts::

    MODES["img2img"].scalars                        # ('guidance', 'strength'): what its keys hold
    MODES["inpaint"].needs                          # ('init_image', 'mask')
    MODES["feedback"].pipelines["sdxl"]             # 'StableDiffusionXLImg2ImgPipeline'
    modes_for("StableDiffusionInpaintPipeline")     # ('inpaint',): what a checkpoint can render

Adding a mode is one :class:`Mode` entry in :data:`MODES` below (its scalars, its input images, its
diffusers class per family, whether it needs a checkpoint of its own, whether it chains) plus its
branch in ``FrameRenderer._call`` (``pipeline/render/renderer.py``), which turns the frame's mode
recipe into that class's arguments. A new keyframable scalar goes into ``Keyframe`` and ``Scene``
(``pipeline/scene``) too; a new input image into :data:`IMAGES` and those classes.

Plain data, no torch: ``--plan`` and a no-op re-run read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ImageInput:
    """An input image a scene or keyframe can set (held until a keyframe sets another)."""

    field: str  # the scene's key
    recipe: str  # its key in a frame's mode recipe (the file's content hash)
    needed: str  # how a problem names it when a mode needs it and it is not given
    noun: str  # how a message names it


IMAGES: dict[str, ImageInput] = {
    i.field: i
    for i in (
        ImageInput("init_image", "init", "an 'init_image'", "init image"),
        ImageInput("mask", "mask", "a 'mask' (white repaints, black keeps)", "mask"),
        ImageInput("depth_map", "depth", "a 'depth_map'", "depth map"),
    )
}
IMAGE_FIELDS: tuple[str, ...] = tuple(IMAGES)
# The motion of a feedback frame (keyframable scalars, like guidance and strength).
MOTION: tuple[str, ...] = ("zoom", "angle", "translate_x", "translate_y")


@dataclass(frozen=True)
class Mode:
    """One mode's facts."""

    name: str
    scalars: tuple[str, ...]  # the keyframable scalars its frames depend on (and so their keys hold)
    needs: tuple[str, ...]  # input images it cannot render without (IMAGES)
    optional: tuple[str, ...]  # input images it uses when given
    pipelines: dict[str, str]  # model family -> the diffusers pipeline class that renders it
    # A word in the pipeline class name of checkpoints made for this mode (extra UNet inputs): such a
    # checkpoint renders this mode only.
    checkpoint: str | None = None
    # Whether a checkpoint of no special kind renders it too (inpaint: by blending the kept area back
    # each step); False for a mode only its own checkpoints render (depth2img).
    any_checkpoint: bool = True
    # The recipe's value for an optional input that is not given (depth2img estimates its depth map).
    absent: tuple[tuple[str, str], ...] = ()
    same_size: tuple[str, ...] = ()  # input images that must have the same size
    chains: bool = False  # each frame starts from the frame before it (not for a grid or a walk)

    @property
    def inputs(self) -> tuple[str, ...]:
        """The input images its frames' mode recipes hold (when given)."""
        return self.needs + self.optional


# The diffusers classes of the image-to-image modes, shared by img2img and feedback.
_IMG2IMG = {
    "sd": "StableDiffusionImg2ImgPipeline",
    "sdxl": "StableDiffusionXLImg2ImgPipeline",
    "sd3": "StableDiffusion3Img2ImgPipeline",
}

MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode(
            "txt2img",
            scalars=("guidance",),
            needs=(),
            optional=(),
            pipelines={
                "sd": "StableDiffusionPipeline",
                "sdxl": "StableDiffusionXLPipeline",
                "sd3": "StableDiffusion3Pipeline",
            },
        ),
        Mode(
            "img2img",
            scalars=("guidance", "strength"),
            needs=("init_image",),
            optional=(),
            pipelines=_IMG2IMG,
        ),
        Mode(
            "inpaint",
            scalars=("guidance", "strength"),
            needs=("init_image", "mask"),
            optional=(),
            pipelines={
                "sd": "StableDiffusionInpaintPipeline",
                "sdxl": "StableDiffusionXLInpaintPipeline",
                "sd3": "StableDiffusion3InpaintPipeline",
            },
            checkpoint="Inpaint",
            same_size=("init_image", "mask"),
        ),
        Mode(
            "depth2img",
            scalars=("guidance", "strength"),
            needs=("init_image",),
            optional=("depth_map",),
            pipelines={"sd": "StableDiffusionDepth2ImgPipeline"},
            checkpoint="Depth2Img",
            any_checkpoint=False,
            absent=(("depth_map", "estimated"),),
        ),
        Mode(
            "feedback",
            scalars=("guidance", "strength", *MOTION),
            needs=(),
            optional=("init_image",),
            pipelines=_IMG2IMG,
            chains=True,
        ),
    )
}
MODE_NAMES: tuple[str, ...] = tuple(MODES)
# The type of a scene's ``mode:``, made from the table (pydantic checks values against it).
ModeName = Literal[MODE_NAMES]  # type: ignore[valid-type]
# Every keyframable scalar of any mode, in the order scenes list them (and planners index them).
SCALARS: tuple[str, ...] = tuple(dict.fromkeys(s for m in MODES.values() for s in m.scalars))


def family_of(pipeline_class: str) -> str:
    """'sd' (1.x/2.x), 'sdxl' or 'sd3', from a diffusers pipeline class name."""
    if "StableDiffusion3" in pipeline_class:
        return "sd3"
    if "StableDiffusionXL" in pipeline_class:
        return "sdxl"
    return "sd"


def modes_for(pipeline_class: str) -> tuple[str, ...]:
    """The modes a checkpoint can render, in table order: a checkpoint made for a mode renders only
    that one; any other renders every mode of its family that needs no checkpoint of its own."""
    for mode in MODES.values():
        if mode.checkpoint and mode.checkpoint in pipeline_class:
            return (mode.name,)
    family = family_of(pipeline_class)
    return tuple(m.name for m in MODES.values() if m.any_checkpoint and family in m.pipelines)


def pipeline_class(family: str, mode: str) -> str:
    """The diffusers class that renders ``mode`` for a model of ``family``."""
    return MODES[mode].pipelines[family]


def mode_recipe(mode: str, held: dict[str, str | None], files: dict[str, str]) -> dict[str, str]:
    """The mode part of a frame's recipe: the mode and the content hashes of the input images it
    uses (``held``: the scene's or keyframe's value of each image field, ``files``: path -> hash)."""
    spec = MODES[mode]
    recipe = {"mode": mode}
    absent = dict(spec.absent)
    for field in spec.inputs:
        path = held[field]
        if path:
            recipe[IMAGES[field].recipe] = files[path]
        elif field in absent:
            recipe[IMAGES[field].recipe] = absent[field]
    return recipe
