"""Fit the `qa.rerank=reader` probe of a trained system on questions with gold answers.

    python -m qa.fit_reranker --config configs/squad-ship.yaml qa.mode=dynamic_prefix@pfull \\
        data.split=train --questions 1600

For each question it retrieves `retriever.top_k` segments (5 when top_k is 1), reads each alone with the system
(`qa.checkpoint`, else the default checkpoint) and takes the reader's features (qa/reader_rerank.py); a segment
is positive when it holds an answer string. The probe is fitted listwise and written (atomically) to
<checkpoint>/<system>/reranker.safetensors, or to `--out`. Questions are a seeded random sample of
`data.split`; fit on train or dev questions and keep the test split for evaluation (`eval.run qa.rerank=reader`).
Prints the share of questions whose top segment holds an answer before and after reranking, on the fitted
questions (optimistic) and, with `--holdout F`, on a held-out share F of them fitted without.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tqdm import tqdm

from common.answers import has_answer
from common.atomic import atomic_write_json, sha256_file
from common.errors import UserError
from configs.cli import build_parser, parse, run_main
from data_prep.store import load_qa
from qa.checkpoint import MANIFEST, read_manifest
from qa.reader_rerank import RERANKER_FILE, fit_reranker, lm_key, probe_layers, reader_features, top1_accuracy
from qa.system import QASystem, default_checkpoint
from qa.systems import SystemName, parse_system


def collect(qa: QASystem, system: SystemName, examples, k: int, layers: list[int], batch_size: int,
            progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (Q, k, F) and labels (Q, k) of questions that got k hits."""
    model = qa.model_for(system)
    feats, labels = [], []
    for start in tqdm(range(0, len(examples), batch_size), desc="reading segments", disable=not progress):
        chunk = examples[start:start + batch_size]
        hits = qa.retrieve([e.question for e in chunk], k)
        for ex, hs in zip(chunk, hits):
            if len(hs) < k:
                continue
            batch, prefix = qa.prepare(system, model, [_example(ex.question, h) for h in hs])
            feats.append(reader_features(qa.lm, batch.input_ids, batch.attention_mask, prefix, layers,
                                         torch.tensor([h.score for h in hs]), torch.arange(k)))
            labels.append(torch.tensor([has_answer(f"{h.title}\n{h.text}", ex.answers) for h in hs]))
    if not feats:
        raise UserError(f"no question got {k} retrieved segments; is the index built?")
    return torch.stack(feats), torch.stack(labels)


def _example(question: str, hit):
    from lm.prompting import TextSegment
    from qa.batching import Example

    return Example(question, [TextSegment(hit.title, hit.text)], [hit.segment_id])


def main(argv=None) -> int:
    parser = build_parser("python -m qa.fit_reranker", __doc__)
    parser.add_argument("--questions", type=int, default=1600, help="questions sampled from data.split (default 1600)")
    parser.add_argument("--l2", type=float, default=1.0, help="L2 weight on the standardised probe weights "
                        "(default 1.0: a reader's own training questions are memorised, and a weak L2 learns that)")
    parser.add_argument("--holdout", type=float, default=0.0, help="share of the questions held out to report "
                        "top-1 on (default 0: fit on all)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the probe (default: "
                        "<checkpoint>/<system>/reranker.safetensors)")
    cfg, ns = parse(parser, argv)
    system = parse_system(cfg.qa.mode)
    if not system.trainable or not system.kind.retrieves:
        raise UserError(f"qa.mode={cfg.qa.mode}: the reranker probes a trained system that retrieves")
    k = cfg.retriever.top_k if cfg.retriever.top_k > 1 else 5
    if not 0 <= ns.holdout < 1:
        raise UserError(f"--holdout must be in [0, 1), got {ns.holdout}")
    examples = [e for e in load_qa(Path(cfg.run_dir) / "store", cfg.data.split) if any(a.strip() for a in e.answers)]
    if not examples:
        raise UserError(f"{cfg.run_dir}/store has no `{cfg.data.split}` questions with answers to fit on")
    random.Random(cfg.seed).shuffle(examples)
    examples = examples[: ns.questions]
    qa = QASystem.from_config(cfg, [str(system)])
    layers = probe_layers(qa.lm.config.num_hidden_layers)
    feats, labels = collect(qa, system, examples, k, layers, cfg.eval.batch_size)
    cut = int(len(feats) * (1 - ns.holdout))
    directory = Path(cfg.qa.checkpoint) if cfg.qa.checkpoint else default_checkpoint(cfg)
    name = qa.model_names[str(SystemName(system.base, system.tag))]
    meta = {"system": name, "lm_fingerprint": lm_key(qa.lm.config), "split": cfg.data.split, "k": k, "l2": ns.l2,
            "retriever": cfg.retriever.model, "hybrid": cfg.retriever.hybrid.enabled}
    reranker = fit_reranker(feats[:cut], labels[:cut], layers, ns.l2, meta=meta)
    fitted = reranker.score(feats[:cut].reshape(-1, feats.shape[-1])).reshape(cut, k)
    print(f"{cut} fitted questions: top-1 holds an answer {labels[:cut, 0].float().mean():.3f} retrieved, "
          f"{top1_accuracy(fitted, labels[:cut]):.3f} reranked (on the questions it was fitted on)")
    if cut < len(feats):
        held = reranker.score(feats[cut:].reshape(-1, feats.shape[-1])).reshape(-1, k)
        print(f"{len(feats) - cut} held-out questions: top-1 {labels[cut:, 0].float().mean():.3f} retrieved, "
              f"{top1_accuracy(held, labels[cut:]):.3f} reranked")
    out = ns.out or directory / name / RERANKER_FILE
    reranker.save(out)
    if ns.out is None:  # the checkpoint's manifest records the probe, so a damaged or replaced one is refused
        manifest = read_manifest(directory)
        info = manifest["systems"][name]
        info.setdefault("sha256", {})[RERANKER_FILE] = sha256_file(out)
        info["reranker"] = {**reranker.meta, "fitted_top1": {"retrieved": float(labels[:cut, 0].float().mean()),
                                                             "reranked": top1_accuracy(fitted, labels[:cut])}}
        atomic_write_json(directory / MANIFEST, manifest)
    print(f"reranker: {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
