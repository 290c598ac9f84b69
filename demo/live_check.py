"""Acceptance check of live additions: new documents are answerable right after they are added.

    python -m demo.live_check --config C [--n 20] [--modes rag_text,dynamic_prefix] [--world-seed 7]
                              [--top-k K] [key=value ...]

Makes `--n` articles of a NEW synthetic world (another world seed: entities and facts that neither the
index nor the LM has seen), adds them to the live index through the demo's service (what "Add
documents" does), asks one question per article (held-out test templates) in each mode and prints per
mode: how often the new article is the top source, exact match and contains. The documents it added
are removed again at the end; other live documents are left as they were.
"""

from __future__ import annotations

import dataclasses
import json

from common.errors import UserError
from configs.cli import build_parser, parse, run_main
from data_prep.records import Document


def new_facts(synthetic_cfg, n: int, world_seed: int) -> list[tuple[Document, str, list[str]]]:
    """(document, question, answers) for the first n entities of a world made with `world_seed`."""
    from data_prep.synthetic import MIN_ENTITIES, World

    world = World(dataclasses.replace(synthetic_cfg, seed=world_seed, n_entities=max(n, MIN_ENTITIES)))
    out = []
    for i in range(n):
        doc = world.document(i)
        example, _ = next(iter(world.questions(world.entity(i), "test")))
        out.append(
            (Document(f"live-check-{world_seed}-{i}", doc.title, doc.text), example.question, example.answers)
        )
    return out


def run(service, n: int, modes: list[str], world_seed: int, top_k: int | None) -> dict:
    from common.answers import exact_match
    from eval.metrics import contains_answer

    facts = new_facts(service.cfg.data.synthetic, n, world_seed)
    ids = [doc.id for doc, _, _ in facts]
    # A check that crashed before its cleanup left its documents live: take them out before adding again.
    leftover = [i for i in ids if i in set(service.retriever.live_documents)]
    if leftover:
        service.retriever.remove_documents(leftover)
    had_live = bool(service.retriever.live_documents)
    service.retriever.add_documents([doc for doc, _, _ in facts])
    results = {}
    try:
        for mode in modes:
            top1 = em = contains = 0.0
            examples = []
            for doc, question, answers in facts:
                final = service.answer(question, mode, top_k)
                found = bool(final.sources) and final.sources[0].doc_id == doc.id
                ok = max(exact_match(final.text, a) for a in answers)
                top1, em, contains = top1 + found, em + ok, contains + contains_answer(final.text, answers)
                examples.append(
                    {"question": question, "answers": answers, "prediction": final.text, "top1": found}
                )
            results[mode] = {
                "n": n,
                "top1_is_new_doc": top1 / n,
                "em": em / n,
                "contains": contains / n,
                "examples": examples[:5],
            }
    finally:
        if had_live:
            service.retriever.remove_documents(ids)
        else:
            service.retriever.reset()  # leaves run_dir as it was: no live/ folder
    return results


def main(argv=None) -> int:
    parser = build_parser("python -m demo.live_check", __doc__)
    parser.add_argument("--n", type=int, default=20, help="new articles added and asked about")
    parser.add_argument("--modes", default="rag_text,dynamic_prefix", help="comma list of modes")
    parser.add_argument(
        "--world-seed", type=int, default=7, help="seed of the new world (not data.synthetic.seed)"
    )
    parser.add_argument("--top-k", type=int, default=None, help="top-k (default: retriever.top_k)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    cfg, ns = parse(parser, argv)
    if ns.world_seed == cfg.data.synthetic.seed:
        raise UserError(
            "--world-seed must differ from data.synthetic.seed: the facts must be new to the index"
        )
    if ns.n < 1:
        raise UserError(f"--n must be >= 1, got {ns.n}")
    from demo.service import DemoService

    service = DemoService.from_config(cfg)
    modes = [m.strip() for m in ns.modes.split(",") if m.strip()]
    missing = [m for m in modes if m not in service.modes]
    if missing:
        raise UserError(f"modes {missing} are not served; available: {', '.join(service.modes)}")
    results = run(service, ns.n, modes, ns.world_seed, ns.top_k)
    print(f"{ns.n} new articles (world seed {ns.world_seed}), added live and asked at once:")
    print(f"{'mode':<22} {'top-1 = new doc':>16} {'EM':>6} {'contains':>9}")
    for mode, r in results.items():
        print(f"{mode:<22} {r['top1_is_new_doc']:>16.2f} {r['em']:>6.2f} {r['contains']:>9.2f}")
    if ns.json:
        from common.atomic import atomic_write_json

        atomic_write_json(ns.json, results)
    for mode, r in results.items():
        print(f"\n{mode}: " + json.dumps(r["examples"][:2], ensure_ascii=False))
    return 0


if __name__ == "__main__":
    run_main(main)
