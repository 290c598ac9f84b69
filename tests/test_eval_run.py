"""`python -m eval.run` end to end on a tiny synthetic world with a tiny random LLaMA: outputs that agree
with each other, determinism, resume after a crash, recomputation of stale rows, ablations, clear errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from common.answers import exact_match, token_f1
from common.errors import UserError
from configs.loader import load_config
from data_prep.records import QAExample, Segment
from data_prep.store import SegmentStore, load_qa, write_store
from eval import run as eval_run
from eval.ablations import gold_hits, majority_predictions, random_hits
from eval.questions import select
from eval.report import fmt, fmt_ci
from qa.system import QASystem
from retriever.search import Hit
from tests.conftest import make_tiny_llama

SYSTEMS = (
    "closed_book,rag_text,rag_text_tuned,static_prefix,dynamic_prefix,rag_text~random,dynamic_prefix~gold"
)
TRAINED = ["dynamic_prefix", "rag_text_tuned", "static_prefix"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory, smol_tokenizer):
    """A 24-entity synthetic store + index (tiny random encoder), a tiny random LM, a checkpoint, a log."""
    from configs.schema import SyntheticConfig
    from data_prep.build import build_store
    from data_prep.synthetic import write_world
    from lm.prompting import PromptTemplate
    from qa.checkpoint import new_model, save_checkpoint
    from qa.systems import parse_system
    from retriever.index import build_index
    from retriever.testing import make_tiny_encoder, words_of

    root = tmp_path_factory.mktemp("eval")
    corpus, qa = write_world(SyntheticConfig(n_entities=24), root / "run" / "data")
    rows = [json.loads(line) for path in (corpus, qa) for line in path.read_text().splitlines()]
    make_tiny_encoder(
        root / "enc",
        words_of([r.get("title", "") + " " + r.get("text", r.get("question", "")) for r in rows]),
    )
    lm = make_tiny_llama(len(smol_tokenizer))
    lm.save_pretrained(root / "lm")
    smol_tokenizer.save_pretrained(root / "lm")
    overrides = [
        f"run_dir={root / 'run'}",
        f"retriever.model={root / 'enc'}",
        "data.synthetic.n_entities=24",
        "data.num_workers=1",
        f"lm.model={root / 'lm'}",
        "device=cpu",
        "index.nprobe=100",
        "lm.max_new_tokens=4",
        "eval.metrics=em,f1,contains",
        "eval.bootstrap=200",
        "retriever.top_k=1",
        "eval.batch_size=4",
        "knowledge_encoder.prefix_slots=4",
        "train.static_slots=4",
        "knowledge_encoder.format_slots=2",
    ]
    cfg = load_config(None, overrides)
    build_store(cfg, progress=False)
    build_index(cfg, progress=False)
    template = PromptTemplate(smol_tokenizer, cfg.lm.system_prompt)
    models = {n: new_model(parse_system(n), cfg, lm, template, None) for n in TRAINED}
    save_checkpoint(root / "run" / "checkpoints" / "final", models, cfg, lm.config, {"step": 3})
    log = root / "run" / "logs" / "train.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text(
        "".join(json.dumps({"step": s, "loss": {n: 5.0 / s for n in TRAINED}}) + "\n" for s in (1, 2, 3))
        + json.dumps({"step": 3, "final_dev_em": {n: 0.0 for n in TRAINED}})
        + "\n"
    )
    return root, overrides


class CountingAnswer:
    """Wraps QASystem.answer to count the questions answered per mode."""

    def __init__(self, monkeypatch):
        self.calls: dict[str, int] = {}
        original = QASystem.answer

        def answer(qa, questions, mode=None, **kwargs):
            self.calls[mode] = self.calls.get(mode, 0) + len(questions)
            return original(qa, questions, mode=mode, **kwargs)

        monkeypatch.setattr(QASystem, "answer", answer)


def run(overrides, *extra) -> dict:
    assert eval_run.main([*overrides, *extra]) == 0
    cfg = load_config(None, [*overrides, *extra])
    return json.loads((Path(cfg.eval.out_dir) / "metrics.json").read_text())


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def table_rows(report: str) -> dict[str, list[str]]:
    """The systems table of report.md: system name -> its cells."""
    section = report.split("## Systems", 1)[1].split("\n\n", 2)[1]
    out = {}
    for line in section.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0].strip("`")] = cells
    return out


def test_end_to_end_outputs_agree(world, tmp_path):
    root, overrides = world
    out = tmp_path / "out"
    m = run(
        overrides, f"eval.out_dir={out}", f"eval.systems={SYSTEMS}", "eval.limit=6", "eval.k_values=[1,2]"
    )
    for name in ("predictions.jsonl", "metrics.json", "report.md", "metrics.png", "k_sweep.png", "loss.png"):
        assert (out / name).is_file(), name
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    examples = load_qa(root / "run" / "store", "test")[:6]
    assert m["n"] == 6 and m["split"] == "test"
    assert m["order"] == [*SYSTEMS.split(","), "majority"]
    for name, s in m["systems"].items():
        for key in ("em", "f1", "contains", "latency_ms_mean"):
            assert 0.0 <= s[key] <= (1.0 if key != "latency_ms_mean" else 1e9)
        assert s["bertscore_f1"] is None and s["bleurt"] is None
        retrieves = name.startswith(("rag_text", "dynamic_prefix")) and "~" not in name
        assert (s["retrieval_top1"] is not None) == retrieves, name
    rag = m["systems"]["rag_text"]
    assert rag["retrieval_top5"] >= rag["retrieval_top1"]
    assert rag["retrieval_top1"] == m["retrieval"]["top1_accuracy"] and m["retrieval"]["k_searched"] == 5
    assert (
        m["systems"]["closed_book"]["latency_ms_mean"] > 0
        and m["systems"]["majority"]["latency_ms_mean"] == 0
    )
    assert m["systems"]["dynamic_prefix"]["prefix_slots_mean"] > 0
    assert m["systems"]["closed_book"]["prefix_slots_mean"] == 0
    assert set(m["skipped"]) == {"bertscore_f1", "bleurt"}
    assert m["config"]["checkpoint_step"] == 3 and m["config"]["batch_size"] == 4

    # predictions.jsonl: its documented keys (docs/ARCHITECTURE.md "Formats"), one row per (question, system, k), and the metrics follow from it.
    rows = read_rows(out / "predictions.jsonl")
    for r in rows:
        assert {"id", "question", "prediction", "answers", "mode", "retrieved", "latency_ms"} <= set(r)
    by = {(r["id"], r["mode"], r["k"]): r for r in rows}
    retrieving = [n for n in SYSTEMS.split(",") if n.startswith(("rag_text", "dynamic_prefix"))]
    assert len(by) == len(rows) == 6 * (2 * len(retrieving) + 2 + 1)  # k=1,2 / closed_book, static / majority
    for name in m["order"]:
        k = 1 if name in retrieving else None
        preds = [by[(ex.id, name, k)]["prediction"] for ex in examples]
        em = sum(max(exact_match(p, a) for a in ex.answers) for p, ex in zip(preds, examples)) / 6
        f1 = sum(max(token_f1(p, a) for a in ex.answers) for p, ex in zip(preds, examples)) / 6
        assert m["systems"][name]["em"] == pytest.approx(em) and m["systems"][name]["f1"] == pytest.approx(f1)
        assert all(len(by[(ex.id, name, k)]["retrieved"]) == (k or 0) for ex in examples)
    assert m["k_sweep"]["rag_text"]["1"]["em"] == m["systems"]["rag_text"]["em"]
    assert m["k_sweep"]["rag_text"]["1"]["em_ci"] == m["systems"]["rag_text"]["em_ci"]  # same rows, same CI
    assert set(m["k_sweep"]) == set(retrieving) and set(m["k_sweep"]["rag_text"]) == {"1", "2"}
    # The ablations read what they should: random segments never from the gold document, gold first.
    store = SegmentStore.open(root / "run" / "store")
    for ex in examples:
        ids = [h["segment_id"] for h in by[(ex.id, "rag_text~random", 2)]["retrieved"]]
        assert all(store.get(i).doc_id != ex.gold_doc_id for i in ids)
        assert by[(ex.id, "dynamic_prefix~gold", 1)]["retrieved"][0]["segment_id"] == ex.gold_segment_ids[0]
    # The majority row answers with the training majority of the question's relation.
    expected, _ = majority_predictions(load_qa(root / "run" / "store", "train"), examples)
    assert [by[(ex.id, "majority", None)]["prediction"] for ex in examples] == expected

    # report.md shows exactly metrics.json's numbers.
    report = (out / "report.md").read_text()
    cells = table_rows(report)
    assert list(cells) == m["order"]
    for name, s in m["systems"].items():
        assert cells[name][2] == fmt_ci(s["em"], s["em_ci"]) and cells[name][3] == fmt_ci(s["f1"], s["f1_ci"])
        assert cells[name][7] == fmt(s["retrieval_top1"]) and cells[name][8] == fmt(s["retrieval_top5"])
        assert cells[name][9] == fmt(s["latency_ms_mean"], 1) and cells[name][12] == fmt(
            s["prefix_slots_mean"], 1
        )
    assert "batch of 4 questions" in report and "![training loss](loss.png)" in report
    assert "k_sweep.png" in report and re.search(r"`rag_text` \| `closed_book` \| EM", report)
    pairs = {(d["system"], d["baseline"]) for d in m["comparisons"]}
    assert {
        ("dynamic_prefix", "rag_text_tuned"),
        ("rag_text~random", "rag_text"),
        ("dynamic_prefix~gold", "dynamic_prefix"),
        ("static_prefix", "closed_book"),
    } <= pairs
    assert ("rag_text", "rag_text_tuned") not in pairs and not any("majority" in p for p in pairs)


def test_deterministic_and_resumable(world, tmp_path, monkeypatch):
    _, overrides = world
    base = [*overrides, "eval.systems=closed_book,rag_text,dynamic_prefix"]
    counter = CountingAnswer(monkeypatch)
    run(base, f"eval.out_dir={tmp_path / 'a'}", "eval.limit=3")
    assert counter.calls == {"closed_book": 3 + 1, "rag_text": 3 + 1, "dynamic_prefix": 3 + 1}  # + warm-up
    counter.calls.clear()
    a = run(base, f"eval.out_dir={tmp_path / 'a'}", "eval.limit=5")  # resumes: only 2 new questions each
    assert counter.calls == {"closed_book": 2 + 1, "rag_text": 2 + 1, "dynamic_prefix": 2 + 1}
    b = run(base, f"eval.out_dir={tmp_path / 'b'}", "eval.limit=5")  # from scratch: the same answers
    pa, pb = read_rows(tmp_path / "a" / "predictions.jsonl"), read_rows(tmp_path / "b" / "predictions.jsonl")
    key = lambda r: (r["id"], r["mode"], r["k"])  # noqa: E731
    assert {key(r): r["prediction"] for r in pa} == {key(r): r["prediction"] for r in pb}
    assert {n: s["em"] for n, s in a["systems"].items()} == {n: s["em"] for n, s in b["systems"].items()}
    assert a["systems"]["rag_text"]["em_ci"] == b["systems"]["rag_text"]["em_ci"]

    # A crash mid-write leaves a torn last line: it is dropped and that one answer recomputed.
    path = tmp_path / "a" / "predictions.jsonl"
    text = path.read_text()
    last_model_row = max(i for i, r in enumerate(pa) if r["mode"] != "majority")
    lines = text.splitlines(keepends=True)
    torn = lines[:last_model_row] + [lines[last_model_row][:40]]
    path.write_text("".join(torn))
    counter.calls.clear()
    run(base, f"eval.out_dir={tmp_path / 'a'}", "eval.limit=5")
    assert sum(counter.calls.values()) == 2  # one question + one warm-up
    assert len(read_rows(path)) == len(pa)

    # Rows made with another setup (here: another answer length) are recomputed, not mixed in.
    counter.calls.clear()
    run(base, f"eval.out_dir={tmp_path / 'a'}", "eval.limit=5", "lm.max_new_tokens=2")
    assert counter.calls == {"closed_book": 5 + 1, "rag_text": 5 + 1, "dynamic_prefix": 5 + 1}
    counter.calls.clear()
    run(base, f"eval.out_dir={tmp_path / 'a'}", "eval.limit=5", "lm.max_new_tokens=2", "eval.resume=false")
    assert counter.calls == {"closed_book": 5 + 1, "rag_text": 5 + 1, "dynamic_prefix": 5 + 1}
    assert len(read_rows(path)) == len(pa)
    # A corrupt line in the middle is an error naming file:line, not silently skipped.
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + "{not json\n" + "".join(lines[1:]))
    with pytest.raises(UserError, match=r"predictions.jsonl:2: corrupt"):
        eval_run.main([*base, f"eval.out_dir={tmp_path / 'a'}", "eval.limit=5"])


def test_random_sample_is_seeded_shared_and_resumable(world, tmp_path, monkeypatch):
    root, overrides = world
    base = [*overrides, "eval.systems=closed_book,rag_text", "eval.limit=4", "eval.sample=random"]
    split = load_qa(root / "run" / "store", "test")
    assert len(split) > 4
    counter = CountingAnswer(monkeypatch)
    m = run(base, f"eval.out_dir={tmp_path / 'a'}")
    rows = read_rows(tmp_path / "a" / "predictions.jsonl")
    ids = {
        mode: [r["id"] for r in rows if r["mode"] == mode] for mode in ("closed_book", "rag_text", "majority")
    }
    # Every system, the majority baseline included, answers the same 4 questions: a seeded sample, in file
    # order, not the first 4.
    expected = [ex.id for ex in select(split, 4, "random", seed=0)]
    assert ids["closed_book"] == ids["rag_text"] == ids["majority"] == expected
    assert expected != [ex.id for ex in split[:4]] and set(expected) <= {ex.id for ex in split}
    assert m["n"] == 4 and m["config"]["sample"] == "random" and m["config"]["limit"] == 4
    assert "(a random sample of 4, seed 0)" in (tmp_path / "a" / "report.md").read_text()
    # A rerun draws the same questions: everything is reused, nothing answered again.
    counter.calls.clear()
    again = run(base, f"eval.out_dir={tmp_path / 'a'}")
    assert counter.calls == {} and again["systems"]["rag_text"]["em"] == m["systems"]["rag_text"]["em"]
    # Another seed draws another sample.
    run(base, f"eval.out_dir={tmp_path / 'b'}", "seed=1")
    other = [r["id"] for r in read_rows(tmp_path / "b" / "predictions.jsonl") if r["mode"] == "closed_book"]
    assert other == [ex.id for ex in select(split, 4, "random", seed=1)] and other != expected
    with pytest.raises(UserError, match="eval.sample"):
        eval_run.main([*overrides, "eval.sample=last"])


def test_select_first_or_random():
    exs = [QAExample(f"q{i}", "?", ["a"]) for i in range(50)]
    ids = lambda sel: [ex.id for ex in sel]  # noqa: E731
    assert ids(select(exs, 10, "first", seed=0)) == ids(exs[:10])
    assert ids(select(exs, None, "random", seed=0)) == ids(select(exs, 99, "random", seed=0)) == ids(exs)
    r0 = select(exs, 10, "random", seed=0)
    assert len(r0) == 10 and ids(r0) != ids(exs[:10])
    assert ids(r0) == ids(select(exs, 10, "random", seed=0))  # reproducible
    assert ids(r0) == sorted(ids(r0), key=lambda i: int(i[1:]))  # file order kept
    assert ids(select(exs, 10, "random", seed=1)) != ids(r0)  # seeded
    assert set(ids(r0)) <= set(ids(select(exs, 20, "random", seed=0)))  # a larger N keeps a smaller one's
    # The draw depends on (seed, id), not on the file order.
    assert set(ids(select(exs[::-1], 10, "random", seed=0))) == set(ids(r0))


def test_clear_errors(world, tmp_path):
    root, overrides = world
    with pytest.raises(UserError, match="has no static_prefix@p8; it holds: dynamic_prefix, rag_text_tuned"):
        eval_run.main([*overrides, "eval.systems=closed_book,static_prefix@p8"])
    with pytest.raises(UserError, match="need a trained checkpoint for lm.model=.* and there is none"):
        eval_run.main([*overrides, "eval.systems=dynamic_prefix", f"qa.checkpoint={tmp_path / 'none'}"])
    with pytest.raises(UserError, match="unknown system `bm25`"):
        eval_run.main([*overrides, "eval.systems=bm25"])
    with pytest.raises(UserError, match="eval.limit must be >= 1"):
        eval_run.main([*overrides, "eval.limit=0"])
    with pytest.raises(UserError, match="eval.threads must be >= 0"):
        eval_run.main([*overrides, "eval.threads=-1"])
    with pytest.raises(UserError, match=r"eval.k_values must be >= 1"):
        eval_run.main([*overrides, "eval.k_values=[0]"])
    with pytest.raises(UserError, match="unexpected arguments"):
        eval_run.main([*overrides, "what?"])
    # A QA set without answers.
    segs = [Segment(0, "d0", "Doc", "some text", 0, 9, 0, 2)]
    qa = [
        QAExample("q0", "Which?", ["x"], "d0", "Doc", [0], "test"),
        QAExample("q1", "What?", [], "d0", "Doc", [], "test"),
    ]
    write_store(tmp_path / "run" / "store", segs, qa)
    with pytest.raises(
        UserError, match=r"1 of the 2 `test` questions evaluated have no gold answers \(first: id q1\)"
    ):
        eval_run.main([f"run_dir={tmp_path / 'run'}", "eval.systems=closed_book"])
    with pytest.raises(UserError, match="no `dev` questions"):
        eval_run.main([f"run_dir={tmp_path / 'run'}", "eval.systems=closed_book", "data.split=dev"])


# ---------------------------------------------------------------------------------------------- ablations


class FakeStore:
    def __init__(self, n: int):
        self.segments = [Segment(i, f"d{i // 2}", f"T{i // 2}", f"text {i}", 0, 1, 0, 1) for i in range(n)]

    def __len__(self):
        return len(self.segments)

    def get_many(self, ids):
        return [self.segments[int(i)] for i in ids]


def test_random_hits_avoid_the_gold_document_and_depend_only_on_seed_and_id():
    store = FakeStore(40)
    exs = [QAExample(f"q{i}", "?", ["a"], f"d{i}", None, [2 * i]) for i in range(10)]
    hits = random_hits(store, exs, 3, seed=0)
    assert all(len(h) == 3 and len({x.segment_id for x in h}) == 3 for h in hits)
    assert all(x.doc_id != ex.gold_doc_id for ex, h in zip(exs, hits) for x in h)
    assert [x.segment_id for x in random_hits(store, exs[5:], 3, seed=0)[0]] == [
        x.segment_id for x in hits[5]
    ]
    assert [[x.segment_id for x in h] for h in random_hits(store, exs, 3, seed=1)] != [
        [x.segment_id for x in h] for h in hits
    ]
    with pytest.raises(UserError, match="needs 39 segments"):
        random_hits(store, exs[:1], 39, seed=0)


def test_gold_hits_put_gold_first_then_retrieved():
    store = FakeStore(10)
    exs = [QAExample("q0", "?", ["a"], "d1", None, [3]), QAExample("q1", "?", ["a"], "d2", None, [])]
    retrieved = [
        [Hit(3, 0.9, "d1", "T1", "t"), Hit(7, 0.5, "d3", "T3", "t"), Hit(8, 0.4, "d4", "T4", "t")],
        [Hit(1, 0.9, "d0", "T0", "t"), Hit(2, 0.5, "d1", "T1", "t")],
    ]
    hits, without = gold_hits(store, exs, retrieved, 2)
    assert [h.segment_id for h in hits[0]] == [3, 7] and [h.segment_id for h in hits[1]] == [1, 2]
    assert without == 1


def test_majority_by_relation_or_overall():
    train = [
        QAExample(f"t{i}", "?", [a], relation=r)
        for i, (a, r) in enumerate(
            [("x", "r1"), ("x", "r1"), ("y", "r1"), ("z", "r2"), ("y", "r2"), ("y", "r2")]
        )
    ]
    test = [
        QAExample("a", "?", ["x"], relation="r1"),
        QAExample("b", "?", ["y"], relation="r2"),
        QAExample("c", "?", ["y"], relation="r3"),
    ]
    preds, rule = majority_predictions(train, test)
    assert preds == ["x", "y", "y"] and "relation" in rule  # unseen relation: the overall majority (y: 3)
    plain = [QAExample(e.id, "?", e.answers) for e in train]
    preds, rule = majority_predictions(plain, test)
    assert preds == ["y", "y", "y"] and "'y'" in rule
    with pytest.raises(UserError, match="no training questions"):
        majority_predictions([], test)
