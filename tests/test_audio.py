"""A soundtrack in a scene (pipeline/audio): beats as keyframes, `curve: audio`, audio-driven values,
the MP4's audio stream, re-muxing without rendering, the cached analysis, and every bad input.

The songs are synthesised here: a click track at a known tempo, clicks that are dense then sparse, a
tone that gets louder. librosa is the optional extra [audio] (setup.sh installs it)."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

import pipeline
from pipeline.audio.analysis import settings
from pipeline.audio.timeline import scene_timeline
from pipeline.scene.load import load_scene
from pipeline.store.cache import CacheDir
from pipeline.store.records import audio_analysis_key
from tests.conftest import CountingRenderer, run_render

sf = pytest.importorskip("soundfile")
pytest.importorskip("librosa")

SR = 22050
FPS = 12


def _clicks(path: Path, times: list[float], seconds: float, *, tone: float = 0.0) -> Path:
    """A WAV of short clicks at ``times`` (seconds); ``tone``: a 220 Hz tone rising from 0 to that level."""
    y = np.zeros(int(SR * seconds))
    for t in times:
        i = int(t * SR)
        y[i : i + 200] += np.hanning(200)[: len(y[i : i + 200])] * 0.9
    if tone:
        t = np.arange(y.size) / SR
        y += tone * np.sin(2 * np.pi * 220 * t) * t / seconds
    sf.write(path, y.astype(np.float32), SR)
    return path


def _tones(path: Path, seconds: float = 4.0) -> Path:
    """A 60 Hz tone that gets louder over a 6 kHz tone that fades out."""
    t = np.arange(int(SR * seconds)) / SR
    y = 0.4 * np.sin(2 * np.pi * 60 * t) * t / seconds + 0.3 * np.sin(2 * np.pi * 6000 * t) * (
        1 - t / seconds
    )
    sf.write(path, y.astype(np.float32), SR)
    return path


BEAT_TIMES = [0.5 * k for k in range(1, 12)]  # 120 bpm: a click every half second from 0.5 s


def _write(folder: Path, text: str, name: str = "scene.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def _scene(tmp_path: Path, body: str) -> Path:
    return _write(tmp_path, "model: tiny\nsize: [32, 32]\nsteps: 2\nfps: 12\n" + body)


# -- beats and onsets as keyframes ------------------------------------------------------------------


def test_beats_land_on_the_clicks(tmp_path: Path) -> None:
    _clicks(tmp_path / "song.wav", BEAT_TIMES, 6.0)
    path = _scene(
        tmp_path,
        "audio: {path: song.wav}\nkeyframes:\n"
        "  - {frame: 0, prompt: a dog}\n  - {frame: {beat: 1}, prompt: a cat}\n"
        "  - {frame: {beat: 3}, prompt: a bird}\n  - {frame: {onset: 9}, prompt: a fish}\n",
    )
    scene = load_scene(path)
    beats = scene_timeline(scene).ref_frames("beat")
    # Every beat is on a click (a click every 6 frames at 12 fps), one beat per click.
    assert beats == [6 * k for k in range(1, 12)]
    onsets = scene_timeline(scene).ref_frames("onset")
    assert onsets == [6 * k for k in range(1, 12)]
    assert scene.keyframe_frames == [0, 6, 18, 54]


def test_start_moves_the_beats(tmp_path: Path) -> None:
    _clicks(tmp_path / "song.wav", BEAT_TIMES, 6.0)
    path = _scene(
        tmp_path,
        "audio: {path: song.wav, start: 1.5s}\nkeyframes:\n"
        "  - {frame: {beat: 1}, prompt: a dog}\n  - {frame: {beat: 2}, prompt: a cat}\n",
    )
    scene = load_scene(path)
    # The first beat from 1.5 s on is the click at 1.5 s itself: frame 0 of the scene.
    assert scene_timeline(scene).ref_frames("beat")[:3] == [0, 6, 12]
    assert scene.keyframe_frames == [0, 6]


# -- curve: audio ------------------------------------------------------------------------------------


def _prompt_t(session: pipeline.Session) -> list[float]:
    return [job.recipe["cond"].get("t", 0.0) for job in session.plan()]


def test_audio_curve_moves_fast_where_the_clicks_are_dense(tmp_path: Path) -> None:
    dense = [0.25 + 0.125 * k for k in range(16)]  # 8 clicks a second for 2 s, then one a second
    _clicks(tmp_path / "song.wav", [*dense, 2.5, 3.5], 4.0)
    path = _scene(
        tmp_path,
        "audio: {path: song.wav}\nkeyframes:\n"
        "  - {frame: 0, prompt: a dog}\n  - {frame: 47, prompt: a cat, curve: audio}\n",
    )
    ts = _prompt_t(pipeline.open(path, cache_dir=tmp_path / "cache"))
    assert ts[0] == 0.0 and ts[47] == 0.0  # on a keyframe, the keyframe alone
    # After the last click t is 1 (at key precision): those frames are the cat, as on its keyframe.
    assert ts[43:] == [0.0] * 5 and ts[42] > 0.9
    assert all(b >= a for a, b in pairwise(ts[:43]))  # never goes back
    # Half the clicks' onsets in the first 2 s (frames 0-24): t moves fast there, slowly after.
    assert ts[24] > 0.75 and ts[24] - ts[1] > 3 * (ts[42] - ts[24]), ts
    # A linear curve over the same span is at 0.51 halfway.
    linear = _prompt_t(
        pipeline.open(path.read_text().replace("curve: audio", "curve: linear"), base_dir=tmp_path)
    )
    assert abs(linear[24] - 24 / 47) < 1e-6


# -- values driven by the audio ---------------------------------------------------------------------


def test_rms_driven_zoom_rises_with_the_louder_tone(tmp_path: Path) -> None:
    _clicks(tmp_path / "song.wav", [], 4.0, tone=0.8)
    path = _scene(
        tmp_path,
        "mode: feedback\naudio: {path: song.wav}\nzoom: {audio: rms, min: 1.0, max: 1.05}\n"
        "keyframes:\n  - {frame: 0, prompt: a dog}\n  - {frame: 47, prompt: a cat}\n",
    )
    zoom = [job.recipe["scalars"]["zoom"] for job in pipeline.open(path).plan()]
    assert len(zoom) == 48
    assert zoom[0] < 1.002 and zoom[-1] > 1.047
    assert all(b > a for a, b in pairwise(zoom[:-1])), zoom
    assert all(1.0 <= z <= 1.05 for z in zoom)


def test_bands_follow_their_own_tone(tmp_path: Path) -> None:
    _tones(tmp_path / "song.wav")
    path = _scene(
        tmp_path,
        "mode: img2img\ninit_image: in.png\naudio: {path: song.wav}\n"
        "guidance: {audio: bass, min: 5, max: 9}\nstrength: {band: [5000, 7000], min: 0.2, max: 0.8}\n"
        "keyframes:\n  - {frame: 0, prompt: a dog}\n  - {frame: 47, prompt: a cat}\n",
    )
    Image.new("RGB", (32, 32), "gray").save(tmp_path / "in.png")
    jobs = pipeline.open(path).plan()
    guidance = [j.recipe["scalars"]["guidance"] for j in jobs]
    strength = [j.recipe["scalars"]["strength"] for j in jobs]
    assert guidance[2] < 5.5 and guidance[-2] > 8.5  # the bass swells
    assert strength[2] > 0.75 and strength[-2] < 0.3  # the treble fades


def test_a_lora_scale_follows_the_audio_and_renders(tmp_path: Path) -> None:
    """A LoRA's scale is a keyframable scalar like the others: it can follow the soundtrack too."""
    _clicks(tmp_path / "song.wav", [], 8 / 12, tone=0.8)  # as long as the 8 frames at 12 fps
    lora = Path(__file__).resolve().parents[1] / "scenes" / "inputs" / "style_tiny.safetensors"
    (tmp_path / "style.safetensors").write_bytes(lora.read_bytes())
    path = _scene(
        tmp_path,
        "audio: {path: song.wav}\nloras:\n  - {path: style.safetensors, name: style, scale: {audio: rms, min: 0, max: 1}}\n"
        "keyframes:\n  - {frame: 0, prompt: a knight}\n  - {frame: 7, prompt: a knight}\n",
    )
    scales = [job.view.lora["style"] for job in pipeline.open(path, cache_dir=tmp_path / "c").plan()]
    assert len(scales) == 8 and scales[0] < 0.1 and scales[-1] > 0.8
    assert all(b > a for a, b in pairwise(scales)), scales  # the tone rises: so does the scale
    counting = CountingRenderer()
    report = pipeline.open(path, cache_dir=tmp_path / "c", device="cpu").render(renderer=counting)
    assert report.rendered == 8 and len(set(counting.keys)) == 8
    # Set in two places is a located problem, as for a top-level scalar.
    both = path.read_text().replace(
        "frame: 7, prompt: a knight}", "frame: 7, prompt: a knight, lora: {style: 0.5}}"
    )
    path.write_text(both)
    problems = [str(p) for p in pipeline.open(path, cache_dir=tmp_path / "c").problems]
    assert any("loras 1, scale follows the audio (line 7)" in p and ".yaml:10:" in p for p in problems), (
        problems
    )


# -- the MP4's soundtrack, and a new song re-muxes without rendering ---------------------------------


def _audio_seconds(mp4: Path, tmp_path: Path) -> float:
    """The length of the MP4's audio stream, decoded by ffmpeg into a WAV."""
    wav = tmp_path / "decoded.wav"
    run = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", "-i", str(mp4), "-map", "0:a:0", str(wav)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    return sf.info(wav).duration


def test_mp4_carries_the_song_and_a_new_song_remuxes_without_rendering(tmp_path: Path) -> None:
    song = _clicks(tmp_path / "song.wav", BEAT_TIMES, 6.0)
    path = _scene(
        tmp_path,
        "audio: {path: song.wav, start: 0.5s}\nframes: 18\nkeyframes:\n"
        "  - {frame: 0, prompt: a dog}\n  - {frame: 17, prompt: a cat}\n",
    )
    counting = CountingRenderer()
    report = pipeline.open(path, cache_dir=tmp_path / "cache").render(renderer=counting)
    assert report.rendered == 18 and len(counting.keys) == 18
    mp4 = tmp_path / "renders" / "scene" / "scene.mp4"
    assert abs(_audio_seconds(mp4, tmp_path) - 18 / FPS) < 0.05  # cut to the animation (1.5 s)
    record = (tmp_path / "renders" / "scene" / "scene.record.json").read_text()
    assert "song.wav" in record

    # The audio starts at 0.5 s of the song: its first click is at the video's first frame.
    wav = tmp_path / "decoded.wav"
    y, sr = sf.read(wav)
    assert np.argmax(np.abs(y[: sr // 4])) < sr * 0.02

    # Another song: the MP4 is written again, the GIF is not, and no frame renders.
    _clicks(song, [0.6, 1.2], 6.0)
    again = CountingRenderer()
    report = pipeline.open(path, cache_dir=tmp_path / "cache").render(renderer=again)
    assert again.keys == [] and report.rendered == 0
    assert report.output_status[str(mp4)] == "written"
    assert report.output_status[str(mp4.with_suffix(".gif"))] == "up to date"
    # Nothing changed: nothing is written.
    report = pipeline.open(path, cache_dir=tmp_path / "cache").render(renderer=CountingRenderer())
    assert set(report.output_status.values()) == {"up to date"}


def test_an_audio_scene_renders_end_to_end(tmp_path: Path) -> None:
    _clicks(tmp_path / "song.wav", BEAT_TIMES, 3.0, tone=0.5)
    path = _scene(
        tmp_path,
        "mode: feedback\nstrength: 0.5\naudio: {path: song.wav}\nzoom: {audio: rms, min: 1.0, max: 1.1}\n"
        "keyframes:\n  - {frame: 0, prompt: a dog}\n  - {frame: {beat: 2}, prompt: a cat, curve: audio}\n",
    )
    report = run_render(path, tmp_path / "cache", "--device", "cpu")
    assert report["frames"] == 25 and report["rendered"] == 25  # the tone moves beat 2 to frame 24
    mp4 = tmp_path / "renders" / "scene" / "scene.mp4"
    assert abs(_audio_seconds(mp4, tmp_path) - 25 / FPS) < 0.05


# -- --plan, the plot, and the cached analysis ------------------------------------------------------


def test_plan_and_plot_show_the_beats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _clicks(tmp_path / "song.wav", BEAT_TIMES, 3.0)
    path = _scene(
        tmp_path,
        "audio: {path: song.wav}\nkeyframes:\n  - {frame: 0, prompt: a dog}\n"
        "  - {frame: {beat: 2}, prompt: a cat, curve: audio}\n",
    )
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exc:
        main(
            [str(path), "--plan", "--plot", str(tmp_path / "values.svg"), "--cache-dir", str(tmp_path / "c")]
        )
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    assert "audio song.wav from 0s: 5 beats (117.454 bpm) at frames 6, 12, 18, 24, 30" in out
    assert "beats in red" in (tmp_path / "values.svg").read_text()
    assert not (tmp_path / "c").exists()  # --plan creates no cache
    with pytest.raises(SystemExit):
        main([str(path), "--plan", "--json", "--cache-dir", str(tmp_path / "c")])
    rows = json.loads(capsys.readouterr().out)
    assert [r["frame"] for r in rows if r["beat"]] == [6, 12]


def test_the_analysis_is_cached(tmp_path: Path) -> None:
    _clicks(tmp_path / "song.wav", BEAT_TIMES, 3.0)
    path = _scene(
        tmp_path,
        "audio: {path: song.wav}\nkeyframes:\n  - {frame: 0, prompt: a dog}\n  - {frame: {beat: 2}, prompt: a cat}\n",
    )
    cache_dir = tmp_path / "cache"
    session = pipeline.open(path, cache_dir=cache_dir)
    session.render(renderer=CountingRenderer())
    timeline = scene_timeline(session.scene)
    with CacheDir(cache_dir) as cache:
        stored = cache.records.get_json(timeline.key)
        assert stored == timeline.analysis
        assert timeline.key == audio_analysis_key(timeline.sha256, settings())
        # A re-plan reads the analysis from the cache: a doctored one shows.
        cache.records.put_json(timeline.key, {**stored, "beats": [0.5, 2.0, 2.5]})
    assert pipeline.open(path, cache_dir=cache_dir).scene.keyframe_frames == [0, 24]
    assert load_scene(path).keyframe_frames == [0, 12]  # no cache: analysed afresh


def test_scenes_without_audio_do_not_import_librosa() -> None:
    code = (
        "import sys, pipeline\n"
        "s = pipeline.open('scenes/dog_cat.yaml')\n"
        "s.plan()\n"
        "assert 'librosa' not in sys.modules and 'torch' not in sys.modules, 'imported'\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).parent.parent,
    )
    assert run.returncode == 0, run.stderr


# -- bad input: exit 2, located, nothing rendered ---------------------------------------------------


def _fails(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> str:
    from pipeline.cli import main

    path = _write(tmp_path, text)
    with pytest.raises(SystemExit) as exc:
        main([str(path), "--cache-dir", str(tmp_path / "cache"), "-q"])
    assert exc.value.code == 2
    assert not (tmp_path / "renders").exists() and not (tmp_path / "cache").exists()
    return capsys.readouterr().err


HEAD = "model: tiny\nsize: [32, 32]\nsteps: 2\n"


@pytest.mark.parametrize(
    ("body", "where", "words"),
    [
        (
            "audio: {path: gone.wav}\nkeyframes:\n  - {frame: 0, prompt: a dog}\n",
            "scene.yaml:4:",
            "file not found: 'gone.wav'",
        ),
        (
            "audio: {path: bad.wav}\nkeyframes:\n  - {frame: 0, prompt: a dog}\n",
            "scene.yaml:4:",
            "not a readable audio file",
        ),
        (
            "audio: {path: song.wav}\nkeyframes:\n  - {frame: 0, prompt: a dog}\n  - {frame: {beat: 40}, prompt: a cat}\n",
            "scene.yaml:7:",
            "beat 40 is past the end: 'song.wav' has 11 beats from 0s on",
        ),
        (
            "audio: {path: song.wav}\nkeyframes:\n  - {frame: 0, prompt: a dog}\n  - {frame: {onset: 0}, prompt: a cat}\n",
            "scene.yaml:7:",
            "onsets count from 1",
        ),
        (
            "audio: {path: song.wav, start: 60s}\nkeyframes:\n  - {frame: 0, prompt: a dog}\n",
            "scene.yaml:4:",
            "start 60s is past the end of 'song.wav'",
        ),
        (
            "audio: {path: song.wav, start: -1}\nkeyframes:\n  - {frame: 0, prompt: a dog}\n",
            "scene.yaml:4:",
            "-1 is not a time in the song",
        ),
        (
            "keyframes:\n  - {frame: 0, prompt: a dog}\n  - {frame: 9, prompt: a cat, curve: audio}\n",
            "scene.yaml:6:",
            "curve audio follows the soundtrack's onsets, and the scene has none",
        ),
        (
            "zoom: {audio: rms, min: 1, max: 2}\nmode: feedback\nkeyframes:\n  - {frame: 0, prompt: a dog}\n",
            "scene.yaml:4:",
            "zoom follows the audio, and the scene has none",
        ),
        (
            "keyframes:\n  - {frame: 0, prompt: a dog}\n  - {frame: {beat: 2}, prompt: a cat}\n",
            "scene.yaml:6:",
            "beat 2 needs a soundtrack",
        ),
        (
            "audio: {path: song.wav}\nstrength: {audio: loud, min: 0, max: 1}\nkeyframes:\n  - {frame: 0, prompt: a dog}\n",
            "scene.yaml:5:",
            "strength: audio:",
        ),
        (
            "audio: {path: song.wav}\nstrength: {audio: rms, min: 0, max: 2}\nkeyframes:\n  - {frame: 0, prompt: a dog}\n",
            "scene.yaml:5:",
            "strength: max 2 is out of bounds; allowed: from 0 to 1",
        ),
        (
            "audio: {path: song.wav}\nguidance: {audio: rms, min: 5, max: 9}\nkeyframes:\n  - {frame: 0, prompt: a dog, guidance: 3}\n",
            "scene.yaml:7:",
            "guidance follows the audio (line 5); set it in one place",
        ),
    ],
    ids=[
        "missing",
        "unreadable",
        "beat_past_end",
        "onset_zero",
        "start_past_end",
        "start_negative",
        "curve_no_audio",
        "drive_no_audio",
        "beat_no_audio",
        "unknown_feature",
        "drive_out_of_bounds",
        "drive_and_keyframe",
    ],
)
def test_bad_audio_input_exits_2_located(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, where: str, words: str
) -> None:
    _clicks(tmp_path / "song.wav", BEAT_TIMES, 6.0)
    (tmp_path / "bad.wav").write_bytes(b"RIFF\x00\x00not really a wave file at all" * 10)
    err = _fails(tmp_path, HEAD + body, capsys)
    line = next(x for x in err.splitlines() if words in x)
    assert where in line, err


def test_audio_features_without_librosa_exit_2_with_the_install_hint(tmp_path: Path) -> None:
    _clicks(tmp_path / "song.wav", BEAT_TIMES, 3.0)
    path = _write(
        tmp_path,
        HEAD
        + "audio: {path: song.wav}\nkeyframes:\n  - {frame: 0, prompt: a dog}\n  - {frame: {beat: 2}, prompt: a cat}\n",
    )
    code = (
        "import sys\nsys.modules['librosa'] = None  # as if it were not installed\n"
        "from pipeline.cli import main\n"
        f"main([{str(path)!r}, '--cache-dir', {str(tmp_path / 'cache')!r}, '-q'])\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).parent.parent,
    )
    assert run.returncode == 2, run.stderr
    assert "scene.yaml:4:" in run.stderr and "pip install 'sd-scenes[audio]'" in run.stderr
    assert not (tmp_path / "renders").exists()
    # Muxing alone needs no librosa.
    path.write_text(HEAD + "audio: {path: song.wav}\nkeyframes:\n  - {frame: 0, prompt: a dog}\n")
    code = code.replace("main([", "main(['--plan', ")
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).parent.parent,
    )
    assert run.returncode == 0, run.stderr
