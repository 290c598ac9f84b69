"""qa.rerank=reader: the probe's fit, file and refusal, and answering from the best-scored segment."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from common.errors import UserError
from qa.reader_rerank import ReaderReranker, fit_reranker, probe_layers, top1_accuracy

pytestmark = pytest.mark.usefixtures("one_thread")


def test_probe_layers_are_evenly_spaced_and_end_at_the_last_layer():
    assert probe_layers(30) == [6, 12, 18, 24, 30]
    assert probe_layers(2) == [0, 1, 2]  # fewer layers than probes: no duplicates


def test_fit_learns_which_feature_marks_the_answering_segment():
    torch.manual_seed(0)
    q, k, f = 200, 5, 6
    feats = torch.randn(q, k, f)
    gold = torch.randint(0, k, (q,))
    labels = torch.zeros(q, k, dtype=torch.bool)
    labels[torch.arange(q), gold] = True
    feats[torch.arange(q), gold, 2] += 3.0  # feature 2 marks the segment that answers
    labels[:10] = False  # questions without an answering segment are left out of the fit
    reranker = fit_reranker(feats[:150], labels[:150], [1], l2=1e-3)
    assert reranker.meta["questions"] == 140
    scores = reranker.score(feats[150:].reshape(-1, f)).reshape(-1, k)
    assert top1_accuracy(scores, labels[150:]) > 0.9
    assert int(reranker.weight.abs().argmax()) == 2


def test_fit_refuses_questions_without_any_answering_segment():
    with pytest.raises(UserError, match="nothing to fit"):
        fit_reranker(torch.randn(3, 5, 4), torch.zeros(3, 5, dtype=torch.bool), [1], l2=0.1)


def test_reranker_round_trips_and_refuses_another_lm_or_feature_width(tmp_path):
    r = ReaderReranker([3, 6], torch.randn(4), torch.rand(4) + 0.5, torch.randn(4), {"lm_fingerprint": "abc"})
    path = tmp_path / "reranker.safetensors"
    r.save(path)
    back = ReaderReranker.load(path, "abc")
    x = torch.randn(7, 4)
    assert back.layers == [3, 6]
    assert torch.allclose(back.score(x), r.score(x))
    with pytest.raises(UserError, match="another LM"):
        ReaderReranker.load(path, "other")
    with pytest.raises(UserError, match="expects 4 features"):
        back.score(torch.randn(2, 5))


@pytest.mark.slow
def test_rerank_reads_the_best_scored_segment_alone(tmp_path, smol_tokenizer):
    from lm.prompting import PromptTemplate
    from qa.checkpoint import new_model, save_checkpoint
    from qa.fit_reranker import main as fit_main
    from qa.reader_rerank import RERANKER_FILE
    from qa.system import QASystem
    from qa.systems import parse_system
    from tests.tiny_run import make_tiny_run, tiny_overrides

    cfg = make_tiny_run(tmp_path, smol_tokenizer)
    base = QASystem.from_config(cfg, systems=["rag_text"])
    lm, tok = base.lm, base.tokenizer
    name = "dynamic_prefix@pfull"
    ckpt = Path(cfg.run_dir) / "checkpoints" / "final"
    save_checkpoint(ckpt, {name: new_model(parse_system(name), cfg, lm, PromptTemplate(tok), None)}, cfg, lm.config)
    rerank_cfg = copy.deepcopy(cfg)
    rerank_cfg.qa.rerank = "reader"
    with pytest.raises(UserError, match="qa.fit_reranker"):  # no probe fitted yet: a clear refusal
        QASystem.from_config(rerank_cfg, systems=[name], lm=lm, tokenizer=tok, retriever=base.retriever)

    # A probe that only looks at the rank, preferring the lowest-ranked of three segments.
    features = lm.config.hidden_size * len(probe_layers(lm.config.num_hidden_layers)) + 3 + 5
    weight = torch.zeros(features)
    weight[-5:] = torch.tensor([0.0, 1.0, 2.0, 0.0, 0.0])
    probe = ReaderReranker(probe_layers(lm.config.num_hidden_layers), torch.zeros(features), torch.ones(features),
                           weight, {})
    probe.save(ckpt / name / RERANKER_FILE)
    reranked = QASystem.from_config(rerank_cfg, systems=[name], lm=lm, tokenizer=tok, retriever=base.retriever)
    single = QASystem.from_config(cfg, systems=[name], lm=lm, tokenizer=tok, retriever=base.retriever)
    questions = ["Who founded the company?", "Where is it?"]
    got = reranked.answer(questions, mode=name, top_k=3)
    top3 = single.answer(questions, mode=name, top_k=3)
    for p, plain in zip(got, top3):
        assert [h.segment_id for h in p.retrieved] == [plain.retrieved[i].segment_id for i in (2, 1, 0)]
        alone = single.answer([p.question], mode=name, hits=[[plain.retrieved[2]]])[0]
        assert p.prediction == alone.prediction  # read the third-ranked segment alone
        assert p.prefix_slots == alone.prefix_slots

    # The fitting command writes a probe the system then loads.
    argv = [*tiny_overrides(tmp_path), f"retriever.model={cfg.retriever.model}", f"qa.checkpoint={ckpt}",
            f"qa.mode={name}", "data.split=train", "retriever.top_k=3", "--questions", "6", "--l2", "0.1"]
    assert fit_main(argv) == 0
    fitted = ReaderReranker.load(ckpt / name / RERANKER_FILE)
    assert fitted.meta["system"] == name and fitted.meta["k"] == 3
    loaded = QASystem.from_config(rerank_cfg, systems=[name], lm=lm, tokenizer=tok, retriever=base.retriever)
    assert loaded.rerankers[name].meta["l2"] == 0.1
    probe.save(ckpt / name / RERANKER_FILE)  # replaced behind the manifest's back: refused
    with pytest.raises(UserError, match="sha256"):
        QASystem.from_config(rerank_cfg, systems=[name], lm=lm, tokenizer=tok, retriever=base.retriever)
