"""Outputs as a whole: overlapping paths refused, frames folders checked by what they hold, grid columns,
and files left behind by an earlier run noted.

The overlap cases check ``check_outputs`` in this process (fast); ``tests/reliability/test_outputs_safety.py``
runs a few of them through the real CLI in a child process (exit 2, nothing imported, nothing written).
The render cases use the embedded tiny model at 32x32 with 2 steps.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from pipeline.outputs.targets import check_outputs, output_settings
from pipeline.scene.load import load_scene
from pipeline.scene.problems import SceneError
from tests.conftest import run_render as render

SCENE = """\
model: tiny
size: [32, 32]
steps: 2
seed: 3
frames: {frames}
keyframes:
  - {{frame: 0, prompt: a dog}}
  - {{frame: {last}, prompt: a cat}}
{outputs}"""


def write(folder: Path, outputs: str, frames: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "scene.yaml"
    path.write_text(SCENE.format(frames=frames, last=frames - 1, outputs=outputs))
    return path


def problems(scene: Path, out_dir: Path) -> list[str]:
    with pytest.raises(SceneError) as exc:
        check_outputs(load_scene(scene), out_dir)
    return [str(p) for p in exc.value.problems]


# -- outputs that overlap -----------------------------------------------------------------------

OVERLAPS = {
    # the grid image would overwrite frame 0 of the folder (the case of the report)
    "file in a frames folder": (
        "outputs: [f/, f/frame_00000.png]\n",
        "scene.yaml:9:15: output 2 'f/frame_00000.png' lies inside output 1 'f/'",
    ),
    "frames folder listed after a file in it": (
        "outputs: [f/frame_00000.png, f]\n",
        "scene.yaml:9:30: output 2 'f' is a folder that holds output 1 'f/frame_00000.png'",
    ),
    "same file spelt twice": (
        "outputs: [a.gif, ./a.gif]\n",
        "scene.yaml:9:18: output 2 './a.gif' is the same path as output 1 'a.gif'",
    ),
    "same folder spelt twice": (
        "outputs:\n  - f/\n  - {path: ./f, kind: frames}\n",
        "scene.yaml:11:5: output 2 './f' is the same path as output 1 'f/'",
    ),
    "file deep inside a frames folder": (
        "outputs:\n  - out.mp4\n  - g/\n  - g/sub/x.gif\n",
        "scene.yaml:12:5: output 3 'g/sub/x.gif' lies inside output 2 'g/'",
    ),
    "file inside another file": (
        "outputs: [a.gif, a.gif/b.png]\n",
        "scene.yaml:9:18: output 2 'a.gif/b.png' lies inside output 1 'a.gif'",
    ),
}


@pytest.mark.parametrize("case", list(OVERLAPS))
def test_overlapping_outputs_are_refused_at_the_later_ones_line(case: str, tmp_path: Path) -> None:
    outputs, expected = OVERLAPS[case]
    scene = write(tmp_path, outputs)
    found = problems(scene, tmp_path / "out")
    assert len(found) == 1, found
    assert found[0].startswith(f"{tmp_path}/{expected}, so one would overwrite the other; "), found[0]
    assert not (tmp_path / "out").exists()


def test_an_output_reached_through_a_symlinked_folder_is_the_same_path(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(".", out / "here")  # out/here/a.gif is out/a.gif
    scene = write(tmp_path, "outputs: [a.gif, here/a.gif]\n")
    assert [p.split(": ", 1)[1] for p in problems(scene, out)] == [
        "output 2 'here/a.gif' is the same path as output 1 'a.gif', so one would overwrite the other; "
        "give each output its own path, none inside another output's folder"
    ]


def test_outputs_side_by_side_are_fine(tmp_path: Path) -> None:
    scene = write(tmp_path, "outputs: [f/, g/, f.gif, ff/x.gif, sheet.png]\n")
    targets = check_outputs(load_scene(scene), tmp_path / "out")
    assert [t.kind for t in targets] == ["frames", "frames", "gif", "gif", "grid"]
    assert targets.out_dir == (tmp_path / "out").resolve()


def test_every_overlap_and_long_name_is_reported_at_once(tmp_path: Path) -> None:
    long = "x" * 219 + ".gif"  # fits 255 bytes, but not with the temporary name's 33 more
    scene = write(tmp_path, f"outputs:\n  - f/\n  - f/a.png\n  - b.gif\n  - b.gif/c.png\n  - {long}\n")
    found = [p.split(": ", 1) for p in problems(scene, tmp_path / "out")]
    assert [(where.rsplit(":", 2)[1], what.split(" ", 2)[:2]) for where, what in found] == [
        ("11", ["output", "2"]),
        ("13", ["output", "4"]),
        ("14", ["output", "5"]),
    ]
    assert found[2][1] == (
        "output 5 cannot be written: 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...xxxxxxxxxxxxxxxxxxxxxxxxxx.gif' is 223 bytes "
        "long, and 33 more while it is written (a temporary name beside it); this file system allows 255 per "
        "name, so at most 222 for this name"
    )


# -- a frames folder is checked by what it holds ---------------------------------------------------


def _frames(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def rendered_folder(tmp_path: Path) -> tuple[Path, Path, dict[str, bytes]]:
    scene = write(tmp_path / "s", "outputs: [f/]\n")
    first = render(scene, tmp_path / "cache")
    folder = tmp_path / "s" / "renders" / "scene" / "f"
    assert first["output_status"] == {str(folder): "written"}
    return scene, folder, _frames(folder)


def _status(scene: Path, cache: Path) -> str:
    (status,) = render(scene, cache)["output_status"].values()
    return status


def test_a_frame_copied_over_another_with_cp_p_is_noticed(rendered_folder, tmp_path: Path) -> None:
    scene, folder, good = rendered_folder
    assert good["frame_00000.png"] != good["frame_00001.png"]
    shutil.copy2(folder / "frame_00000.png", folder / "frame_00001.png")  # cp -p: content and mtime
    assert _status(scene, tmp_path / "cache") == "written"
    assert _frames(folder) == good
    assert _status(scene, tmp_path / "cache") == "up to date"


def test_a_frame_edited_in_place_keeping_size_and_mtime_is_noticed(rendered_folder, tmp_path: Path) -> None:
    scene, folder, good = rendered_folder
    frame = folder / "frame_00002.png"
    st = frame.stat()
    data = bytearray(frame.read_bytes())
    data[-20] ^= 0xFF
    frame.write_bytes(bytes(data))
    os.utime(frame, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only the ctime tells
    assert (frame.stat().st_size, frame.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert _status(scene, tmp_path / "cache") == "written"
    assert _frames(folder) == good


@pytest.mark.parametrize("change", ["remove", "add", "replace by a renamed file"])
def test_frames_removed_added_or_swapped_are_noticed(rendered_folder, tmp_path: Path, change: str) -> None:
    scene, folder, good = rendered_folder
    if change == "remove":
        (folder / "frame_00001.png").unlink()
    elif change == "add":
        shutil.copy2(folder / "frame_00000.png", folder / "frame_00003.png")
    else:
        st = (folder / "frame_00001.png").stat()
        shutil.copy2(folder / "frame_00000.png", folder / "new.png")
        os.utime(folder / "new.png", ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(folder / "new.png", folder / "frame_00001.png")
    assert _status(scene, tmp_path / "cache") == "written"
    assert _frames(folder) == good


def test_an_output_file_edited_keeping_size_and_mtime_is_rewritten(tmp_path: Path) -> None:
    scene = write(tmp_path / "s", "outputs: [out.gif]\n")
    render(scene, tmp_path / "cache")
    gif = tmp_path / "s" / "renders" / "scene" / "out.gif"
    good, st = gif.read_bytes(), gif.stat()
    gif.write_bytes(good[:-40] + bytes(40))
    os.utime(gif, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _status(scene, tmp_path / "cache") == "written"
    assert gif.read_bytes() == good


# -- grid image columns -----------------------------------------------------------------------------


@pytest.mark.parametrize(("frames", "cols"), [(2, 2), (4, 2), (10, 4), (16, 4), (17, 5), (100, 10)])
def test_grid_image_columns_are_square_over_the_frames(tmp_path: Path, frames: int, cols: int) -> None:
    # Two keyframes, however many frames: the columns follow the frames (as the Keras example's plot_grid).
    scene = load_scene(write(tmp_path, "outputs: [sheet.png, {path: six.png, cols: 6}]\n", frames=frames))
    sheet, six = check_outputs(scene, tmp_path / "out")
    assert output_settings(scene, sheet, frames) == {"cols": cols}
    assert output_settings(scene, six, frames) == {"cols": 6}


def test_a_grid_scene_keeps_its_own_columns(tmp_path: Path) -> None:
    scene_file = tmp_path / "grid.yaml"
    scene_file.write_text(
        "model: tiny\nsize: [32, 32]\nsteps: 2\n"
        "grid: {prompts: [a, b, c, d], rows: 2, cols: 3}\n"
        "outputs: [sheet.png]\n"
    )
    scene = load_scene(scene_file)
    (sheet,) = check_outputs(scene, tmp_path / "out")
    assert output_settings(scene, sheet, 6) == {"cols": 3}
    scene_file.write_text(scene_file.read_text().replace("outputs: [sheet.png]\n", ""))
    default = load_scene(scene_file)  # the default outputs: MP4, GIF and grid.png
    grid_png = [t for t in check_outputs(default, tmp_path / "out") if t.kind == "grid"]
    assert [output_settings(default, t, 6) for t in grid_png] == [{"cols": 3}]


def test_a_four_frame_sheet_is_two_by_two(tmp_path: Path) -> None:
    scene = write(tmp_path / "s", "outputs: [sheet.png]\n", frames=4)
    render(scene, tmp_path / "cache")
    assert Image.open(tmp_path / "s" / "renders" / "scene" / "sheet.png").size == (64, 64)


# -- files an earlier run wrote that are no longer outputs ---------------------------------------------


def test_outputs_left_behind_are_noted_and_left_as_is(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    scene = write(tmp_path / "s", "")  # no outputs: the default MP4 and GIF
    out = tmp_path / "s" / "renders" / "scene"
    assert render(scene, cache)["notes"] == []
    mp4, gif = (out / "scene.mp4").read_bytes(), (out / "scene.gif").read_bytes()

    write(tmp_path / "s", "outputs: [sheet.png]\n")
    defaults = "its 'outputs:' list replaces the default outputs"
    assert render(scene, cache)["notes"] == [
        f"{out}/scene.mp4 is no longer an output of this scene ({defaults}); the file from an earlier run "
        "was left as is and is not updated any more",
        f"{out}/scene.gif is no longer an output of this scene ({defaults}); the file from an earlier run "
        "was left as is and is not updated any more",
    ]
    assert ((out / "scene.mp4").read_bytes(), (out / "scene.gif").read_bytes()) == (mp4, gif)

    write(tmp_path / "s", "outputs: [other.gif]\n")  # sheet.png is dropped too
    (out / "scene.mp4").unlink()
    notes = render(scene, cache)["notes"]
    assert [n.split(" is no longer an output of this scene ")[0] for n in notes] == [
        f"{out}/scene.gif",
        f"{out}/sheet.png",
    ]
    assert "(it was taken off 'outputs:')" in notes[1]
    assert (out / "sheet.png").is_file()

    (out / "sheet.png").unlink()
    (out / "scene.gif").unlink()
    again = render(scene, cache)
    assert again["notes"] == []
    assert set(again["output_status"].values()) == {"up to date"}


def test_each_output_folder_is_cleaned_of_dead_partials_once_per_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue 9: clean_partials ran twice per output (in assemble and again in write_output). Now
    # assemble cleans each folder once, before anything is written, also when every output is up to date.
    import pipeline.outputs.assemble as assemble
    import pipeline.outputs.writers as writers

    scene = write(tmp_path / "s", "outputs: [a.mp4, b.gif, f/]\n")
    out = tmp_path / "s" / "renders" / "scene"
    calls: list[Path] = []
    real = assemble.clean_partials

    def counting(folder: Path) -> list[Path]:
        calls.append(Path(folder))
        return real(folder)

    monkeypatch.setattr(assemble, "clean_partials", counting)
    monkeypatch.setattr(writers, "clean_partials", counting)
    first = render(scene, tmp_path / "cache")
    assert set(first["output_status"].values()) == {"written"}
    assert sorted(calls) == sorted([out, out / "f"])
    calls.clear()
    dead = f".b.gif.partial-{2**22 + 1}-abcdef01.gif"  # pid beyond Linux's maximum: never alive
    (out / dead).write_bytes(b"x")
    again = render(scene, tmp_path / "cache")
    assert set(again["output_status"].values()) == {"up to date"}
    assert sorted(calls) == sorted([out, out / "f"])
    assert not (out / dead).exists()
