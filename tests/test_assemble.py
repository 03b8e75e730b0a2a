"""Tests for the writers (pipeline.outputs.writers, gif, files, kinds): exact frame counts, streaming, and atomic writes."""

from __future__ import annotations

import gc
import io
import os
import subprocess
import sys
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from pipeline.outputs.files import atomic_output, clean_partials, name_length_problem
from pipeline.outputs.kinds import OUTPUT_KINDS, kind_for_path
from pipeline.outputs.sequences import rubber_band
from pipeline.outputs.writers import write_gif, write_grid, write_mp4, write_output, write_png_frames

ROOT = Path(__file__).resolve().parents[1]

# Far apart in RGB, so that after GIF quantisation (or mild loss) the nearest one is unambiguous.
COLOURS = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (250, 190, 212),
    (0, 128, 128),
    (170, 110, 40),
    (128, 0, 0),
]
SIZE = 64


def make_frame(colour_index: int, size: tuple[int, int] = (SIZE, SIZE)) -> Image.Image:
    """A solid colour with a white bar whose length encodes the colour index (top-left)."""
    image = Image.new("RGB", size, COLOURS[colour_index])
    image.paste((255, 255, 255), (0, 0, 2 + 2 * colour_index, 2))
    return image


def colour_index_at(image: Image.Image, xy: tuple[int, int] = (SIZE // 2, SIZE // 2)) -> int:
    """Which of COLOURS the pixel at xy is closest to."""
    pixel = image.convert("RGB").getpixel(xy)
    return min(
        range(len(COLOURS)), key=lambda i: sum((a - b) ** 2 for a, b in zip(pixel, COLOURS[i], strict=True))
    )


def gif_frames(path: Path) -> list[Image.Image]:
    with Image.open(path) as image:
        out = []
        for i in range(image.n_frames):
            image.seek(i)
            frame = image.convert("RGB")
            frame.info = dict(image.info)
            out.append(frame)
        return out


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class LazyFrames(Sequence[Image.Image]):
    """Like the renderer's cache-backed sequence: decodes PNG bytes on every access.

    Counts how many decoded frames are alive at once (via weakref.finalize), and can raise on
    a given index to simulate a failure half-way through a write.
    """

    def __init__(
        self,
        colour_indices: Sequence[int],
        *,
        fail_at: int | None = None,
        error: type[BaseException] = RuntimeError,
    ) -> None:
        self._blobs = [png_bytes(make_frame(i)) for i in colour_indices]
        self._fail_at = fail_at
        self._error = error
        self.alive = 0
        self.max_alive = 0
        self.accesses: list[int] = []

    def __len__(self) -> int:
        return len(self._blobs)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            raise TypeError("the writers must index frames one by one")
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        if index == self._fail_at:
            raise self._error(f"decode failed at frame {index}")
        self.accesses.append(index)
        image = Image.open(io.BytesIO(self._blobs[index]))
        image.load()
        self.alive += 1
        self.max_alive = max(self.max_alive, self.alive)
        weakref.finalize(image, self._release)
        return image

    def _release(self) -> None:
        self.alive -= 1


def no_partials(directory: Path) -> bool:
    return not [p for p in directory.rglob("*") if ".partial-" in p.name]


# --------------------------------------------------------------------------------------------
# MP4


def test_mp4_frame_count_size_and_fps(tmp_path: Path) -> None:
    import imageio.v2 as iio

    frames = [make_frame(i % len(COLOURS)) for i in range(10)] + [make_frame(3)] * 6
    out = tmp_path / "sub" / "walk.mp4"
    write_mp4(out, frames, 12)
    reader = iio.get_reader(out, format="FFMPEG")
    try:
        meta = reader.get_meta_data()
        assert reader.count_frames() == 16
        assert meta["size"] == (SIZE, SIZE)
        assert meta["fps"] == pytest.approx(12.0)
        assert meta["codec"] == "h264"
        assert meta["pix_fmt"].startswith("yuv420p")
        first = reader.get_data(0)
    finally:
        reader.close()
    # Lossy, but the colour of frame 0 is clearly recognisable.
    assert colour_index_at(Image.fromarray(first)) == 0
    assert no_partials(tmp_path)


def test_mp4_streams_frames(tmp_path: Path) -> None:
    frames = LazyFrames([i % len(COLOURS) for i in range(40)])
    write_mp4(tmp_path / "lazy.mp4", frames, 24)
    assert frames.accesses == list(range(40))  # each frame decoded once, in order
    assert frames.max_alive <= 3
    assert frames.alive == 0


def test_mp4_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no frames"):
        write_mp4(tmp_path / "a.mp4", [], 12)
    with pytest.raises(ValueError, match="even"):
        write_mp4(tmp_path / "a.mp4", [make_frame(0, (63, 64))], 12)
    with pytest.raises(ValueError, match="same size"):
        write_mp4(tmp_path / "a.mp4", [make_frame(0), make_frame(1, (32, 32))], 12)
    with pytest.raises(ValueError, match="fps"):
        write_mp4(tmp_path / "a.mp4", [make_frame(0)], 0)
    with pytest.raises(ValueError, match="quality"):
        write_mp4(tmp_path / "a.mp4", [make_frame(0)], 12, quality=0)
    gc.collect()
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# GIF


def test_gif_keeps_identical_consecutive_frames(tmp_path: Path) -> None:
    order = [0, 1, 1, 1, 2, 3, 3, 4, 4, 4, 4, 5]
    out = tmp_path / "held.gif"
    write_gif(out, [make_frame(i) for i in order], 10)
    frames = gif_frames(out)
    assert len(frames) == len(order)
    assert [colour_index_at(f) for f in frames] == order
    assert all(f.info["duration"] == 100 for f in frames)
    with Image.open(out) as image:
        assert image.n_frames == len(order)
        assert image.info["loop"] == 0


def test_gif_pixels_are_exact_for_few_colours(tmp_path: Path) -> None:
    # Each frame has two colours, well within a 256-colour palette: nothing may change.
    order = [0, 5, 5, 11]
    out = tmp_path / "exact.gif"
    originals = [make_frame(i) for i in order]
    write_gif(out, originals, 25)
    for original, decoded in zip(originals, gif_frames(out), strict=True):
        assert decoded.tobytes() == original.tobytes()


def test_gif_large_frames_use_sampled_palette(tmp_path: Path) -> None:
    # 512x384 takes the downscaled-palette path; solid areas must still come out right.
    order = [0, 1, 1, 6]
    out = tmp_path / "large.gif"
    write_gif(out, [make_frame(i, (512, 384)) for i in order], 10)
    frames = gif_frames(out)
    assert len(frames) == len(order)
    assert [f.size for f in frames] == [(512, 384)] * len(order)
    assert [colour_index_at(f, (256, 192)) for f in frames] == order
    for frame, i in zip(frames, order, strict=True):
        assert max(abs(a - b) for a, b in zip(frame.getpixel((256, 192)), COLOURS[i], strict=True)) <= 2


def test_gif_loop_and_duration_options(tmp_path: Path) -> None:
    out = tmp_path / "once.gif"
    write_gif(out, [make_frame(0), make_frame(1)], 15, loop=3)
    with Image.open(out) as image:
        assert image.info["loop"] == 3
        # 1000/15 = 66.7 ms, rounded to GIF's centiseconds: 70 ms.
        assert image.info["duration"] == 70
    write_gif(out, [make_frame(0), make_frame(1)], 10, loop=None)
    with Image.open(out) as image:
        assert "loop" not in image.info


def test_gif_rubber_band_order(tmp_path: Path) -> None:
    n = 6
    out = tmp_path / "band.gif"
    write_gif(out, [make_frame(i) for i in range(n)], 10, rubber_band=True)
    frames = gif_frames(out)
    assert len(frames) == n + n - 3
    assert [colour_index_at(f) for f in frames] == [0, 1, 2, 3, 4, 5, 4, 3, 2]


def test_gif_streams_frames(tmp_path: Path) -> None:
    frames = LazyFrames([i % len(COLOURS) for i in range(30)])
    write_gif(tmp_path / "lazy.gif", frames, 10, rubber_band=True)
    assert frames.max_alive <= 2
    with Image.open(tmp_path / "lazy.gif") as image:
        assert image.n_frames == 30 + 27


def test_gif_is_readable_by_ffmpeg(tmp_path: Path) -> None:
    # A second, independent decoder: the hand-assembled stream must be a valid GIF.
    import imageio_ffmpeg

    out = tmp_path / "check.gif"
    write_gif(out, [make_frame(i) for i in (0, 1, 1, 2)], 10)
    result = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(out), "-f", "null", "-"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


# --------------------------------------------------------------------------------------------
# Rubber band


@pytest.mark.parametrize("n", range(8))
def test_rubber_band_matches_seed_formula(n: int) -> None:
    items = list(range(n))
    expected = items + items[2:-1][::-1]
    assert rubber_band(items) == expected
    assert len(expected) == n + max(n - 3, 0)
    lazy = LazyFrames(list(range(n)))
    view = rubber_band(lazy)
    assert len(view) == len(expected)
    assert lazy.accesses == []  # nothing decoded up front
    assert [colour_index_at(view[i]) for i in range(len(view))] == expected
    assert [colour_index_at(f) for f in view[1:4]] == expected[1:4]
    if expected:
        assert colour_index_at(view[-1]) == expected[-1]


# --------------------------------------------------------------------------------------------
# PNG frames and grid


def test_png_frames_names_count_and_stale_removal(tmp_path: Path) -> None:
    directory = tmp_path / "frames"
    written = write_png_frames(directory, [make_frame(i) for i in range(5)])
    assert [p.name for p in written] == [f"frame_{i:05d}.png" for i in range(5)]
    (directory / "notes.txt").write_text("keep me")

    written = write_png_frames(directory, LazyFrames([7, 8, 9]))
    assert [p.name for p in written] == ["frame_00000.png", "frame_00001.png", "frame_00002.png"]
    assert sorted(p.name for p in directory.iterdir()) == [*(p.name for p in written), "notes.txt"]
    for path, colour in zip(written, (7, 8, 9), strict=True):
        with Image.open(path) as image:
            assert image.tobytes() == make_frame(colour).tobytes()


def test_png_frames_start_offset(tmp_path: Path) -> None:
    write_png_frames(tmp_path, [make_frame(i) for i in range(6)])
    written = write_png_frames(tmp_path, [make_frame(10), make_frame(11)], start=2)
    assert [p.name for p in written] == ["frame_00002.png", "frame_00003.png"]
    # Frames below start are kept; frames from start + count on are stale.
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"frame_{i:05d}.png" for i in range(4)]


@pytest.mark.parametrize(("cols", "rows", "gap"), [(3, None, 0), (4, 2, 0), (3, None, 5), (7, 1, 2)])
def test_grid_layout(tmp_path: Path, cols: int, rows: int | None, gap: int) -> None:
    n = 7
    out = tmp_path / "sheet.png"
    write_grid(out, [make_frame(i) for i in range(n)], cols, rows, gap=gap)
    expected_rows = rows if rows is not None else -(-n // cols)
    with Image.open(out) as sheet:
        assert sheet.size == (
            cols * SIZE + (cols - 1) * gap,
            expected_rows * SIZE + (expected_rows - 1) * gap,
        )
        for i in range(n):
            row, col = i // cols, i % cols
            centre = (col * (SIZE + gap) + SIZE // 2, row * (SIZE + gap) + SIZE // 2)
            assert sheet.convert("RGB").getpixel(centre) == COLOURS[i]


def test_grid_rejects_too_few_cells(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="room for 4"):
        write_grid(tmp_path / "g.png", [make_frame(i) for i in range(5)], 2, 2)


def test_grid_jpg(tmp_path: Path) -> None:
    out = tmp_path / "sheet.jpg"
    write_grid(out, [make_frame(0), make_frame(1)], 2)
    with Image.open(out) as sheet:
        assert sheet.format == "JPEG"
        assert sheet.size == (2 * SIZE, SIZE)


# --------------------------------------------------------------------------------------------
# Atomicity


def test_atomic_output_temp_name_and_replace(tmp_path: Path) -> None:
    final = tmp_path / "new" / "dir" / "dog.gif"
    with atomic_output(final) as tmp:
        assert tmp.parent == final.parent
        assert tmp.name.startswith(f".dog.gif.partial-{os.getpid()}-")
        assert tmp.suffix == ".gif"
        assert not final.exists()
        tmp.write_bytes(b"new")
    assert final.read_bytes() == b"new"
    assert no_partials(tmp_path)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_output_keeps_old_file_on_error(tmp_path: Path, error: type[BaseException]) -> None:
    final = tmp_path / "out.mp4"
    final.write_bytes(b"old")
    with pytest.raises(error), atomic_output(final) as tmp:
        tmp.write_bytes(b"half")
        raise error()
    assert final.read_bytes() == b"old"
    assert sorted(tmp_path.iterdir()) == [final]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize(
    ("name", "write"),
    [
        ("out.mp4", lambda path, frames: write_mp4(path, frames, 12)),
        ("out.gif", lambda path, frames: write_gif(path, frames, 12)),
        ("out.png", lambda path, frames: write_grid(path, frames, 4)),
    ],
)
def test_writer_failing_half_way_leaves_old_file(
    tmp_path: Path, name: str, write, error: type[BaseException]
) -> None:
    final = tmp_path / name
    old = b"previous render, must survive"
    final.write_bytes(old)
    with pytest.raises(error, match="frame 5"):
        write(final, LazyFrames(list(range(10)), fail_at=5, error=error))
    # A writer object left unclosed would finish its file at garbage collection: force it now.
    gc.collect()
    assert final.read_bytes() == old
    assert sorted(tmp_path.iterdir()) == [final]


def test_clean_partials_removes_only_dead_pids(tmp_path: Path) -> None:
    # Linux caps pids at 2**22 (pid_max), so this one cannot be running.
    dead_pid = 2**22 + 12345
    with pytest.raises(ProcessLookupError):
        os.kill(dead_pid, 0)
    stale = tmp_path / f".dog.gif.partial-{dead_pid}-ab12cd34.gif"
    live = tmp_path / f".dog.mp4.partial-{os.getpid()}-00ff00ff.mp4"
    no_suffix = tmp_path / f".frames.partial-{dead_pid}-0a0b"
    unrelated = [tmp_path / "dog.gif", tmp_path / ".hidden", tmp_path / "x.partial-1-ab.gif"]
    for path in [stale, live, no_suffix, *unrelated]:
        path.write_bytes(b"x")
    removed = clean_partials(tmp_path)
    assert sorted(removed) == sorted([stale, no_suffix])
    assert sorted(tmp_path.iterdir()) == sorted([live, *unrelated])
    assert clean_partials(tmp_path / "missing") == []


def test_clean_partials_keeps_a_concurrent_writer(tmp_path: Path) -> None:
    # A real second process: its partial survives while it runs and is removed once it is gone.
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    partial = tmp_path / f".scene.gif.partial-{child.pid}-deadbeef.gif"
    partial.write_bytes(b"x")
    try:
        assert clean_partials(tmp_path) == []
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
    assert clean_partials(tmp_path) == [partial]


# --------------------------------------------------------------------------------------------
# Dispatch


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("out/walk.mp4", "mp4"),
        ("walk.GIF", "gif"),
        ("sheet.png", "grid"),
        ("sheet.jpg", "grid"),
        ("renders/frames/", "frames"),
        ("renders/frames", "frames"),
        ("renders/v1.2/", "frames"),
    ],
)
def test_kind_for_path(path: str, kind: str) -> None:
    assert kind_for_path(path) == kind


def test_kind_for_path_rejects_unknown_suffix() -> None:
    with pytest.raises(ValueError) as excinfo:
        kind_for_path("walk.webm")
    for kind in OUTPUT_KINDS:
        assert kind in str(excinfo.value)


def test_write_output_dispatch(tmp_path: Path) -> None:
    frames = [make_frame(i) for i in range(5)]
    write_output("gif", tmp_path / "a.gif", frames, fps=10, rubber_band=True, loop=0)
    with Image.open(tmp_path / "a.gif") as image:
        assert image.n_frames == 5 + 2
    write_output("frames", tmp_path / "frames", frames, fps=10)
    assert len(list((tmp_path / "frames").glob("frame_*.png"))) == 5
    write_output("grid", tmp_path / "sheet.png", frames, cols=5, fps=10)
    with Image.open(tmp_path / "sheet.png") as image:
        assert image.size == (5 * SIZE, SIZE)
    write_output("mp4", tmp_path / "a.mp4", frames, fps=8, quality=6)
    assert (tmp_path / "a.mp4").stat().st_size > 0

    with pytest.raises(ValueError, match="allowed kinds"):
        write_output("webm", tmp_path / "a.webm", frames, fps=10)
    with pytest.raises(TypeError, match="fps"):
        write_output("gif", tmp_path / "b.gif", frames)
    with pytest.raises(TypeError):
        write_output("grid", tmp_path / "b.png", frames, cols=2, bogus=1)


def test_write_output_cleans_dead_partials(tmp_path: Path) -> None:
    stale = tmp_path / f".a.gif.partial-{2**22 + 1}-abcdef01.gif"
    stale.write_bytes(b"x")
    write_output("gif", tmp_path / "a.gif", [make_frame(0)], fps=10)
    assert not stale.exists()


def test_import_does_not_pull_in_torch_or_imageio() -> None:
    # Every module of the outputs package: none imports torch, and imageio only once an MP4 is written.
    modules = sorted(p.stem for p in (ROOT / "pipeline" / "outputs").glob("*.py") if p.stem != "__init__")
    assert {"assemble", "files", "gif", "kinds", "targets", "writers"} <= set(modules)
    imports = ", ".join(f"pipeline.outputs.{m}" for m in modules)
    code = f"import sys, {imports}; print('torch' in sys.modules, 'imageio' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["False", "False"]


def test_kinds_imports_nothing_of_the_pipeline() -> None:
    # pipeline.scene reads the suffix table from here: it must not import the scene back, nor Pillow.
    code = (
        "import sys, pipeline.outputs.kinds; "
        "print(sorted(m for m in sys.modules if m.startswith(('pipeline', 'PIL'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "['pipeline', 'pipeline.outputs', 'pipeline.outputs.kinds']"


def test_no_name_is_both_a_module_and_a_function_of_the_outputs_package() -> None:
    # The function run.assemble once shadowed the module pipeline.assemble: no module of the package
    # may define (or import) a function of the name of another module of the package.
    import importlib

    folder = ROOT / "pipeline" / "outputs"
    modules = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    for name in modules:
        module = importlib.import_module(f"pipeline.outputs.{name}")
        clashes = {m for m in modules - {name} if callable(getattr(module, m, None))}
        assert not clashes, f"pipeline.outputs.{name} has functions named after modules: {clashes}"


# Names: every output path is checked against the file system's limits before anything renders.

needs_name_max_255 = pytest.mark.skipif(
    not hasattr(os, "pathconf") or os.pathconf("/tmp", "PC_NAME_MAX") != 255, reason="needs NAME_MAX 255"
)


@needs_name_max_255
def test_name_length_bound_counts_the_temporary_name(tmp_path: Path) -> None:
    # '.' + name + '.partial-' + 10-digit pid + '-' + 8 hex + '.gif' must fit 255 bytes: 222 for the name.
    assert name_length_problem(tmp_path / ("a" * 218 + ".gif"), "gif") is None
    assert name_length_problem(tmp_path / ("a" * 219 + ".gif"), "gif") == (
        "'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa...aaaaaaaaaaaaaaaaaaaaaaaaaa.gif' is 223 bytes long, and 33 more while "
        "it is written (a temporary name beside it); this file system allows 255 per name, so at most 222 "
        "for this name"
    )
    # Bytes, not characters: 110 'é' are 220 bytes.
    assert name_length_problem(tmp_path / ("é" * 109 + ".gif"), "gif") is None
    assert "is 224 bytes long" in (name_length_problem(tmp_path / ("é" * 110 + ".gif"), "gif") or "")


@needs_name_max_255
def test_name_length_bound_checks_every_folder_and_the_frames_inside_a_folder(tmp_path: Path) -> None:
    assert name_length_problem(tmp_path / ("d" * 255) / "x.gif", "gif") is None
    assert name_length_problem(tmp_path / ("d" * 256) / "x.gif", "gif") == (
        "'dddddddddddddddddddddddddddddd...dddddddddddddddddddddddddddddd' is 256 bytes long; "
        "this file system allows 255 per name"
    )
    # A frames folder is made with mkdir (no temporary name); its frame files are short.
    assert name_length_problem(tmp_path / ("f" * 255), "frames", frames=1000) is None
    assert name_length_problem(tmp_path / ("f" * 256), "frames") is not None


def test_name_length_bound_checks_the_whole_path(tmp_path: Path) -> None:
    limit = os.pathconf(tmp_path, "PC_PATH_MAX") if hasattr(os, "pathconf") else 4096
    deep = tmp_path.joinpath(*["p" * 200] * (limit // 201 + 1), "x.gif")
    assert "its full path is" in (name_length_problem(deep, "gif") or "")
    assert name_length_problem(tmp_path.joinpath(*["p" * 200] * 2, "x.gif"), "gif") is None


def test_atomic_output_temporary_name_is_the_one_the_bound_counts(tmp_path: Path) -> None:
    with atomic_output(tmp_path / "clip.gif") as tmp:
        tmp.write_bytes(b"x")
        pid = str(os.getpid())
        assert tmp.name.startswith(f".clip.gif.partial-{pid}-")
        assert tmp.name.endswith(".gif")
        assert len(tmp.name) == len(".clip.gif.partial-") + len(pid) + len("-") + 8 + len(".gif")


def test_a_frame_that_cannot_be_read_while_writing_a_gif_fails_at_once(tmp_path: Path) -> None:
    # The palette is fitted by an ffmpeg child fed frame by frame: a frame that raises (a damaged
    # cache entry: FrameMissing) must stop ffmpeg, not leave it and its reader waiting for ever.
    import threading

    class Breaks(Sequence):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: Any) -> Any:
            if isinstance(i, slice):
                return [self[j] for j in range(*i.indices(4))]
            if i == 2:
                raise KeyError("frame 2 is unreadable")
            return Image.new("RGB", (16, 16), (i * 60, 0, 0))

    outcome: list[BaseException] = []

    def write() -> None:
        try:
            write_gif(tmp_path / "x.gif", Breaks(), fps=10)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=write, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "write_gif hung on a frame that raised"
    assert outcome and isinstance(outcome[0], KeyError)
