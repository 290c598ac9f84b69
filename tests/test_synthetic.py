"""The synthetic knowledge world: deterministic, streaming, split by entity, answers in gold articles."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import time
from collections import defaultdict

import pytest

from common.errors import UserError
from configs.schema import SyntheticConfig
from data_prep.split import split_of
from data_prep.synthetic import (
    World,
    iter_documents,
    iter_question_templates,
    iter_questions,
    majority_answers,
    write_world,
)
from data_prep.synthetic_names import CLUSTER_SPACE, MAX_VARIANTS, Permutation, StemSpace, stem_of_code
from data_prep.synthetic_templates import RELATIONS, TYPES

SMALL = SyntheticConfig(n_entities=240, seed=0, questions_per_entity=4)


def _docs(cfg):
    return [(d.id, d.title, d.text) for d in iter_documents(cfg)]


def _questions(cfg, **kw):
    return [dataclasses.astuple(q) for q in iter_questions(cfg, **kw)]


def test_deterministic_for_a_seed():
    assert _docs(SMALL) == _docs(SMALL)
    assert _questions(SMALL, seed=3) == _questions(SMALL, seed=3)
    # entity i alone equals entity i of the stream (no hidden state carried between entities)
    docs = _docs(SMALL)
    world = World(SMALL)
    for i in (0, 7, 131, 239):
        d = world.document(i)
        assert (d.id, d.title, d.text) == docs[i]


def test_different_seeds_differ():
    other = dataclasses.replace(SMALL, seed=1)
    a, b = _docs(SMALL), _docs(other)
    assert sum(x[1] != y[1] for x, y in zip(a, b)) > 0.9 * len(a)  # other names
    assert sum(x[2] != y[2] for x, y in zip(a, b)) == len(a)  # every article text differs
    # the split seed moves entities between splits, the world seed does not matter for that
    s0 = {q.gold_doc_id: q.split for q in iter_questions(SMALL, seed=0)}
    s1 = {q.gold_doc_id: q.split for q in iter_questions(SMALL, seed=1)}
    assert s0 != s1


def test_ids_and_titles_unique():
    cfg = SyntheticConfig(n_entities=3000)
    docs = _docs(cfg)
    assert len({d[0] for d in docs}) == len(docs)
    assert len({d[1] for d in docs}) == len(docs)
    qids = [q.id for q in iter_questions(cfg)]
    assert len(set(qids)) == len(qids)


def test_titles_unique_in_a_million_entity_world():
    for variants in (1, 12, MAX_VARIANTS):
        world = World(SyntheticConfig(n_entities=1_000_000, name_variants=variants))
        sample = random.Random(variants).sample(range(world.n), 20_000) + list(range(6 * MAX_VARIANTS * 2))
        titles = [world.title(i) for i in set(sample)]
        assert len(set(titles)) == len(titles)


def test_names_are_injective_by_construction():
    perm = Permutation(1000, 5, "x")
    assert sorted(perm(x) for x in range(1000)) == list(range(1000))
    codes = random.Random(0).sample(range(CLUSTER_SPACE * MAX_VARIANTS), 50_000)
    assert len({stem_of_code(c) for c in codes}) == len(codes)
    stems = StemSpace(0)
    cluster = [stems.stem(17, v) for v in range(MAX_VARIANTS)]
    assert len(set(cluster)) == MAX_VARIANTS
    # near-duplicates: members of a cluster share everything but the last vowel and the coda
    prefix = os.path.commonprefix(cluster)
    assert all(len(s) - len(prefix) <= 4 for s in cluster) and len(prefix) >= 4


def test_split_by_entity_and_the_one_split_rule():
    splits_of_doc = defaultdict(set)
    world = World(SMALL)
    for q in iter_questions(SMALL, seed=2, dev_fraction=0.2, test_fraction=0.3):
        splits_of_doc[q.gold_doc_id].add(q.split)
        assert q.split == split_of(q.title, 2, 0.2, 0.3)
        assert q.title == world.title(int(q.gold_doc_id.split("-")[1]))
    assert all(len(s) == 1 for s in splits_of_doc.values())
    assert {next(iter(s)) for s in splits_of_doc.values()} == {"train", "dev", "test"}


def test_test_templates_are_held_out():
    by_split = defaultdict(set)
    items = list(iter_question_templates(SyntheticConfig(n_entities=600), seed=0))
    for ex, template in items:
        by_split[ex.split].add((ex.relation, template))
    assert by_split["test"] and by_split["train"] and by_split["dev"]
    assert by_split["test"].isdisjoint(by_split["train"] | by_split["dev"])
    # independent of the labels: no test question's text fits any train template of its relation
    train_patterns = defaultdict(list)
    for rel, template in by_split["train"] | by_split["dev"]:
        pattern = re.escape(template).replace(re.escape("{S}"), ".+").replace(re.escape("{s}"), ".+")
        train_patterns[rel].append(re.compile(f"^{pattern}$"))
    test_questions = [ex for ex, _ in items if ex.split == "test"]
    assert len(test_questions) > 100
    for ex in test_questions:
        assert not any(p.match(ex.question) for p in train_patterns[ex.relation]), ex.question
    # every relation keeps templates for both sides
    for rel in RELATIONS.values():
        assert len(rel.train_questions) >= 3 and len(rel.test_questions) >= 2
        assert set(rel.train_questions).isdisjoint(rel.test_questions)


def test_each_answer_verbatim_in_its_gold_document_and_question_names_the_entity():
    cfg = SyntheticConfig(n_entities=600)
    docs = {d.id: d for d in iter_documents(cfg)}
    n = 0
    for q in iter_questions(cfg):
        gold = docs[q.gold_doc_id]
        assert q.answers and all(a in gold.text for a in q.answers), (q, gold.text)
        assert gold.title in q.question
        assert 1 <= len(q.answers[0].split()) <= 3
        n += 1
    assert n == 600 * 4


def test_articles_short_with_related_entities():
    world = World(SyntheticConfig(n_entities=600))
    for i in range(world.n):
        e, d = world.entity(i), world.document(i)
        words = len(d.text.split())
        assert 45 <= words <= 140, (words, d.text)
        assert 2 <= d.text.count("\n\n") + 1 <= 3
        assert e.title in d.text
        # every attribute is stated; entity-valued ones name an entity of the right type
        for name, value in e.attrs.items():
            assert value.text in d.text
            if RELATIONS[name].kind == "entity":
                assert world.type_of(value.ref) == RELATIONS[name].target and value.ref != i
                assert value.text == world.title(value.ref)
        others = [world.entity(v.ref) for v in e.attrs.values() if v.ref is not None]
        # some fact about a related entity beyond its name (a distractor) appears in the article
        assert any(v.text in d.text for o in others for v in o.attrs.values() if v.ref != i)


def test_streaming_a_million_entities():
    cfg = SyntheticConfig(n_entities=1_000_000)
    t0 = time.perf_counter()
    world = World(cfg)
    doc = world.document(999_999)
    first = next(iter_documents(cfg))
    q = next(iter_questions(cfg))
    assert time.perf_counter() - t0 < 2.0
    assert doc.id == "syn-0999999" and doc.title in doc.text
    assert first.id == "syn-0000000" and q.gold_doc_id == "syn-0000000"
    with pytest.raises(IndexError):
        world.document(1_000_000)


def test_default_world_size_and_majority_baseline():
    cfg = SyntheticConfig()  # the default world of configs/default.yaml
    qs = list(iter_questions(cfg))
    test = [q for q in qs if q.split == "test"]
    assert len(test) >= 500
    assert {t.name for t in TYPES} == {World(cfg).type_of(i) for i in range(12)}
    majority = majority_answers(q for q in qs if q.split == "train")
    assert set(majority) == {q.relation for q in qs}
    em = sum(q.answers[0] == majority[q.relation] for q in test) / len(test)
    assert em < 0.05


def test_majority_answers_ties_and_counts():
    from data_prep.records import QAExample

    ex = [
        QAExample(str(i), "q", [a], relation=r)
        for i, (r, a) in enumerate([("x", "b"), ("x", "a"), ("x", "b"), ("y", "z"), ("y", "c")])
    ]
    assert majority_answers(ex) == {"x": "b", "y": "c"}


def test_write_world_files_atomic_and_cached(tmp_path):
    corpus, qa = write_world(SMALL, tmp_path / "w", seed=0)
    docs = [json.loads(line) for line in corpus.read_text().splitlines()]
    rows = [json.loads(line) for line in qa.read_text().splitlines()]
    assert len(docs) == SMALL.n_entities and set(docs[0]) == {"id", "title", "text"}
    assert set(rows[0]) == {"id", "question", "answers", "gold_doc_id", "relation"}
    assert len(rows) == SMALL.n_entities * SMALL.questions_per_entity
    files = sorted(p.name for p in (tmp_path / "w").iterdir())  # no temporary file left behind
    assert files == ["corpus.jsonl", "qa.jsonl", "synthetic.json"]
    # same parameters: nothing is rewritten
    before = (corpus.stat().st_mtime_ns, qa.stat().st_mtime_ns)
    write_world(SMALL, tmp_path / "w", seed=0)
    assert (corpus.stat().st_mtime_ns, qa.stat().st_mtime_ns) == before
    # other parameters: regenerated, and the question split/templates follow the new split seed
    write_world(SMALL, tmp_path / "w", seed=1)
    assert qa.read_text() != "\n".join(json.dumps(r) for r in rows) + "\n"
    assert json.loads((tmp_path / "w" / "synthetic.json").read_text())["params"]["split_seed"] == 1


def test_bad_config_is_a_user_error():
    with pytest.raises(UserError, match="n_entities"):
        World(SyntheticConfig(n_entities=5))
    with pytest.raises(UserError, match="name_variants"):
        World(SyntheticConfig(name_variants=0))
    with pytest.raises(UserError, match="questions_per_entity"):
        World(SyntheticConfig(questions_per_entity=0))


@pytest.mark.slow
def test_off_the_shelf_retrieval_is_hard_but_not_hopeless():
    """The embedded MiniLM, exact search over whole articles: the near-duplicate names keep top-5 low."""
    from configs.loader import load_config
    from retriever.synthetic_eval import world_stats_with_retrieval

    cfg = load_config(None, ["data.synthetic.n_entities=432"])  # 6 clusters of 12 x 6 names
    stats = world_stats_with_retrieval(cfg, ks=(1, 5))
    top5 = stats["retrieval"]["top5_accuracy"]
    assert 0.5 <= top5 <= 0.92, stats["retrieval"]
    assert stats["retrieval"]["top1_accuracy"] < top5
    assert stats["majority_baseline_em"]["test"] < 0.05
    assert 60 <= stats["words_per_article"]["mean"] <= 130
    assert stats["lm_tokens_per_article"]["max"] <= 288


def test_stats_retrieval_flag_names_its_new_command():
    """Off-the-shelf retrieval needs the retriever, a floor above data_prep: the flag says where it went."""
    from data_prep.synthetic import main

    with pytest.raises(UserError, match=r"python -m retriever\.synthetic_eval"):
        main(["--stats", "--retrieval"])
