"""`python -m data_prep.build`: corpus + QA → store, gold segments, splits, skip/force, bad input, crashes."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from common.errors import UserError
from configs.loader import load_config
from data_prep import build as build_mod
from data_prep.build import build_store, main
from data_prep.split import split_of
from data_prep.store import SegmentStore, load_qa


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A tiny fast tokenizer saved like a model folder: every word or punctuation mark is one token."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "[PAD]": 3}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    out = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]"
    ).save_pretrained(out)
    return out


def words(n: int, start: int = 0) -> str:
    return " ".join(f"w{i}" for i in range(start, start + n))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def dataset(tmp_path):
    docs = [{"id": f"d{i}", "title": f"Article {i}", "text": words(3 + 7 * i)} for i in range(30)]
    # The answer sits in the middle of a long document, so only some of its windows contain it.
    docs.append(
        {"id": "long", "title": "The Long One", "text": words(40) + " the Golden Key " + words(40, 500)}
    )
    docs.append({"id": "empty", "title": "Nothing", "text": "   "})
    qa = [
        {"id": "q-long", "question": "What opens it?", "answers": ["golden  key"], "gold_doc_id": "long"},
        {"id": "q-d5", "question": "Which word?", "answers": ["w7"], "gold_doc_id": "d5"},
        {"id": "q-none", "question": "Absent?", "answers": ["zzz"], "gold_doc_id": "d3"},
        {"id": "q-title", "question": "No gold doc?", "answers": ["x"], "title": "Some Article"},
    ]
    return write_jsonl(tmp_path / "corpus.jsonl", docs), write_jsonl(tmp_path / "qa.jsonl", qa)


def config(tmp_path, tok_dir, corpus, qa, *extra):
    return load_config(
        None,
        [
            f"run_dir={tmp_path / 'run'}",
            f"data.corpus={corpus}",
            f"data.qa={qa}",
            f"retriever.model={tok_dir}",
            "data.window=16",
            "data.stride=4",
            "data.num_workers=1",
            *extra,
        ],
    )


def test_build_jsonl_end_to_end(tmp_path, tok_dir, dataset):
    corpus, qa = dataset
    cfg = config(tmp_path, tok_dir, corpus, qa)
    result = build_store(cfg, progress=False)
    store = SegmentStore.open(tmp_path / "run" / "store")
    assert not result.skipped and result.store_dir == tmp_path / "run" / "store"
    texts = {r["id"]: r for r in map(json.loads, corpus.read_text().splitlines())}
    segs = [s for b in store.iter_batches(64) for s in b]
    assert [s.segment_id for s in segs] == list(range(len(store)))
    for s in segs:
        assert s.text == texts[s.doc_id]["text"][s.char_start : s.char_end]
        assert s.title == texts[s.doc_id]["title"]
    m = store.manifest
    assert m["counts"]["documents"] == 31 and m["counts"]["empty_documents_skipped"] == 1
    assert m["window"] == 16 and m["stride"] == 4 and m["tokenizer"]["model"] == str(tok_dir)
    assert m["counts"]["qa_without_gold_segment"] == 2  # q-none (answer absent) and q-title (no gold doc)
    assert sum(m["counts"]["qa_per_split"].values()) == 4

    by_id = {ex.id: ex for ex in load_qa(store.path, "all")}
    long_segs = [s for s in segs if s.doc_id == "long"]
    assert len(long_segs) > 3
    gold = by_id["q-long"].gold_segment_ids
    assert gold and all("Golden Key" in store.get(i).text and store.get(i).doc_id == "long" for i in gold)
    assert {s.segment_id for s in long_segs if "Golden Key" in s.text} == set(gold)
    assert by_id["q-d5"].gold_segment_ids and by_id["q-none"].gold_segment_ids == []
    assert by_id["q-long"].title == "The Long One"
    for ex in by_id.values():
        assert ex.split == split_of(ex.title, cfg.seed, cfg.data.dev_fraction, cfg.data.test_fraction)
    assert by_id["q-title"].title == "Some Article" and by_id["q-title"].gold_segment_ids == []


def test_identical_build_is_skipped_unless_inputs_change_or_forced(tmp_path, tok_dir, dataset, capsys):
    corpus, qa = dataset
    first = build_store(config(tmp_path, tok_dir, corpus, qa), progress=False)
    again = build_store(config(tmp_path, tok_dir, corpus, qa), progress=False)
    assert again.skipped and again.manifest["fingerprint"] == first.manifest["fingerprint"]
    forced = build_store(config(tmp_path, tok_dir, corpus, qa), force=True, progress=False)
    assert not forced.skipped and forced.manifest["fingerprint"] == first.manifest["fingerprint"]
    wider = build_store(config(tmp_path, tok_dir, corpus, qa, "data.window=24"), progress=False)
    assert not wider.skipped and wider.manifest["fingerprint"] != first.manifest["fingerprint"]
    # Only the split rule changed: new QA splits, same segments (an index built on them stays valid).
    resplit = build_store(config(tmp_path, tok_dir, corpus, qa, "data.window=24", "seed=5"), progress=False)
    assert not resplit.skipped and resplit.manifest["fingerprint"] == wider.manifest["fingerprint"]
    with corpus.open("a") as f:
        f.write(json.dumps({"id": "new", "title": "New", "text": "fresh words"}) + "\n")
    assert not build_store(
        config(tmp_path, tok_dir, corpus, qa, "data.window=24", "seed=5"), progress=False
    ).skipped


def test_pool_build_equals_serial_build(tmp_path, tok_dir, dataset):
    corpus, qa = dataset
    serial = build_store(config(tmp_path / "a", tok_dir, corpus, qa), progress=False)
    pooled = build_store(
        config(tmp_path / "b", tok_dir, corpus, qa, "data.num_workers=2", "data.chunk_docs=3"), progress=False
    )
    assert pooled.manifest["fingerprint"] == serial.manifest["fingerprint"]
    assert pooled.manifest["qa_fingerprint"] == serial.manifest["qa_fingerprint"]


def test_bad_lines_fail_with_file_line_or_are_counted(tmp_path, tok_dir, dataset):
    corpus, qa = dataset
    lines = corpus.read_text().splitlines()
    lines.insert(3, '{"id": "broken", "title": ')
    lines.insert(5, lines[0])  # duplicate id d0
    corpus.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"corpus\.jsonl:4: not valid JSON"):
        build_store(config(tmp_path, tok_dir, corpus, qa), progress=False)
    assert not (tmp_path / "run" / "store").exists()
    result = build_store(config(tmp_path, tok_dir, corpus, qa, "data.on_bad_line=skip"), progress=False)
    counts = result.manifest["counts"]
    assert counts["bad_lines_skipped"] == 1 and counts["duplicate_ids_skipped"] == 1
    assert counts["documents"] == 31


def test_qa_whose_gold_document_is_missing(tmp_path, tok_dir, dataset):
    corpus, _ = dataset
    qa = write_jsonl(
        tmp_path / "qa2.jsonl",
        [{"id": "q", "question": "?", "answers": ["a"], "gold_doc_id": "nope"}],
    )
    with pytest.raises(UserError, match=r"qa2\.jsonl:1: .*gold_doc_id 'nope' is not in the corpus"):
        build_store(config(tmp_path, tok_dir, corpus, qa), progress=False)
    write_jsonl(
        qa, [{"id": "q", "question": "?", "answers": ["a"], "gold_doc_id": "nope", "title": "Elsewhere"}]
    )
    result = build_store(config(tmp_path, tok_dir, corpus, qa), progress=False)
    assert result.manifest["counts"]["qa_gold_doc_missing"] == 1
    (ex,) = load_qa(result.store_dir, "all")
    assert ex.gold_segment_ids == [] and ex.split == split_of("Elsewhere")


def test_crash_mid_build_keeps_the_previous_store(tmp_path, tok_dir, dataset, monkeypatch):
    corpus, qa = dataset
    first = build_store(config(tmp_path, tok_dir, corpus, qa), progress=False)
    real = build_mod.iter_segmented

    def crashing(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            if i == 10:
                raise MemoryError("simulated crash")
            yield item

    monkeypatch.setattr(build_mod, "iter_segmented", crashing)
    with pytest.raises(MemoryError):
        build_store(config(tmp_path, tok_dir, corpus, qa, "data.window=30"), force=True, progress=False)
    store = SegmentStore.open(tmp_path / "run" / "store")
    assert store.fingerprint == first.manifest["fingerprint"] and store.manifest["window"] == 16
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["store"]  # no temp directory left


def test_squad_build(tmp_path, tok_dir):
    squad = {
        "version": "v2.0",
        "data": [
            {
                "title": "Edward_Sorin",
                "paragraphs": [
                    {
                        "context": "Edward Sorin founded the university in 1842 . " + words(30),
                        "qas": [
                            {
                                "id": "s1",
                                "question": "When?",
                                "answers": [{"text": "1842", "answer_start": 39}],
                            },
                            {"id": "s2", "question": "Mayor?", "answers": [], "is_impossible": True},
                        ],
                    }
                ],
            }
        ],
    }
    f = tmp_path / "dev-v2.0.json"
    f.write_text(json.dumps(squad))
    result = build_store(config(tmp_path, tok_dir, f, f), progress=False)
    (ex,) = load_qa(result.store_dir, "all")
    store = SegmentStore.open(result.store_dir)
    assert ex.gold_doc_id == "Edward_Sorin_0" and ex.title == "Edward Sorin"
    assert ex.gold_segment_ids == [0] and "1842" in store.get(0).text
    assert result.manifest["counts"]["qa_skipped"] == {"unanswerable": 1}


def test_nq_one_pass_build(tmp_path, tok_dir):
    from tests.test_loaders import write_nq

    nq_cfg = write_nq(tmp_path)
    cfg = config(
        tmp_path, tok_dir, "nq:validation", "nq:validation",
        f"data.nq_dataset={nq_cfg.nq_dataset}", f"data.hf_cache_dir={nq_cfg.hf_cache_dir}",
    )  # fmt: skip
    result = build_store(cfg, progress=False)
    qa = {ex.id: ex for ex in load_qa(result.store_dir, "all")}
    store = SegmentStore.open(result.store_dir)
    assert len(store) == 2 and set(qa) == {"nq-1", "nq-2"}
    assert qa["nq-1"].gold_segment_ids == [0] and "1998" in store.get(0).text
    assert qa["nq-2"].split == split_of("Google")


def test_synthetic_build(tmp_path, tok_dir):
    pytest.importorskip("data_prep.synthetic")
    cfg = load_config(
        None,
        [
            f"run_dir={tmp_path}",
            f"retriever.model={tok_dir}",
            "data.synthetic.n_entities=24",
            "data.num_workers=1",
        ],
    )
    result = build_store(cfg, progress=False)
    assert (tmp_path / "data" / "corpus.jsonl").is_file()
    counts = result.manifest["counts"]
    assert counts["documents"] == 24 and counts["qa"] > 24
    qa = load_qa(result.store_dir, "all")
    assert sum(bool(ex.gold_segment_ids) for ex in qa) >= 0.9 * len(qa)
    assert all(ex.split == split_of(ex.title, 0, 0.1, 0.2) for ex in qa)


def test_cli(tmp_path, tok_dir, dataset, capsys):
    corpus, qa = dataset
    args = [
        f"run_dir={tmp_path / 'run'}",
        f"data.corpus={corpus}",
        f"data.qa={qa}",
        f"retriever.model={tok_dir}",
    ]
    assert main([*args, "data.num_workers=1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "segments" in out and "segments/s" in out and "fingerprint" in out
    main([*args, "data.num_workers=1", "--no-progress"])
    assert "identical store already exists" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    assert "--force" in help_text and "data.window" in help_text and "OVERLAP" in help_text
    with pytest.raises(UserError, match="unexpected arguments"):
        main([*args, "stray"])
