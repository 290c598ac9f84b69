"""Loaders: JSONL corpus/QA (bad lines, non-UTF-8, duplicates, empty documents), SQuAD, DPR TSV,
Natural Questions and NQ-open through `datasets` on tiny fixtures with the published schemas."""

from __future__ import annotations

import json

import pytest

from common.errors import UserError
from configs.schema import DataConfig
from data_prep import nq
from data_prep.loaders import LoadStats, iter_documents, parse_source, read_qa

# ---------------------------------------------------------------------------------------------- helpers


def write_lines(path, lines: list[str | bytes]):
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else line.encode("utf-8")) + b"\n")
    return path


def doc_line(i, title=None, text=None) -> str:
    return json.dumps(
        {"id": f"d{i}", "title": title or f"Title {i}", "text": text or f"text of document {i}"}
    )


def corpus(path, on_bad_line="error"):
    stats = LoadStats()
    docs = list(iter_documents(parse_source(str(path), "corpus"), on_bad_line, stats))
    return docs, stats


def qa(path, on_bad_line="error"):
    stats = LoadStats()
    return [ex for _, ex in read_qa(parse_source(str(path), "qa"), on_bad_line, stats)], stats


# ---------------------------------------------------------------------------------------------- specs


def test_parse_source(tmp_path):
    f = write_lines(tmp_path / "c.jsonl", [doc_line(0)])
    assert parse_source(str(f), "corpus").kind == "jsonl"
    assert parse_source("nq:validation", "corpus") == parse_source("nq:validation", "qa")
    assert parse_source("nq", "qa").split is None
    assert parse_source("nq_open:train", "qa").kind == "nq_open"
    with pytest.raises(UserError, match="questions only"):
        parse_source("nq_open:train", "corpus")
    with pytest.raises(UserError, match="file not found"):
        parse_source(str(tmp_path / "missing.jsonl"), "corpus")
    with pytest.raises(UserError, match="file not found"):
        parse_source("dpr:" + str(tmp_path / "psgs.tsv"), "corpus")
    with pytest.raises(UserError, match="not a known source"):
        parse_source(str(tmp_path / "c.csv"), "corpus")
    assert parse_source(str(f), "corpus").fingerprint()["sha256"] != ""


# ---------------------------------------------------------------------------------------------- JSONL


def test_jsonl_corpus_reads_documents_in_order(tmp_path):
    f = write_lines(
        tmp_path / "c.jsonl",
        [
            doc_line(0),
            "",
            json.dumps({"id": 7, "title": "Seven", "text": "int ids are fine", "extra": 1}),
            doc_line(2),
        ],
    )
    docs, stats = corpus(f)
    assert [(d.id, d.title) for d in docs] == [("d0", "Title 0"), ("7", "Seven"), ("d2", "Title 2")]
    assert stats.bad_lines == 0 and stats.bytes_read == f.stat().st_size


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ('{"id": "x", "title": "t", "text": ', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"title": "t", "text": "x"}', '"id"'),
        ('{"id": "x", "text": "x"}', '"title" must be a string'),
        ('{"id": "x", "title": "t", "text": 3}', '"text" must be a string'),
    ],
)
def test_jsonl_bad_line_is_reported_as_file_line_or_skipped(tmp_path, bad, reason):
    f = write_lines(tmp_path / "c.jsonl", [doc_line(0), doc_line(1), bad, doc_line(3)])
    with pytest.raises(UserError, match=rf"c\.jsonl:3: .*{reason}.*on_bad_line=skip"):
        corpus(f)
    docs, stats = corpus(f, "skip")
    assert [d.id for d in docs] == ["d0", "d1", "d3"] and stats.bad_lines == 1


def test_jsonl_non_utf8_bytes_bom_and_surrogates(tmp_path):
    f = write_lines(
        tmp_path / "c.jsonl",
        [
            b"\xef\xbb\xbf" + doc_line(0).encode(),  # UTF-8 BOM on the first line
            b'{"id": "d1", "title": "Caf\xe9", "text": "latin-1 byte \xe9 here"}',
            '{"id": "d2", "title": "S", "text": "lone surrogate \\ud800 escaped"}',
        ],
    )
    docs, stats = corpus(f)
    assert [d.id for d in docs] == ["d0", "d1", "d2"]
    assert docs[1].title == "Caf\ufffd" and "\ufffd" in docs[1].text
    assert stats.non_utf8_lines == 1
    docs[2].text.encode("utf-8")  # writable as UTF-8 (the surrogate was replaced)


def test_jsonl_empty_documents_are_skipped_and_counted(tmp_path):
    f = write_lines(tmp_path / "c.jsonl", [doc_line(0), doc_line(1, text="   \n "), doc_line(2)])
    f.write_text(f.read_text().replace('"text of document 1"', '""'))
    docs, stats = corpus(f)
    assert [d.id for d in docs] == ["d0", "d2"] and stats.empty_documents == 1


def test_jsonl_duplicate_ids_are_rejected(tmp_path):
    f = write_lines(tmp_path / "c.jsonl", [doc_line(0), doc_line(1), doc_line(0, text="again")])
    with pytest.raises(UserError, match=r"c\.jsonl:3: duplicate document id 'd0'"):
        corpus(f)
    docs, stats = corpus(f, "skip")
    assert [d.text for d in docs] == ["text of document 0", "text of document 1"] and stats.duplicate_ids == 1


def test_jsonl_qa(tmp_path):
    rows = [
        {"id": "q0", "question": "Who?", "answers": ["A", " "], "gold_doc_id": "d0", "relation": "r"},
        {"id": "q1", "question": "What?", "answers": "B", "title": "Some Article"},
        {"id": "q2", "question": "When?", "answers": ["C"], "gold_doc_id": 5},
    ]
    f = write_lines(tmp_path / "qa.jsonl", [json.dumps(r) for r in rows])
    exs, _ = qa(f)
    assert [(e.id, e.answers, e.gold_doc_id, e.title, e.relation) for e in exs] == [
        ("q0", ["A"], "d0", None, "r"),
        ("q1", ["B"], None, "Some Article", None),
        ("q2", ["C"], "5", None, None),
    ]


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"id": "q", "question": "", "answers": ["a"], "gold_doc_id": "d"}, '"question"'),
        ({"id": "q", "question": "?", "answers": [], "gold_doc_id": "d"}, '"answers" is empty'),
        ({"id": "q", "question": "?", "answers": [1], "gold_doc_id": "d"}, "list of strings"),
        ({"id": "q", "question": "?", "answers": ["a"]}, 'no "gold_doc_id" and no "title"'),
    ],
)
def test_jsonl_qa_bad_rows(tmp_path, row, reason):
    f = write_lines(tmp_path / "qa.jsonl", [json.dumps(row)])
    with pytest.raises(UserError, match=rf"qa\.jsonl:1: .*{reason}"):
        qa(f)
    exs, stats = qa(f, "skip")
    assert exs == [] and stats.bad_lines == 1


def test_jsonl_qa_duplicate_ids(tmp_path):
    row = {"id": "q", "question": "?", "answers": ["a"], "gold_doc_id": "d"}
    f = write_lines(tmp_path / "qa.jsonl", [json.dumps(row), json.dumps(row)])
    with pytest.raises(UserError, match=r"qa\.jsonl:2: duplicate QA id 'q' \(first at .*qa\.jsonl:1\)"):
        qa(f)
    exs, stats = qa(f, "skip")
    assert len(exs) == 1 and stats.duplicate_ids == 1


# ---------------------------------------------------------------------------------------------- SQuAD


def squad_file(path, version="v2.0"):
    data = {
        "version": version,
        "data": [
            {
                "title": "University_of_Notre_Dame",
                "paragraphs": [
                    {
                        "context": "The university was founded in 1842 by Edward Sorin.",
                        "qas": [
                            {
                                "id": "a1",
                                "question": "When was it founded?",
                                "answers": [
                                    {"text": "1842", "answer_start": 30},
                                    {"text": "1842", "answer_start": 30},
                                ],
                            },
                            {"id": "a2", "question": "Who is mayor?", "answers": [], "is_impossible": True},
                        ],
                    },
                    {"context": "  ", "qas": []},
                    {
                        "context": "Sorin was a priest.",
                        "qas": [{"id": "a3", "question": "Sorin?", "answers": [{"text": "a priest"}]}],
                    },
                ],
            },
            {"title": "Beyonce", "paragraphs": [{"context": "Beyonce sings.", "qas": []}]},
        ],
    }
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_squad_corpus_and_questions(tmp_path):
    f = squad_file(tmp_path / "train-v2.0.json")
    docs, stats = corpus(f)
    assert [(d.id, d.title) for d in docs] == [
        ("University_of_Notre_Dame_0", "University of Notre Dame"),
        ("University_of_Notre_Dame_2", "University of Notre Dame"),
        ("Beyonce_0", "Beyonce"),
    ]
    assert stats.empty_documents == 1
    exs, stats = qa(f)
    assert [(e.id, e.answers, e.gold_doc_id, e.title) for e in exs] == [
        ("a1", ["1842"], "University_of_Notre_Dame_0", "University of Notre Dame"),
        ("a3", ["a priest"], "University_of_Notre_Dame_2", "University of Notre Dame"),
    ]
    assert stats.qa_skipped == {"unanswerable": 1}


def test_squad_malformed(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text('{"data": [\n  {"title": "x",\n')
    with pytest.raises(UserError, match=r"bad\.json:3: not valid JSON"):
        corpus(f)
    f.write_text(json.dumps({"rows": []}))
    with pytest.raises(UserError, match="not a SQuAD file"):
        corpus(f)
    f.write_text(
        json.dumps({"data": [{"title": "T", "paragraphs": [{"qas": []}, {"context": "ok", "qas": []}]}]})
    )
    with pytest.raises(UserError, match=r"data\[0\]\.paragraphs\[0\]: .*context"):
        corpus(f)
    docs, stats = corpus(f, "skip")
    assert [d.id for d in docs] == ["T_1"] and stats.bad_lines == 1


# ---------------------------------------------------------------------------------------------- DPR


def test_dpr_tsv(tmp_path):
    f = tmp_path / "psgs_w100.tsv"
    f.write_text(
        'id\ttext\ttitle\n1\t"Aaron is a prophet, ""high priest""\tand brother"\tAaron\n'
        "2\tonly two\n3\tplain text\tBee\n",
        encoding="utf-8",
    )
    src = parse_source(f"dpr:{f}", "corpus")
    with pytest.raises(UserError, match=r"psgs_w100\.tsv:3: expected 3 tab-separated columns"):
        list(iter_documents(src, "error", LoadStats()))
    docs = list(iter_documents(src, "skip", LoadStats()))
    assert [(d.id, d.title, d.text) for d in docs] == [
        ("1", "Aaron", 'Aaron is a prophet, "high priest"\tand brother'),
        ("3", "Bee", "plain text"),
    ]


# ---------------------------------------------------------------------------------------------- NQ


def nq_features():
    """The published schema of google-research-datasets/natural_questions, field by field."""
    from datasets import ClassLabel, Features, Sequence, Value

    i64 = Value("int64")
    return Features(
        {
            "id": Value("string"),
            "document": {
                "html": Value("string"),
                "title": Value("string"),
                "tokens": Sequence(
                    {"end_byte": i64, "is_html": Value("bool"), "start_byte": i64, "token": Value("string")}
                ),
                "url": Value("string"),
            },
            "question": {"text": Value("string"), "tokens": Sequence(Value("string"))},
            "long_answer_candidates": Sequence(
                {
                    "end_byte": i64,
                    "end_token": i64,
                    "start_byte": i64,
                    "start_token": i64,
                    "top_level": Value("bool"),
                }
            ),
            "annotations": Sequence(
                {
                    "id": Value("string"),
                    "long_answer": {
                        "candidate_index": i64,
                        "end_byte": i64,
                        "end_token": i64,
                        "start_byte": i64,
                        "start_token": i64,
                    },
                    "short_answers": Sequence(
                        {
                            "end_byte": i64,
                            "end_token": i64,
                            "start_byte": i64,
                            "start_token": i64,
                            "text": Value("string"),
                        }
                    ),
                    "yes_no_answer": ClassLabel(names=["NO", "YES"]),
                }
            ),
        }
    )


PAGE = (
    "<H1> Google </H1> <P> Google was founded in 1998 by Larry Page and Sergey Brin . </P> "
    "<P> It is in California . </P>"
)


def nq_row(ex_id, question, annotations, title="Google", page=PAGE):
    """annotations: list of (long (start, end) or None, [short (start, end)], yes_no)."""
    toks = page.split(" ")
    is_html = [t.startswith("<") for t in toks]
    offsets, pos = [], 0
    for t in toks:
        offsets.append((pos, pos + len(t)))
        pos += len(t) + 1
    ann = {"id": [], "long_answer": [], "short_answers": [], "yes_no_answer": []}
    for k, (long, shorts, yes_no) in enumerate(annotations):
        s, e = long or (-1, -1)
        ann["id"].append(f"{ex_id}{k}")
        ann["long_answer"].append(
            {
                "candidate_index": 0 if long else -1,
                "start_token": s,
                "end_token": e,
                "start_byte": -1,
                "end_byte": -1,
            }
        )
        ann["short_answers"].append(
            {
                "start_token": [a for a, _ in shorts],
                "end_token": [b for _, b in shorts],
                "start_byte": [0 for _ in shorts],
                "end_byte": [0 for _ in shorts],
                "text": [" ".join(toks[a:b]) for a, b in shorts],
            }
        )
        ann["yes_no_answer"].append(yes_no)
    return {
        "id": ex_id,
        "document": {
            "html": page,
            "title": title,
            "url": f"https://en.wikipedia.org//w/index.php?title={title}",
            "tokens": {
                "token": toks,
                "is_html": is_html,
                "start_byte": [a for a, _ in offsets],
                "end_byte": [b for _, b in offsets],
            },
        },
        "question": {"text": question, "tokens": question.split()},
        "long_answer_candidates": {
            "start_token": [3, 18],
            "end_token": [17, 24],
            "start_byte": [0, 0],
            "end_byte": [0, 0],
            "top_level": [True, True],
        },
        "annotations": ann,
    }


def write_nq(tmp_path):
    from datasets import Dataset

    rows = [
        # tokens 3..16: "<P> Google ... . </P>"; "1998" = 8, "Larry Page" = 10..11, "Sergey Brin" = 13..14
        nq_row("1", "when was google founded", [((3, 17), [(8, 9)], -1), ((3, 17), [], -1)]),
        nq_row("2", "who founded google", [((3, 17), [(10, 12), (13, 15)], -1)]),  # same paragraph as row 1
        nq_row("3", "is google in california", [((17, 24), [], 1)]),  # yes/no only
        nq_row("4", "what is google", [(None, [], -1)]),  # no long answer
    ]
    folder = tmp_path / "natural_questions"
    (folder / "default").mkdir(parents=True)
    Dataset.from_list(rows, features=nq_features()).to_parquet(
        folder / "default" / "validation-00000-of-00001.parquet"
    )
    return DataConfig(nq_dataset=str(folder), hf_cache_dir=str(tmp_path / "hf_cache"))


def test_nq_corpus_and_questions(tmp_path):
    cfg = write_nq(tmp_path)
    stats = LoadStats()
    docs = list(iter_documents(parse_source("nq:validation", "corpus"), "error", stats, cfg))
    para = "Google was founded in 1998 by Larry Page and Sergey Brin ."
    assert [(d.title, d.text) for d in docs] == [("Google", para), ("Google", "It is in California .")]
    assert docs[0].id == nq.passage_id("Google", para)
    assert stats.notes == {"nq_shared_passages": 1}
    exs = [ex for _, ex in read_qa(parse_source("nq:validation", "qa"), "error", stats, cfg)]
    assert [(e.id, e.question, e.answers, e.gold_doc_id, e.title) for e in exs] == [
        ("nq-1", "when was google founded", ["1998"], docs[0].id, "Google"),
        ("nq-2", "who founded google", ["Larry Page", "Sergey Brin"], docs[0].id, "Google"),
    ]
    assert stats.qa_skipped == {"nq_no_long_answer": 2, "nq_no_short_answer": 2}  # counted in both passes


def test_nq_one_pass_collects_questions(tmp_path):
    cfg = write_nq(tmp_path)
    qa_out: list = []
    docs = [d for _, d in nq.nq_documents("validation", cfg, LoadStats(), qa_out=qa_out)]
    assert len(docs) == 2 and [ex.id for _, ex in qa_out] == ["nq-1", "nq-2"]


def test_nq_open(tmp_path):
    from datasets import Dataset, Features, Sequence, Value

    folder = tmp_path / "nq_open"
    (folder / "nq_open").mkdir(parents=True)
    features = Features({"question": Value("string"), "answer": Sequence(Value("string"))})
    rows = [
        {"question": "who wrote hamlet", "answer": ["Shakespeare", "William Shakespeare"]},
        {"question": "x", "answer": []},
    ]
    for split in ("train", "validation"):
        Dataset.from_list(rows, features=features).to_parquet(
            folder / "nq_open" / f"{split}-00000-of-00001.parquet"
        )
    cfg = DataConfig(nq_open_dataset=str(folder), hf_cache_dir=str(tmp_path / "hf_cache"))
    stats = LoadStats()
    exs = [ex for _, ex in read_qa(parse_source("nq_open", "qa"), "error", stats, cfg)]
    assert [(e.id, e.split, e.answers, e.gold_doc_id, e.title) for e in exs] == [
        ("nq_open-train-0", "train", ["Shakespeare", "William Shakespeare"], None, None),
        ("nq_open-validation-0", "test", ["Shakespeare", "William Shakespeare"], None, None),
    ]
    assert stats.qa_skipped == {"nq_open_empty": 2}
    with pytest.raises(UserError, match="NQ-open has the splits"):
        list(nq.nq_open_qa("test", cfg, stats))


def test_hub_dataset_offline_is_a_clear_error(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = DataConfig(hf_cache_dir=str(tmp_path / "empty_cache"))
    with pytest.raises(
        UserError, match=r"natural_questions.*needs the Hugging Face hub or the dataset already in"
    ):
        list(iter_documents(parse_source("nq:validation", "corpus"), "error", LoadStats(), cfg))
