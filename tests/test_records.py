"""Record keys (pipeline.store.records) are pinned: they name records already in users' caches."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.store.records import (
    FILE_DIGESTS,
    audio_analysis_key,
    claim_key,
    output_key,
    outputs_of_key,
    plan_key,
    record_key,
)


def test_record_keys_are_pinned() -> None:
    assert plan_key("/scenes/a.yaml") == "5da6a92392ad225a9fd1c6dbc1d057a01be4c622095068cb5801a69d49a011cd"
    assert output_key("/out/a.mp4") == "1e767dbaa5a77674771ed17a9ada66cddd2312f7cbf01fa17f800d927b844e00"
    assert outputs_of_key("/scenes/a.yaml", "/out") == (
        "52dccb1c155136f02ed690e7468d1d4377018030b1bc60604d45fdabefdcc30b"
    )
    assert claim_key("0" * 64) == "1044fba043248d507b0d5b2a57b172b72ae78886102b0ef37c5d9ca8f0aaae59"
    assert FILE_DIGESTS == "92383ae30d6212b2c176aece18cdb3dace4d1b00e5fafcc034d49969d264731c"
    assert audio_analysis_key("ab" * 32, {"detector": "librosa", "hop": 512}) == (
        "827a079cff0ad3185ccff8629ad602e6349a2149440211ff8fd6b7c95e1a4ab2"
    )


def test_record_keys_are_the_old_spellings(tmp_path: Path) -> None:
    """Each named key is the digest its callers spelled by hand before (so old records are found)."""
    scene, out = tmp_path / "s.yaml", tmp_path / "renders"
    assert plan_key(scene) == record_key("plan", str(scene.resolve()))
    assert output_key(out / "a.gif") == record_key("output", str(out / "a.gif"))
    assert outputs_of_key(scene, out) == record_key("outputs of", str(scene.resolve()), str(out))
    assert claim_key("ab" * 32) == record_key("claim", "ab" * 32)
    assert record_key("file-digests") == FILE_DIGESTS
    config = {"hop": 512, "detector": "librosa"}
    assert audio_analysis_key("cd" * 32, config) == record_key(
        "audio-analysis", "cd" * 32, '{"detector":"librosa","hop":512}'
    )


def test_plan_key_names_the_scene_not_its_spelling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "s.yaml").write_text("")
    monkeypatch.chdir(tmp_path)
    assert plan_key("s.yaml") == plan_key(tmp_path / "s.yaml") == plan_key(tmp_path / "x" / ".." / "s.yaml")
