"""Smaller GIFs: one palette fitted to all the frames (ffmpeg's palettegen) and delta frames, with
every frame and its delay kept (tests/test_assemble.py pins frame counts, timing and pixels too).

The frames here change slowly, as a prompt morph's do: a gradient with a square that moves one
pixel per frame.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.outputs.writers import write_gif

N, SIZE = 64, 64


def _frames() -> list[Image.Image]:
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    frames = []
    for i in range(N):
        rgb = np.stack([x * 4, y * 4, np.full_like(x, 128)], axis=-1).astype(np.uint8)
        rgb[20:30, i % (SIZE - 10) : i % (SIZE - 10) + 10] = (250, 250, 250)
        frames.append(Image.fromarray(rgb, "RGB"))
    return frames


def _blocks(path: Path) -> list[tuple[int, int, int, int, bool]]:
    """(left, top, width, height, has a local colour table) of every image block in a GIF."""
    data = path.read_bytes()
    flags = data[10]
    pos = 13 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0)
    blocks = []
    while data[pos] != 0x3B:
        if data[pos] == 0x21:  # extension: label, then sub-blocks
            pos += 2
            while data[pos]:
                pos += data[pos] + 1
            pos += 1
            continue
        assert data[pos] == 0x2C
        left, top, width, height = (
            int.from_bytes(data[pos + k : pos + k + 2], "little") for k in (1, 3, 5, 7)
        )
        local = data[pos + 9] & 0x80
        blocks.append((left, top, width, height, bool(local)))
        pos += 10 + (3 * 2 ** ((data[pos + 9] & 7) + 1) if local else 0) + 1  # LZW minimum code size
        while data[pos]:
            pos += data[pos] + 1
        pos += 1
    return blocks


def test_one_palette_and_delta_frames(tmp_path: Path) -> None:
    out = tmp_path / "slow.gif"
    frames = _frames()
    write_gif(out, frames, 12)
    blocks = _blocks(out)
    assert len(blocks) == N
    # One global colour table, no local ones (they were 768 bytes a frame).
    assert not any(local for *_, local in blocks)
    # Frame 0 whole, every later frame only the rectangle that changed: the square's old and new place.
    assert blocks[0][:4] == (0, 0, SIZE, SIZE)
    assert blocks[1][:4] == (0, 20, 11, 10)
    assert all(w * h <= 11 * 10 for _, _, w, h, _ in blocks[1:54])
    # Every frame decodes to the frame itself, within what 255 colours for 4,096 costs.
    with Image.open(out) as image:
        for i in range(N):
            image.seek(i)
            assert image.info["duration"] == 80
            got = np.asarray(image.convert("RGB"), dtype=np.int16)
            assert np.abs(got - np.asarray(frames[i], dtype=np.int16)).mean() < 3.5  # 2.88 measured
    # Per-frame palettes and whole frames made this 203,031 bytes; now 7,185.
    assert out.stat().st_size < 20_000


def test_a_held_frame_is_one_transparent_pixel(tmp_path: Path) -> None:
    out = tmp_path / "held.gif"
    frames = _frames()
    write_gif(out, [frames[0], frames[1], frames[1], frames[1], frames[2]], 10)
    blocks = _blocks(out)
    assert [b[:4] for b in blocks[2:4]] == [(0, 0, 1, 1), (0, 0, 1, 1)]
    with Image.open(out) as image:
        assert image.n_frames == 5
        image.seek(3)
        held = image.convert("RGB")
        image.seek(1)
        assert held.tobytes() == image.convert("RGB").tobytes()


def test_the_rubber_band_way_back_uses_the_same_palette(tmp_path: Path) -> None:
    out = tmp_path / "band.gif"
    frames = _frames()[:8]
    write_gif(out, frames, 10, rubber_band=True)
    with Image.open(out) as image:
        assert image.n_frames == 8 + 5
        image.seek(8)  # the way back starts at frame 6
        back = np.asarray(image.convert("RGB"), dtype=np.int16)
        image.seek(6)
        assert np.array_equal(back, np.asarray(image.convert("RGB"), dtype=np.int16))
