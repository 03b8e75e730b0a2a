"""pipeline.yamlio reads a scene the same with libyaml as with PyYAML's pure-Python parser.

Files that parse are read with libyaml's parser (ten times faster on a scene with a keyframe at
every frame); files that do not are read again by the Python parser for its messages. So for every
file, valid or not, the data, every recorded position and every problem must be the same either way.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import pipeline.yamlio as yamlio
from pipeline.yamlio import SceneError, load_yaml_lenient

ROOT = Path(__file__).resolve().parents[1]
# 65_not_utf8.yaml is left out: it is refused before YAML is parsed (tests/test_scene_errors.py).
FILES = [
    f
    for f in sorted((ROOT / "scenes").glob("*.yaml")) + sorted((ROOT / "tests" / "corpus").glob("*.yaml"))
    if f.name != "65_not_utf8.yaml"
]

TRICKY = {
    "block scalars": "a: |\n  two\n  lines\nb: >-\n  folded\n  text\nc: 'it''s'\nd: \"tab\\there\"\n",
    "flow and comments": "k: [1, {a: 2, b: [x, 'y']}]  # comment\n# only a comment\nz: ~\n",
    "crlf": "a: 1\r\nb:\r\n  - {frame: 0, prompt: a dog}\r\n",
    "bom and unicode": '\ufeffprompt: "café ✓ 🐕"\nn: -0.5e3\n',
    "core schema": "a: no\nb: yes\nc: 1:30\nd: 0o17\ne: 0x1f\nf: .inf\ng: True\nh: ''\ni:\n",
    "anchors, tags, duplicates": "a: &x 1\nb: *x\nc: !!str 5\nd: 1\nd: 2\n<<: {e: 1}\n",
    "tag on a mapping": "a: !!map {b: 1}\nc: !custom [1]\n",
    "nested keys": "? [a, b]\n: 1\nk: {? x : y}\n",
    "document markers": "---\na: 1\n...\n",
    "empty": "",
    "syntax error": "a: [1, 2\nb: 3\n",
    "second document": "a: 1\n---\nb: 2\n",
    "control character": "a: b\x07c\n",
    "too deep, flow": "a: " + "[" * 5000 + "]" * 5000 + "\n",
    "too deep, block": "a:\n" + "".join(" " * (2 * i) + "-\n" for i in range(1, 60)),
    "as deep as allowed": "a: " + "[" * 30 + "1" + "]" * 30 + "\n",
}


def _read(text: str) -> tuple[object, object, object, list[str]] | str:
    try:
        doc, problems = load_yaml_lenient(text, "s.yaml")
    except SceneError as exc:
        return str(exc)
    return doc.data, doc.marks, doc.key_marks, [str(p) for p in problems]


def _both(text: str, monkeypatch: pytest.MonkeyPatch) -> tuple[object, object]:
    fast = _read(text)
    with monkeypatch.context() as m:
        m.setattr(yamlio, "CParser", None)
        slow = _read(text)
    return fast, slow


def test_libyaml_is_there():
    # The usual PyYAML wheels are built with libyaml; without it the parity below proves nothing.
    assert yamlio.CParser is not None


@pytest.mark.parametrize("name", sorted(TRICKY))
def test_tricky_yaml_reads_the_same_either_way(name, monkeypatch):
    fast, slow = _both(TRICKY[name], monkeypatch)
    assert fast == slow


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_every_example_and_corpus_file_reads_the_same_either_way(path, monkeypatch):
    fast, slow = _both(path.read_text(encoding="utf-8"), monkeypatch)
    assert fast == slow


@pytest.mark.parametrize("depth", [yamlio.MAX_DEPTH - 2, yamlio.MAX_DEPTH - 1, 5000])
def test_nesting_beyond_the_limit_is_one_problem_not_a_recursion_error(depth):
    # The top-level mapping is one level, each list one more, the 1 inside them one more.
    text = "a: " + "[" * depth + "1" + "]" * depth + "\n"
    if depth + 2 <= yamlio.MAX_DEPTH:
        doc, problems = load_yaml_lenient(text, "s.yaml")
        assert problems == []
        inner = doc.data["a"]
        for _ in range(depth):
            (inner,) = inner
        assert inner == 1
        return
    with pytest.raises(SceneError) as info:
        load_yaml_lenient(text, "s.yaml")
    (problem,) = info.value.problems
    assert (problem.line, problem.col) == (1, 4 + yamlio.MAX_DEPTH - 1)  # the node one level too deep
    assert f"nests more than {yamlio.MAX_DEPTH} levels" in problem.message


def test_a_scene_keyed_at_every_frame_reads_the_same_either_way(monkeypatch):
    text = "keyframes:\n" + "".join(
        f"  - {{frame: {n}, prompt: 'p {n}', guidance: {n % 9}}}\n" for n in range(500)
    )
    fast, slow = _both(text, monkeypatch)
    assert fast == slow
    assert isinstance(fast, tuple) and fast[1][("keyframes", 499, "guidance")] == (501, 45)
