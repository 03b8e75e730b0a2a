"""The values plot (``render.py SCENE --plot values.png``): every keyframed value over the frames.

Read from the plan's recipes (``pipeline.outputs.record.flat``), so it shows what the frames are keyed with:
guidance, strength, the feedback motion, LoRA scales, the prompt mix ``t`` (0 on a keyframe, rising
to the next) and the noise ``t`` (seed travel, circle). Values that never change are listed under the
plot instead of getting a flat line each. matplotlib draws it with the Agg backend (no display);
the format follows the suffix (``.png`` or ``.svg``). No model is loaded and torch is not imported::

    from pipeline.outputs.plot import plot_values, write_plot
    plot_values(session.plan())["guidance"]      # [7.5, 7.4, ...] one value per frame
    write_plot(session.plan(), Path("values.svg"), title="dog_cat.yaml", keyframes=[0, 63])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.audio.timeline import scene_timeline
from pipeline.outputs.files import atomic_output
from pipeline.outputs.record import flat, frame_row, table_columns
from pipeline.plan.planner import Plan

PLOT_SUFFIXES: tuple[str, ...] = (".png", ".svg")
# Columns of the per-frame table that are not values to plot.
_NOT_VALUES = {"frame", "key", "mode", "prompt", "negative_prompt", "seed", "seed_to"}
# How each value is named on the plot.
_LABELS = {"prompt_t": "prompt mix t", "noise_t": "noise t", "grid_u": "grid u", "grid_v": "grid v"}


def plot_problem(path: Path) -> str | None:
    """Why ``--plot PATH`` cannot be written, or None."""
    if path.suffix.lower() not in PLOT_SUFFIXES:
        return f"'{path}' has no plot format; end it in {' or '.join(PLOT_SUFFIXES)}"
    if path.is_dir():
        return f"'{path}' is a folder; give a file name ending in .png or .svg"
    return None


def plot_values(plan: Plan) -> dict[str, list[float]]:
    """Every numeric value of the frames' recipes, one list per value, in table order.

    A value a frame does not have (strength in a txt2img frame of a scene that changes mode) is NaN
    there, which matplotlib leaves as a gap.
    """
    rows = [flat(frame_row(plan, job)) for job in plan]
    columns = [c for c in table_columns(rows) if c not in _NOT_VALUES]
    return {c: [float(r.get(c, "nan")) for r in rows] for c in columns if any(c in r for r in rows)}


def write_plot(
    plan: Plan,
    path: Path,
    *,
    title: str = "",
    keyframes: Sequence[int] = (),
    fps: float | None = None,
    beats: Sequence[int] = (),
) -> list[str]:
    """Draw :func:`plot_values` to ``path`` (PNG or SVG by suffix), atomically; returns the values drawn.

    One panel per value that changes, sharing the frame axis, with the keyframes as dotted lines
    and the soundtrack's ``beats`` (frames) as faint red lines; the values that stay the same are
    named with their value under the panels.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: never a window, works without a display
    import matplotlib.pyplot as plt

    values = plot_values(plan)
    moving = {k: v for k, v in values.items() if len({x for x in v if x == x}) > 1}
    still = {k: v[0] for k, v in values.items() if k not in moving}
    frames = list(range(len(plan)))
    panels = max(len(moving), 1)
    with matplotlib.rc_context({"svg.fonttype": "none", "font.size": 9}):  # SVG text stays text
        fig, axes = plt.subplots(panels, 1, sharex=True, figsize=(8, 1.2 + 1.3 * panels), squeeze=False)
        try:
            for ax, (name, ys) in zip(axes[:, 0], moving.items(), strict=False):
                ax.plot(frames, ys, linewidth=1.4, marker="." if len(frames) <= 64 else None)
                ax.set_ylabel(_LABELS.get(name, name), rotation=0, ha="right", va="center")
                for k in keyframes:
                    ax.axvline(k, color="0.6", linestyle=":", linewidth=0.8)
                for b in beats:
                    ax.axvline(b, color="tab:red", alpha=0.35, linewidth=0.8)
                ax.grid(True, axis="y", color="0.9")
            if not moving:
                axes[0, 0].text(0.5, 0.5, "no value changes over the frames", ha="center", va="center")
                axes[0, 0].set_yticks([])
            bottom = axes[-1, 0]
            bottom.set_xlabel(
                "frame" + (f" ({fps:g} fps)" if fps else "") + ("; beats in red" if beats else "")
            )
            bottom.set_xlim(0, max(len(plan) - 1, 1))
            if title:
                fig.suptitle(title)
            if still:
                text = "constant: " + ", ".join(f"{_LABELS.get(k, k)} {v:g}" for k, v in still.items())
                fig.text(0.01, 0.005, text, fontsize=8, color="0.3", va="bottom", wrap=True)
            fig.tight_layout(rect=(0, 0.04 if still else 0, 1, 1))
            with atomic_output(path) as tmp:
                fig.savefig(tmp, format=path.suffix.lower()[1:], dpi=100)
        finally:
            plt.close(fig)
    return list(moving)


def scene_plot(session: Any, path: Path) -> list[str]:
    """The plot of an open session's scene (what ``--plot`` writes)."""
    scene = session.scene
    timeline = scene_timeline(scene)
    beats = timeline.ref_frames("beat") if timeline is not None and timeline.analysis else []
    return write_plot(
        session.plan(),
        path,
        title=scene.path.name,
        keyframes=scene.written_keyframe_frames,
        fps=scene.fps,
        beats=[b for b in beats if b < len(session.plan())],
    )
