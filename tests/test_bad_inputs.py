"""A catalogue of bad inputs (issue 24): each is refused with a UserError whose message says what is wrong,
and nothing is written or lost (the run_dir, its store and the inputs are byte for byte as before).

Corpus / QA files go through `python -m data_prep.build`'s main over an existing store (with --force, so
a refusal must keep the old store); config values through the same front door; questions through
`python -m qa.answer` (checked before any model is loaded); the demo's endpoints through `DemoService`
over the tiny world of tests/test_app.py. Everything is tiny: no real model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from common.atomic import clean_leftovers
from common.errors import UserError
from configs.cli import run_main
from configs.loader import load_config

pytestmark = pytest.mark.usefixtures("one_thread")

GOOD_CORPUS = (
    b'{"id": "d1", "title": "Alpha", "text": "alpha beta gamma delta"}\n'
    b'{"id": "d2", "title": "Beta", "text": "epsilon zeta eta theta"}\n'
)
GOOD_QA = b'{"id": "q1", "question": "what comes after alpha?", "answers": ["beta"], "gold_doc_id": "d1"}\n'


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under `root` with the sha256 of its bytes: equal snapshots = nothing changed."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _save_tokenizer(out: Path, positions: int | None = None) -> Path:
    """A word-level fast tokenizer saved like a model folder (optionally with an encoder's position limit)."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "[PAD]": 3}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]"
    ).save_pretrained(out)
    if positions is not None:
        (out / "config.json").write_text(json.dumps({"max_position_embeddings": positions}))
    return out


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return _save_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def small_encoder_tok(tmp_path_factory):
    """A tokenizer folder whose config.json says the encoder has 64 positions."""
    return _save_tokenizer(tmp_path_factory.mktemp("tok64"), positions=64)


def build_args(root: Path, tok: Path, *extra: str) -> list[str]:
    return [
        f"run_dir={root / 'run'}",
        f"data.corpus={root / 'corpus.jsonl'}",
        f"data.qa={root / 'qa.jsonl'}",
        f"retriever.model={tok}",
        "data.window=16",
        "data.stride=4",
        "data.num_workers=1",
        "--no-progress",
        *extra,
    ]


@pytest.fixture
def built(tmp_path, tok_dir):
    """tmp_path with good corpus.jsonl / qa.jsonl and a store built from them in run/."""
    from data_prep.build import main

    (tmp_path / "corpus.jsonl").write_bytes(GOOD_CORPUS)
    (tmp_path / "qa.jsonl").write_bytes(GOOD_QA)
    assert main(build_args(tmp_path, tok_dir)) == 0
    return tmp_path


def refused_build(
    root: Path, tok: Path, match: str, *extra: str, corpus: bytes | None = None, qa: bytes | None = None
) -> None:
    """Write the bad input files, run the build (--force), expect `match`; the rest must be untouched."""
    from data_prep.build import main

    if corpus is not None:
        (root / "corpus.jsonl").write_bytes(corpus)
    if qa is not None:
        (root / "qa.jsonl").write_bytes(qa)
    before = snapshot(root)
    manifest = (root / "run" / "store" / "manifest.json").read_bytes() if (root / "run").exists() else None
    with pytest.raises(UserError, match=match):
        main(build_args(root, tok, "--force", *extra))
    assert snapshot(root) == before  # no new file, no temp folder, the old store as it was
    if manifest is not None:
        assert (root / "run" / "store" / "manifest.json").read_bytes() == manifest


# ---------------------------------------------------------------------------------------------- corpus and QA files

CORPUS_CASES = {
    "malformed line": (GOOD_CORPUS + b'{"id": "d3", "title": \n', r"corpus\.jsonl:3: not valid JSON"),
    "truncated last line": (GOOD_CORPUS + b'{"id": "d3", "text": "x', r"corpus\.jsonl:3: not valid JSON"),
    "a list, not an object": (b"[1, 2]\n", r"corpus\.jsonl:1: expected a JSON object, got list"),
    "a bare string": (b'"just text"\n', r"corpus\.jsonl:1: expected a JSON object, got str"),
    "missing id": (b'{"title": "A", "text": "x"}\n', r'corpus\.jsonl:1: missing or empty "id"'),
    "empty id": (b'{"id": " ", "title": "A", "text": "x"}\n', r'corpus\.jsonl:1: missing or empty "id"'),
    "missing text": (b'{"id": "d1", "title": "A"}\n', r'corpus\.jsonl:1: document \'d1\': "text" must be'),
    "text a number": (
        b'{"id": "d1", "title": "A", "text": 5}\n',
        r'corpus\.jsonl:1: document \'d1\': "text" must be',
    ),
    "title a number": (b'{"id": "d1", "title": 7, "text": "x"}\n', r'corpus\.jsonl:1: .*"title" must be'),
    "duplicate id": (
        GOOD_CORPUS + b'{"id": "d1", "title": "A", "text": "again"}\n',
        r"corpus\.jsonl:3: duplicate document id",
    ),
    "UTF-16 file": ('{"id": "d1", "text": "x"}\n'.encode("utf-16"), r"corpus\.jsonl:1: .*the file is UTF-16"),
    "binary bytes": (b"\x1f\x8b\x08\x00\x00\x00\xff\xfe\n", r"corpus\.jsonl:1: .*not UTF-8 \(invalid byte"),
    "empty file": (b"", r"the corpus .*corpus\.jsonl has no documents; nothing was written"),
    "only blank lines": (b"\n  \n\n", r"has no documents; nothing was written"),
    "only empty documents": (
        b'{"id": "d1", "title": "A", "text": "   "}\n',
        r"has no documents \(empty_documents_skipped=1\)",
    ),
    "only control characters": (
        b'{"id": "d1", "title": "", "text": "\\u0001\\u0002"}\n',
        r"no document of the corpus .* has any text to segment",
    ),
}


@pytest.mark.parametrize("name", list(CORPUS_CASES))
def test_bad_corpus_file_is_refused_and_the_store_kept(built, tok_dir, name):
    corpus, match = CORPUS_CASES[name]
    qa = b"" if name == "empty file" else None  # issue 24: an empty corpus with an empty QA file
    refused_build(built, tok_dir, match, corpus=corpus, qa=qa)


QA_CASES = {
    "malformed line": (GOOD_QA + b'{"id": "q2",\n', r"qa\.jsonl:2: not valid JSON"),
    "missing question": (
        b'{"id": "q1", "answers": ["a"], "gold_doc_id": "d1"}\n',
        r'qa\.jsonl:1: .*"question"',
    ),
    "empty question": (
        b'{"id": "q1", "question": " ", "answers": ["a"]}\n',
        r'qa\.jsonl:1: .*"question" must',
    ),
    "control character in a question": (
        b'{"id": "q1", "question": "x\\u001b?", "answers": ["a"], "gold_doc_id": "d1"}\n',
        r'qa\.jsonl:1: QA .q1.: "question" contains the control character U\+001B at character 2',
    ),
    "missing answers": (
        b'{"id": "q1", "question": "x?", "gold_doc_id": "d1"}\n',
        r'qa\.jsonl:1: .*"answers"',
    ),
    "missing id": (
        b'{"question": "x?", "answers": ["a"], "gold_doc_id": "d1"}\n',
        r'qa\.jsonl:1: missing .*"id"',
    ),
    "unknown gold doc": (
        b'{"id": "q1", "question": "x?", "answers": ["a"], "gold_doc_id": "zz"}\n',
        r"qa\.jsonl:1: QA 'q1': gold_doc_id 'zz' is not in the corpus",
    ),
    "duplicate id": (GOOD_QA + GOOD_QA, r"qa\.jsonl:2: duplicate QA id 'q1'"),
    "UTF-16 file": (GOOD_QA.decode().encode("utf-16"), r"qa\.jsonl:1: .*the file is UTF-16"),
}


@pytest.mark.parametrize("name", list(QA_CASES))
def test_bad_qa_file_is_refused_and_the_store_kept(built, tok_dir, name):
    qa, match = QA_CASES[name]
    refused_build(built, tok_dir, match, qa=qa)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("missing.jsonl", r"data\.corpus: file not found: .*missing\.jsonl"),
        ("corpus.csv", r"data\.corpus='.*corpus\.csv': not a known source"),
        ("nq_open:train", r"NQ-open has questions only"),
    ],
)
def test_bad_corpus_spec(built, tok_dir, spec, match):
    value = spec if ":" in spec else str(built / spec)
    refused_build(built, tok_dir, match, f"data.corpus={value}")


def test_skipped_lines_still_leave_no_store_when_nothing_remains(tmp_path, tok_dir):
    """on_bad_line=skip over a corpus of nothing but bad lines: refused as empty, no run_dir made."""
    refused_build(
        tmp_path,
        tok_dir,
        r"has no documents \(bad_lines_skipped=2\)",
        "data.on_bad_line=skip",
        corpus=b"{oops\n[1]\n",
        qa=b"",
    )
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- window vs encoder


def test_window_beyond_the_encoder_positions_is_refused_at_build(built, small_encoder_tok):
    refused_build(
        built,
        small_encoder_tok,
        r"data\.window \(100\) .* at most 64 \(the positions of encoder",
        "data.window=100",
    )


def test_window_plus_passage_prefix_beyond_max_seq_length_is_refused_at_build(built, tok_dir):
    refused_build(
        built,
        tok_dir,
        r"\+ 2 of retriever\.passage_prefix = 322 tokens.*at most 316",
        "data.window=318",
        "retriever.passage_prefix=passage:",
    )


def test_index_refuses_a_store_whose_window_the_encoder_would_cut(tmp_path):
    """A store built with a 60-token window, indexed by an encoder set to read 40: refused, nothing written."""
    from data_prep.build import main as build_main
    from retriever.index import main as index_main
    from retriever.testing import make_tiny_encoder

    (tmp_path / "corpus.jsonl").write_bytes(GOOD_CORPUS)
    (tmp_path / "qa.jsonl").write_bytes(GOOD_QA)
    enc = tmp_path / "enc"
    make_tiny_encoder(enc, ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"])
    assert build_main(build_args(tmp_path, enc, "data.window=60")) == 0
    before = snapshot(tmp_path)
    with pytest.raises(
        UserError,
        match=r"the window of .*store \(60\) \+ 2 special tokens = 62 tokens, but the "
        r"retriever reads at most 40 \(retriever\.max_seq_length\)",
    ):
        index_main(
            [
                f"run_dir={tmp_path / 'run'}",
                f"retriever.model={enc}",
                "retriever.max_seq_length=40",
                "data.window=16",
                "data.stride=4",
                "device=cpu",
            ]
        )
    assert snapshot(tmp_path) == before and not (tmp_path / "run" / "index").exists()


# ---------------------------------------------------------------------------------------------- config values

CONFIG_CASES = {
    "unknown key": (["data.windw=3"], r"unknown config key `data\.windw` \(did you mean `data\.window`\?\)"),
    "unknown section": (["nosuch.key=1"], r"unknown config key `nosuch"),
    "section as a value": (["data=3"], r"`data` is a section"),
    "window not a number": (["data.window=abc"], r"`data\.window` must be an integer, got 'abc'"),
    "window a fraction": (["data.window=16.5"], r"`data\.window` must be an integer"),
    "lr not a number": (["train.lr=fast"], r"`train\.lr` must be a number"),
    "bool not a bool": (["index.verify_sha256=maybe"], r"`index\.verify_sha256` must be true or false"),
    "choice not allowed": (["data.split=validation"], r"`data\.split` must be one of train, dev, test, all"),
    "window 1": (["data.window=1", "data.stride=0"], r"data\.window must be at least 8 tokens .* got 1"),
    "window 0": (["data.window=0"], r"data\.window must be at least 8 tokens"),
    "window negative": (["data.window=-5"], r"data\.window must be at least 8 tokens .* got -5"),
    "stride == window": (
        ["data.window=16", "data.stride=16"],
        r"data\.stride \(16\) must be >= 0 and smaller",
    ),
    "stride > window": (
        ["data.window=16", "data.stride=40"],
        r"data\.stride \(40\) must be >= 0 and smaller",
    ),
    "stride negative": (["data.stride=-1"], r"data\.stride \(-1\) must be >= 0"),
    "window past the encoder": (
        ["data.window=100000"],
        r"data\.window \(100000\) \+ 2 special tokens = 100002 tokens, but the retriever reads at most 320 "
        r"\(retriever\.max_seq_length\).*at most 318",
    ),
    "dev fraction negative": (["data.dev_fraction=-0.1"], r"data\.dev_fraction \(-0\.1\) .* must be >= 0"),
    "fractions sum to 1": (["data.dev_fraction=0.5", "data.test_fraction=0.5"], r"sum to less than 1"),
    "workers negative": (
        ["data.num_workers=-2"],
        r"data\.num_workers must be >= 0 \(0 = all cores\), got -2",
    ),
    "chunk_docs 0": (["data.chunk_docs=0"], r"data\.chunk_docs must be >= 1, got 0"),
    "nprobe negative": (["index.nprobe=-3"], r"index\.nprobe must be >= 0"),
    "shard_size 0": (["index.shard_size=0"], r"index\.shard_size must be >= 1"),
    "top_k 0": (["retriever.top_k=0"], r"retriever\.top_k must be >= 1"),
    "hybrid weight 2": (["retriever.hybrid.weight=2"], r"retriever\.hybrid\.weight must be in \[0, 1\]"),
    "max_new_tokens 0": (["lm.max_new_tokens=0"], r"lm\.max_new_tokens must be >= 1"),
    "port too big": (["app.port=99999"], r"app\.port must be a TCP port from 1 to 65535, got 99999"),
    "port 0": (["app.port=0"], r"app\.port must be a TCP port from 1 to 65535, got 0"),
    "port negative": (["app.port=-1"], r"app\.port must be a TCP port"),
    "run_dir empty": (["run_dir="], r"run_dir is empty"),
}


@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_bad_config_value_is_refused_before_anything_is_written(tmp_path, name):
    from data_prep.build import main

    overrides, match = CONFIG_CASES[name]
    argv = [f"run_dir={tmp_path / 'run'}", *overrides]
    with pytest.raises(UserError, match=match):
        main(argv)
    assert snapshot(tmp_path) == {}


@pytest.mark.parametrize("inside", [False, True], ids=["is a file", "inside a file"])
def test_run_dir_that_is_a_file(tmp_path, inside):
    from data_prep.build import main

    (tmp_path / "notes.txt").write_text("mine")
    run_dir = tmp_path / "notes.txt" / "run" if inside else tmp_path / "notes.txt"
    match = (
        r"notes\.txt, which is an existing file"
        if inside
        else r"notes\.txt is an existing file, not a folder"
    )
    with pytest.raises(UserError, match=match):
        main([f"run_dir={run_dir}"])
    assert snapshot(tmp_path) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("data: [unclosed\n", r"not valid YAML"),
        ("- a\n- b\n", r"the top level must be a mapping"),
        ("extends: self.yaml\n", r"`extends` loops back to itself"),
        ("data:\n  window: many\n", r"self\.yaml: `data\.window` must be an integer"),
    ],
    ids=["invalid YAML", "a list", "extends loop", "bad type in file"],
)
def test_bad_config_file(tmp_path, content, match):
    (tmp_path / "self.yaml").write_text(content)
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=match):
        load_config(tmp_path / "self.yaml", [f"run_dir={tmp_path / 'run'}"])
    assert snapshot(tmp_path) == before


def test_missing_config_file_and_stray_argument(tmp_path):
    from data_prep.build import main

    with pytest.raises(UserError, match=r"config file not found: .*nope\.yaml"):
        main(["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(UserError, match=r"unexpected arguments \['window'\]"):
        main([f"run_dir={tmp_path / 'run'}", "window"])
    assert snapshot(tmp_path) == {}


def test_command_line_prints_the_refusal_without_a_traceback(tmp_path, capsys):
    from data_prep.build import main

    with pytest.raises(SystemExit) as exit_info:
        run_main(main, [f"run_dir={tmp_path / 'run'}", "data.window=1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: data.window must be at least 8 tokens") and "Traceback" not in err


def test_app_refuses_a_bad_port_before_loading_anything(tmp_path):
    import app

    with pytest.raises(UserError, match=r"app\.port must be a TCP port from 1 to 65535, got 99999"):
        app.main([f"run_dir={tmp_path / 'run'}", "app.port=99999"])
    assert snapshot(tmp_path) == {}


# ---------------------------------------------------------------------------------------------- leftovers of a killed build


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_next_build_removes_the_temp_folders_of_a_killed_one_but_not_of_a_live_one(built, tok_dir):
    from data_prep.build import main

    run = built / "run"
    dead = run / f".store.tmp-{_dead_pid()}-0123abcd"
    live = run / f".store.tmp-{os.getppid()}-89abcdef"  # a process that is still running (a concurrent build)
    other = run / f".index.tmp-{_dead_pid()}-0123abcd"  # another artifact's: not the store build's to touch
    for d in (dead, live, other):
        d.mkdir()
        (d / "segments.arrow").write_bytes(b"half written")
    assert main(build_args(built, tok_dir)) == 0  # skipped (same inputs), and still cleans up
    assert not dead.exists() and live.is_dir() and other.is_dir()


def test_a_job_killed_between_its_renames_gets_its_previous_version_back(tmp_path):
    target = tmp_path / "store"
    old = tmp_path / f".store.old-{_dead_pid()}-0123abcd"
    new = tmp_path / f".store.tmp-{_dead_pid()}-4567abcd"
    old.mkdir()
    (old / "manifest.json").write_text("previous")
    new.mkdir()
    removed = clean_leftovers(target)
    assert (target / "manifest.json").read_text() == "previous" and removed == [new] and not old.exists()


# ---------------------------------------------------------------------------------------------- questions (qa.answer)

QUESTION_CASES = {
    "empty argument": ([""], r"question 1: the question is empty"),
    "blank argument": (["ok?", "   "], r"question 2: the question is empty"),
    "oversized argument": (
        ["x" * 1001],
        r"question 1: the question has 1001 characters; the limit is 1000 "
        r"\(lm\.max_question_chars\)",
    ),
    "over a lowered limit": (["lm.max_question_chars=10", "a longer question?"], r"the limit is 10"),
    "NUL byte": (["Where was\x00 Ada born?"], r"question 1: the question contains the control character U\+0000 "
                                                r"at character 10"),
    "escape sequence": (["ok?", "\x1b[31mred?"], r"question 2: .*control character U\+001B at character 1;"),
    "no question": ([], r"give questions as arguments"),
}


@pytest.mark.parametrize("name", list(QUESTION_CASES))
def test_bad_question_is_refused_before_a_model_loads(tmp_path, name):
    from qa.answer import main

    args, match = QUESTION_CASES[name]
    with pytest.raises(UserError, match=match):
        main([f"run_dir={tmp_path / 'run'}", "--out", str(tmp_path / "answers.jsonl"), *args])
    assert snapshot(tmp_path) == {}


QUESTION_FILE_CASES = {
    "malformed line": (b'{"question": "ok?"}\n{"question": \n', r"questions\.jsonl:2: not valid JSON"),
    "no question field": (
        b'{"q": "ok?"}\n',
        r'questions\.jsonl:1: expected an object with a "question" string',
    ),
    "empty question": (b'{"question": "  "}\n', r"questions\.jsonl:1: the question is empty"),
    "oversized question": (
        json.dumps({"question": "y" * 2000}).encode(),
        r"questions\.jsonl:1: the question has "
        r"2000 characters",
    ),
    "control character": (b'{"question": "who\\u0007 is it?"}\n', r"questions\.jsonl:1: .*control character U\+0007"),
    "empty file": (b"\n\n", r"questions\.jsonl holds no questions"),
}


@pytest.mark.parametrize("name", list(QUESTION_FILE_CASES))
def test_bad_question_file_is_refused_before_a_model_loads(tmp_path, name):
    from qa.answer import main

    content, match = QUESTION_FILE_CASES[name]
    (tmp_path / "questions.jsonl").write_bytes(content)
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=match):
        main(
            [
                f"run_dir={tmp_path / 'run'}",
                "--file",
                str(tmp_path / "questions.jsonl"),
                "--out",
                str(tmp_path / "answers.jsonl"),
            ]
        )
    assert snapshot(tmp_path) == before


def test_missing_question_file(tmp_path):
    from qa.answer import main

    with pytest.raises(UserError, match=r"cannot read .*nope\.jsonl"):
        main([f"run_dir={tmp_path / 'run'}", "--file", str(tmp_path / "nope.jsonl")])
    assert snapshot(tmp_path) == {}


# ---------------------------------------------------------------------------------------------- the demo's endpoints


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A DemoService over the tiny world of tests/test_app.py (no checkpoint: the untrained systems)."""
    from demo.service import DemoService
    from tests.test_app import build_tiny_demo

    root = tmp_path_factory.mktemp("demo")
    overrides = build_tiny_demo(root, checkpoint=False)
    service = DemoService.from_config(load_config(None, overrides))
    yield root, service
    service.retriever.reset()


def _unchanged(demo, call, match: str) -> None:
    """`call(service)` is refused with `match`; the live index and the run_dir are as before."""
    root, service = demo
    service.retriever.reset()
    n, live = len(service.retriever), list(service.retriever.live_documents)
    before = snapshot(root / "run")
    with pytest.raises(UserError, match=match):
        call(service)
    assert len(service.retriever) == n and list(service.retriever.live_documents) == live
    assert snapshot(root / "run") == before


TEXT = "Quorn is a new country. The capital of Quorn is Zibbelquat."

ADD_TEXT_CASES = {
    "NUL byte in text": ((TEXT + "\x00 more", ""), r"the pasted text contains the control character U\+0000"),
    "escape sequence in text": (
        ("\x1b[31m" + TEXT, ""),
        r"the pasted text contains the control character U\+001B",
    ),
    "DEL in text": ((TEXT + "\x7f", ""), r"control character U\+007F"),
    "form feed in text": ((TEXT + "\x0c" + TEXT, ""), r"control character U\+000C \(line 1"),
    "control character on line 2": ((TEXT + "\nsecond \x01 line", ""), r"U\+0001 \(line 2"),
    "NUL byte in title": ((TEXT, "Quorn\x00"), r"the title contains the control character U\+0000"),
    "unit separator in title": (
        (TEXT, "Quorn\x1fFacts"),
        r"the title contains the control character U\+001F",
    ),
    "50,000-character title": (
        (TEXT, "T" * 50_000),
        r"the title has 50,000 characters; the limit is 300 "
        r"\(app\.max_title_chars\)",
    ),
    "301-character title": ((TEXT, "T" * 301), r"the title has 301 characters; the limit is 300"),
    "empty text": (("", "A title"), r"nothing to add: paste some text"),
    "blank text": (("  \n\t ", ""), r"nothing to add: paste some text"),
    "oversized text": (
        ("word " * 30_000, ""),
        r"the pasted text has 149,999 characters; the limit is 100,000",
    ),
    "text not a string": ((12345, ""), r"the document must be text"),
    "title not a string": ((TEXT, 7), r"the title must be text"),
}


@pytest.mark.parametrize("name", list(ADD_TEXT_CASES))
def test_add_text_refuses_before_anything_is_added(demo, name):
    (text, title), match = ADD_TEXT_CASES[name]
    _unchanged(demo, lambda s: s.add_text(text, title), match)


def test_tabs_newlines_and_carriage_returns_are_text(demo):
    _, service = demo
    service.retriever.reset()
    try:
        message, segments = service.add_text(
            "Quorn facts\r\n\tThe capital of Quorn is Zibbelquat.", "Quorn\tfacts"
        )
        assert segments and "Added 1 document(s)" in message
    finally:
        service.retriever.reset()


UPLOAD_CASES = {
    "unsupported type": ({"notes.pdf": b"%PDF-1.4"}, r"notes\.pdf: unsupported file type"),
    "empty file": ({"notes.txt": b""}, r"notes\.txt: the file is empty"),
    "oversized file": (
        {"big.txt": b"word " * 4000},
        r"big\.txt: 19\.5 KB is over the upload limit of 10\.2 KB \(app\.max_upload_mb=0\.01\)",
    ),
    "too many files": ({f"f{i}.txt": b"text" for i in range(11)}, r"11 files in one upload; the limit is 10"),
    "latin-1 text": ({"cafe.txt": "caf\xe9 au lait".encode("latin-1")}, r"cafe\.txt: not UTF-8 text"),
    "NUL in a text file": (
        {"nul.txt": b"some \x00 text"},
        r"nul\.txt contains the control character U\+0000",
    ),
    "malformed JSONL line": (
        {"docs.jsonl": b'{"id": "a", "text": "fine"}\n{"id": "b", "text": \n'},
        r"(?s)docs\.jsonl: 1 malformed line\(s\); nothing was added.*\ndocs\.jsonl:2: not valid JSON",
    ),
    "JSONL without id": ({"docs.jsonl": b'{"text": "no id"}\n'}, r'docs\.jsonl:1: missing or empty "id"'),
    "JSONL duplicate id": (
        {"docs.jsonl": b'{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n'},
        r"docs\.jsonl:2: duplicate document id 'a'",
    ),
    "JSONL control character": (
        {"docs.jsonl": b'{"id": "a", "text": "bad \\u0007 bell"}\n'},
        r"docs\.jsonl:1: document 'a': \"text\" contains the control character U\+0007",
    ),
    "JSONL huge title": (
        {"docs.jsonl": json.dumps({"id": "a", "title": "T" * 5000, "text": "x"}).encode() + b"\n"},
        r"docs\.jsonl:1: document 'a': \"title\" has 5,000 characters; the limit is 300",
    ),
    "JSONL of blank lines": ({"docs.jsonl": b"\n\n\n"}, r"docs\.jsonl: no documents in the file"),
    "one bad file among good ones": (
        {"good.txt": TEXT.encode(), "bad.jsonl": b"[1]\n"},
        r"bad\.jsonl: 1 malformed line\(s\); nothing was added",
    ),
}


@pytest.mark.parametrize("name", list(UPLOAD_CASES))
def test_upload_refuses_before_anything_is_added(demo, tmp_path, name):
    files, match = UPLOAD_CASES[name]
    paths = []
    for file_name, content in files.items():
        (tmp_path / file_name).write_bytes(content)
        paths.append(str(tmp_path / file_name))
    _unchanged(demo, lambda s: s.add_files(paths), match)


def test_missing_upload_and_nothing_to_add(demo, tmp_path):
    _unchanged(
        demo, lambda s: s.add_files([str(tmp_path / "gone.txt")]), r"gone\.txt: the upload could not be read"
    )
    _unchanged(
        demo, lambda s: s.add(None, "title", []), r"nothing to add: paste a text or choose files first"
    )


QUESTION_ENDPOINT_CASES = {
    "empty question": (("", None, None), r"type a question first"),
    "blank question": (("  \n ", None, None), r"type a question first"),
    "question not text": ((42, None, None), r"the question must be text"),
    "oversized question": (
        ("q" * 201, None, None),
        r"the question has 201 characters; the demo accepts at most "
        r"200 \(lm\.max_question_chars\)",
    ),
    "NUL in question": (("Who\x00?", None, None), r"the question contains the control character U\+0000 at "
                                                 r"character 4; type or paste plain text"),
    "unknown mode": (("Who?", "oracle", None), r"mode 'oracle' is not available here"),
    "top_k 0": (("Who?", None, 0), r"top_k must be a whole number from 1 to 10"),
    "top_k too large": (("Who?", None, 11), r"top_k must be a whole number from 1 to 10"),
    "top_k not a number": (("Who?", None, "many"), r"top_k must be a whole number from 1 to 10"),
}


@pytest.mark.parametrize("name", list(QUESTION_ENDPOINT_CASES))
def test_answer_endpoint_refuses_bad_requests(demo, name):
    (question, mode, top_k), match = QUESTION_ENDPOINT_CASES[name]
    _unchanged(demo, lambda s: s.answer(question, mode, top_k), match)
