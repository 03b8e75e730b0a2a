"""pipeline.scene.yamlio reads a scene the same with libyaml as with PyYAML's pure-Python parser.

Files that parse are read with libyaml's parser (ten times faster on a scene with a keyframe at
every frame); files that do not are read again by the Python parser for its messages. So for every
file, valid or not, the data, every recorded position and every problem must be the same either way.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import pipeline.scene.yamlio as yamlio
from pipeline.scene.problems import SceneError
from pipeline.scene.yamlio import load_yaml_lenient

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


# ---------------------------------------------------------------------------------------------
# Syntax errors in the words of someone who writes scenes, at the line that causes them

SYNTAX = [
    # (text, line, column, words of the message)
    (
        "keyframes:\n  - frame: 0\n    prompt: a\n   seed: 3\n",
        4,
        4,
        "'seed' is indented 3 spaces; keys of one mapping must line up: indent it 4 spaces (like 'prompt' on line 3)",
    ),
    ("size: [64, 64]\n  steps: 2\n", 2, 3, "'steps' is indented 2 spaces; keys of one mapping must line up"),
    (
        "keyframes:\n  - frame: 0\n     prompt: a dog\n",
        3,
        6,
        "'prompt' is indented 5 spaces, deeper than 'frame' on line 2 (4 spaces)",
    ),
    (
        "keyframes:\n  - frame: 0\n    prompt: a\n - frame: 3\n",
        4,
        2,
        "this list item is indented 1 space; list items must line up: indent it 2 spaces (like the item on line 2)",
    ),
    # An unclosed quote: where it opens, whether the parser meets the end of the file or a later quote.
    ('keyframes:\n  - frame: 0\n    prompt: "a dog\n', 3, 13, 'the quote (") opened here is never closed'),
    (
        'keyframes:\n  - frame: 0\n    prompt: "a dog\n  - frame: 12\n    prompt: "a cat"\n',
        3,
        13,
        'the quote (") opened here is only closed on line 5',
    ),
    ("a: 'it\nb: 1\n", 1, 4, "the quote (') opened here is never closed"),
    ("size: [64, 64\nsteps: 3\n", 1, 7, "the '[' opened here is not closed before line 2; close it with ']'"),
    (
        "k:\n  - {frame: 0, prompt: a\n  - {frame: 3}\n",
        2,
        5,
        "the '{' opened here is not closed before line 3",
    ),
    ("keyframes:\n  - frame: 0\n    prompt: a dog: cute\n", 3, 13, 'put the value in quotes: "a dog: cute"'),
    ("guidance: 0: (7.5), 30: (9)\n", 1, 11, "this looks like a Deforum schedule"),
    ("keyframes:\n\t- frame: 0\n", 2, 1, "a tab is used to indent this line; YAML indents with spaces only"),
    (
        "keyframes:\n  -frame: 0\n    prompt: a\n",
        2,
        3,
        "a list item needs a space after '-': write '- frame: 0'",
    ),
    (
        "keyframes:\n  - frame:0\n    prompt: a\n",
        2,
        11,
        "a key needs a space after ':'; 'frame:0' is read as text",
    ),
    (
        "keyframes:\n  - frame: 0\n    prompt a dog\n  - frame: 3\n",
        3,
        5,
        "'prompt a dog' has no ':' after its key",
    ),
    ('init_image: "C:\\dogs\\a.png"\n', 1, 17, "use single quotes for text with backslashes"),
    ("a: 1\n---\nb: 2\n", 2, 1, "a second YAML document starts here"),
    ("k: 2\n" + "x" * 2000 + ": 1\n", 2, 1, "this key is 2000 characters long; YAML allows at most 1024"),
    ("x" * 2000 + ": 1\n", 1, 1, "this key is 2000 characters long; YAML allows at most 1024"),
]


@pytest.mark.parametrize(("text", "line", "col", "words"), SYNTAX, ids=[str(i) for i in range(len(SYNTAX))])
def test_syntax_errors_say_what_is_wrong_where_it_is(text: str, line: int, col: int, words: str) -> None:
    with pytest.raises(SceneError) as info:
        load_yaml_lenient(text, "s.yaml")
    (problem,) = info.value.problems
    assert (problem.line, problem.col) == (line, col), problem
    assert problem.message.startswith("YAML syntax error: ") and words in problem.message, problem.message
    assert "<block" not in problem.message and "\n" not in problem.message


def test_mangled_scenes_are_always_located_problems_never_a_crash() -> None:
    """Seeded random edits of every example and corpus file: only SceneErrors of one-line problems."""
    import random

    from pipeline.scene.load import parse_scene

    rng = random.Random(10)
    texts = [f.read_text() for f in FILES]
    edits = [" ", "", '"', "'", "[", "]", "{", "}", ":", "- ", "\t", "\n", ": ", ",", "#", "\\", "---\n", "?"]
    for _ in range(400):
        text = rng.choice(texts)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(text) + 1)
            text = text[:i] + rng.choice(edits) + text[i + rng.choice([0, 0, 1, 2]) :]
        try:
            parse_scene(text, "s.yaml")
        except SceneError as exc:
            assert exc.problems and all("\n" not in p.message and p.line >= 1 for p in exc.problems)


def test_an_integer_beyond_4300_digits_stays_text() -> None:
    doc, problems = load_yaml_lenient(f"a: {'9' * 4301}\nb: {'9' * 4300}\n", "s.yaml")
    assert doc.data["a"] == "9" * 4301 and doc.data["b"] == int("9" * 4300) and problems == []
