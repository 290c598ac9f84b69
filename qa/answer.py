"""Answer questions with a trained checkpoint; prints each answer and its sources.

    python -m qa.answer --config configs/default.yaml "Who founded Ridelis Industries?"
    python -m qa.answer --config C qa.mode=rag_text retriever.top_k=3 "question one" "question two"
    python -m qa.answer --config C --file questions.jsonl --out answers.jsonl

Questions come as arguments or from a JSONL file of `{"id"?, "question"}` rows (no gold answers needed).
The mode is `qa.mode` (closed_book and rag_text need no checkpoint); the checkpoint is `qa.checkpoint`, else
run_dir/checkpoints/final when a run trained one, else the shipped model (models/smollm2-135m-squad, for the
embedded LM only); retrieval uses run_dir's index and `retriever.model`, or a running retrieval service
with `retriever.service_url=http://HOST:PORT` (`python -m retriever.serve`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common.atomic import atomic_write_text
from common.errors import UserError
from configs.cli import build_parser, parse, run_main
from lm.prompting import check_question
from qa.system import QASystem


def read_questions(path: Path) -> list[dict]:
    rows = []
    try:
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e}") from e
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict) or not isinstance(row.get("question"), str):
            raise UserError(f'{path}:{number}: expected an object with a "question" string')
        rows.append({"id": str(row.get("id", number)), "question": row["question"], "where": f"{path}:{number}"})
    if not rows:
        raise UserError(f"{path} holds no questions")
    return rows


def main(argv=None) -> int:
    parser = build_parser("python -m qa.answer", __doc__)
    parser.add_argument("--file", type=Path, help="JSONL file of questions ({\"id\"?, \"question\"} per line)")
    parser.add_argument("--out", type=Path, help="write predictions as JSONL here instead of printing them")
    cfg, ns = parse(parser, argv, positional=True)
    rows = [{"id": str(i), "question": q} for i, q in enumerate(ns.args, 1)]
    if ns.file:
        rows += read_questions(ns.file)
    if not rows:
        raise UserError('give questions as arguments (quoted) or --file questions.jsonl')
    for row in rows:  # every question is checked before a model is loaded
        where = f"{row['where']}: " if "where" in row else f"question {row['id']}: "
        check_question(row["question"], cfg.lm.max_question_chars, where)
    qa = QASystem.from_config(cfg, systems=[cfg.qa.mode])
    predictions = qa.answer([r["question"] for r in rows], mode=cfg.qa.mode)
    out_rows = []
    for row, p in zip(rows, predictions):
        out_rows.append({
            "id": row["id"], "question": p.question, "prediction": p.prediction, "mode": p.mode,
            "retrieved": [{"segment_id": h.segment_id, "score": round(h.score, 4), "title": h.title} for h in p.retrieved],
            "latency_ms": round(p.latency_ms, 1),
        })
    if ns.out:
        atomic_write_text(ns.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out_rows))
        print(f"wrote {len(out_rows)} predictions to {ns.out}")
        return 0
    for r in out_rows:
        print(f"Q: {r['question']}\nA: {r['prediction']}   [{r['mode']}, {r['latency_ms']:.0f} ms]")
        for h in r["retrieved"]:
            print(f"   source: {h['title']} (segment {h['segment_id']}, score {h['score']:.3f})")
        print()
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    run_main(main)
