"""kill -9 while outputs are written: the final path keeps the previous file (or none), never a broken one.

Outputs are written to ``.NAME.partial-PID-RAND.ext`` and renamed into place; a killed run leaves its
temporary file behind, and the next run removes it (``clean_partials``: its pid is dead) and writes the
new output. The kill is sent the moment the run's temporary file appears (polled every 0.5 ms): out.mp4
is written first, then out.gif (a rubber-band GIF, the longest to write).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tests.reliability._util import (
    Render,
    gif_frames,
    mp4_frames,
    partials,
    read_log,
    render_sync,
    wait_until,
    write_scene,
)

FRAMES = 60
OUTPUTS = ("out.mp4", "{path: out.gif, rubber_band: true}")
NAMES = ("out.mp4", "out.gif")  # in the order they are written
GIF_FRAMES = FRAMES + FRAMES - 3  # rubber band: frames + frames[2:-1][::-1]


def kill_while_writing(run: Render, out: Path, only: str | None = None) -> list[str]:
    """Kill ``run`` as soon as one of its temporary output files (or ``only``'s) appears; returns their names."""

    def writing() -> list[Path]:
        return [
            p
            for p in partials(out)
            if f".partial-{run.pid}-" in p.name and (only is None or f".{only}." in p.name)
        ]

    found = wait_until(lambda: writing() or run.proc.poll() is not None, 300, poll=0.0005)
    run.kill()
    assert found is not True and run.proc.returncode == -9, (
        f"the run finished before it wrote outputs:\n{run.stderr}"
    )
    left = [p.name for p in partials(out) if f".partial-{run.pid}-" in p.name]
    assert len(left) == 1, f"expected one temporary file of the killed run, found {left}"
    return [name for name in NAMES if left[0].startswith(f".{name}.partial-")]


def gif_delay(path: Path) -> int:
    with Image.open(path) as im:
        return int(im.info["duration"])


@pytest.mark.slow
def test_kill_while_writing_outputs_keeps_the_old_file_and_next_run_cleans_up(tmp_path: Path) -> None:
    scene_dir, cache, out, log = (
        tmp_path / "scenes",
        tmp_path / "cache",
        tmp_path / "out",
        tmp_path / "render.log",
    )
    scene = write_scene(scene_dir, FRAMES, fps=12, outputs=OUTPUTS)

    # 1. First render, killed while writing its first output: nothing at the final paths, not a broken file.
    first = Render(scene, cache, out, log, tag="first")
    caught = kill_while_writing(first, out)  # out.mp4, unless its short write slipped between two polls
    for name in NAMES[NAMES.index(caught[0]) :]:
        assert not (out / name).exists(), f"{name} stands at its final path although its write was killed"
    assert len({key for key, _ in read_log(log)}) == FRAMES  # outputs come after every frame is stored
    leftover = partials(out)

    # 2. The next run renders nothing, removes the dead run's temporary file, writes both outputs.
    report = render_sync(scene, cache, out, log)
    assert report["rendered"] == 0
    assert set(report["output_status"].values()) == {"written"}
    assert not partials(out) and not any(p.exists() for p in leftover)
    old = {name: (out / name).read_bytes() for name in NAMES}
    assert gif_delay(out / "out.gif") == 80  # 12 fps, in whole centiseconds

    # 3. fps changes: both outputs must be rewritten (nothing renders). Kill while writing the first one.
    write_scene(scene_dir, FRAMES, fps=6, outputs=OUTPUTS)
    second = Render(scene, cache, out, log, tag="second")
    caught = kill_while_writing(second, out)
    done_before = NAMES[: NAMES.index(caught[0])]  # written and renamed before the kill (normally none)
    for name in NAMES:
        if name not in done_before:
            assert (out / name).read_bytes() == old[name], f"{name} changed although its rewrite was killed"
    second_partial = [p for p in partials(out) if f".partial-{second.pid}-" in p.name]

    # 4. Again, killed while writing out.gif: out.mp4 is new by then, out.gif still the old one; the
    #    temporary file of the previous killed run is gone.
    third = Render(scene, cache, out, log, tag="third")
    assert kill_while_writing(third, out, only="out.gif") == ["out.gif"]
    assert not any(p.exists() for p in second_partial), "the dead run's temporary file was not removed"
    assert (out / "out.mp4").read_bytes() != old["out.mp4"]
    assert len(mp4_frames(out / "out.mp4")) == FRAMES
    assert (out / "out.gif").read_bytes() == old["out.gif"]
    assert [p.name for p in partials(out)] and all(f".partial-{third.pid}-" in p.name for p in partials(out))

    # 5. A last run writes the new GIF and leaves no temporary file.
    report = render_sync(scene, cache, out, log)
    assert report["rendered"] == 0
    assert report["output_status"][str(out / "out.gif")] == "written"
    assert report["output_status"][str(out / "out.mp4")] == "up to date"
    assert not partials(out)
    assert gif_delay(out / "out.gif") == 170  # 6 fps
    assert len(gif_frames(out / "out.gif")) == GIF_FRAMES
    for run in (first, second, third):
        run.kill_group()  # an ffmpeg child orphaned by the kill, if it still runs
