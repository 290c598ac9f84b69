"""Build the segment store: corpus + QA set → run_dir/store/ (segments.arrow, qa.jsonl, manifest.json).

Reads `data.corpus` and `data.qa` (a .jsonl file, a SQuAD .json file, `synthetic`, `nq[:<split>]`,
`dpr:<psgs_w100.tsv>` for the corpus, `nq_open[:<split>]` for questions), cuts every document into
windows of `data.window` tokens of the retriever's tokenizer (`retriever.model`), title included, with
`data.stride` tokens of OVERLAP between consecutive windows, in `data.num_workers` processes (0 = all
cores), and writes the store atomically (a crash leaves the previous store, or none, never half of one).
Each QA example gets its split from its article's title (the one split rule, data_prep/split.py, with the
top-level `seed`, `data.dev_fraction`, `data.test_fraction`; NQ-open questions, which have no article,
keep their official split: train → train, validation → test) and the ids of its gold segments: the
segments of its gold document that contain one of its answers (case- and whitespace-insensitive).

`synthetic` first writes the generated world to run_dir/data/{corpus,qa}.jsonl (data.synthetic.*).
If the store already exists and was built from the same inputs (file hashes, tokenizer, window, stride,
split settings), the build is skipped; `--force` rebuilds anyway.

Bad input: `data.on_bad_line=error` stops at the first malformed line or duplicate id with file:line;
`skip` skips and counts them. Non-UTF-8 bytes are replaced (and counted), empty documents skipped (and
counted): see `counts` in run_dir/store/manifest.json and the summary printed at the end. Refused before
anything is written: a corpus without documents (or without any text), and a `data.window` the retriever
cannot read whole (window + [CLS]/[SEP] + `retriever.passage_prefix` must fit `retriever.max_seq_length`
and the encoder's positions). Temp folders left by a killed build (run_dir/.store.tmp-PID-*) are removed
by the next one once process PID is gone.

examples:
  python -m data_prep.build --config configs/default.yaml
  python -m data_prep.build -c configs/default.yaml data.corpus=wiki.jsonl data.qa=qa.jsonl run_dir=runs/wiki
  python -m data_prep.build data.corpus=train-v2.0.json data.qa=train-v2.0.json run_dir=runs/squad --force
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.atomic import clean_leftovers, fingerprint
from common.errors import UserError
from common.faults import fault_point
from configs.cli import build_parser, parse, run_main
from configs.schema import Config
from configs.window import check_window_fits_encoder
from data_prep.loaders import BadInput, LoadStats, Source, iter_documents, parse_source, read_qa
from data_prep.records import QAExample, Segment
from data_prep.segment import (
    Segmenter,
    encoder_positions,
    gold_positions,
    iter_segmented,
    normalize_for_match,
    resolve_workers,
)
from data_prep.split import split_of
from data_prep.store import FORMAT_VERSION, MANIFEST_FILE, SegmentStore, StoreWriter, verify_qa

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    store_dir: Path
    skipped: bool
    manifest: dict
    seconds: float = 0.0
    segments_per_second: float = 0.0
    peak_rss_mb: dict[str, float] = field(default_factory=dict)


def resolve_sources(cfg: Config) -> tuple[Source, Source]:
    """Parse data.corpus / data.qa; `synthetic` is generated into run_dir/data first."""
    corpus_spec, qa_spec = cfg.data.corpus, cfg.data.qa
    if "synthetic" in (corpus_spec, qa_spec):
        from data_prep.synthetic import write_world

        corpus_path, qa_path = write_world(
            cfg.data.synthetic,
            Path(cfg.run_dir) / "data",
            seed=cfg.seed,
            dev_fraction=cfg.data.dev_fraction,
            test_fraction=cfg.data.test_fraction,
        )
        corpus_spec = str(corpus_path) if corpus_spec == "synthetic" else corpus_spec
        qa_spec = str(qa_path) if qa_spec == "synthetic" else qa_spec
    return parse_source(corpus_spec, "corpus"), parse_source(qa_spec, "qa")


def _check_window(cfg: Config, segmenter: Segmenter) -> None:
    """The retriever must read every segment whole: window + [CLS]/[SEP] + passage prefix within its limit.

    The limit is retriever.max_seq_length, capped by the encoder's positions when its folder is on disk
    (as the encoder's load caps it); `python -m retriever.index` checks again with the loaded encoder.
    """
    prefix = cfg.retriever.passage_prefix
    prefix_tokens = len(segmenter.tok.encode(prefix, add_special_tokens=False).ids) if prefix else 0
    limit, limit_from = cfg.retriever.max_seq_length, "retriever.max_seq_length"
    positions = encoder_positions(cfg.retriever.model)
    if positions is not None and positions < limit:
        limit, limit_from = positions, f"the positions of encoder {cfg.retriever.model}"
    check_window_fits_encoder(cfg.data.window, limit, prefix_tokens, limit_from=limit_from)


@contextlib.contextmanager
def _undo_new_folders(folder: Path):
    """A refused build leaves no trace: the (empty) folders it created for the store are removed again."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        yield
    except UserError:
        for p in missing:  # deepest first; a folder something else wrote into stays
            try:
                p.rmdir()
            except OSError:
                break
        raise


def _empty_corpus_message(src: Source, stats: LoadStats) -> str:
    dropped = {k: v for k, v in stats.counts().items() if isinstance(v, int) and v}
    why = f" ({', '.join(f'{k}={v}' for k, v in sorted(dropped.items()))})" if dropped else ""
    return (
        f"the corpus {src.spec} has no documents{why}; nothing was written. Give data.corpus a file with "
        'documents, e.g. a JSONL file of {"id", "title", "text"} objects, one a line'
    )


def _peak_rss_mb() -> dict[str, float]:
    # ru_maxrss is in KiB on Linux; RUSAGE_CHILDREN reports the largest finished child, not a sum.
    return {
        "main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "largest_worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def _existing_build_key(store_dir: Path) -> str | None:
    if not (store_dir / MANIFEST_FILE).is_file():
        return None
    try:
        manifest = SegmentStore.open(store_dir).manifest
        verify_qa(store_dir, manifest)
    except UserError as err:
        log.warning("rebuilding the store: %s", err)
        return None  # a broken or damaged store is rebuilt
    if "files_sha256" not in manifest:
        log.info("rebuilding the store %s: it was built before file hashes were recorded", store_dir)
        return None
    return manifest.get("build_key")


def finalize_qa(
    records: list[tuple[str, QAExample]],
    doc_index: dict[str, tuple[str, int, int]],
    view: SegmentStore,
    cfg: Config,
    bad: BadInput,
    counts: dict,
) -> list[QAExample]:
    """Set title, split and gold_segment_ids of every QA example (see the module docstring)."""
    out = []
    cached: tuple[str, list[str]] = ("", [])  # questions of one document tend to be consecutive
    for where, ex in records:
        title, gold = None, []
        if ex.gold_doc_id is not None:
            entry = doc_index.get(ex.gold_doc_id)
            if entry is None:
                counts["qa_gold_doc_missing"] += 1
                if not (ex.title or "").strip():
                    bad(
                        where,
                        f"QA {ex.id!r}: gold_doc_id {ex.gold_doc_id!r} is not in the corpus (or was skipped)",
                    )
                    continue
            else:
                title, first, n = entry
                if cached[0] != ex.gold_doc_id:
                    cached = (ex.gold_doc_id, [normalize_for_match(t) for t in view.texts(first, first + n)])
                gold = [first + i for i in gold_positions(cached[1], ex.answers, normalized=True)]
        title = title if title is not None else ex.title
        if title is not None and title.strip():
            split = split_of(title, cfg.seed, cfg.data.dev_fraction, cfg.data.test_fraction)
        elif ex.split is not None:
            split = ex.split  # preset by a loader whose questions have no article (nq_open)
        else:
            bad(where, f"QA {ex.id!r}: no gold document and no title to split it by")
            continue
        ex.title, ex.split, ex.gold_segment_ids = title, split, gold
        out.append(ex)
    return out


def build_store(cfg: Config, force: bool = False, progress: bool = True) -> BuildResult:
    """Build (or reuse) run_dir/store for `cfg`; see the module docstring."""
    from tqdm import tqdm

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    store_dir = Path(cfg.run_dir) / "store"
    removed = clean_leftovers(store_dir)  # also when this build turns out to be skipped
    if removed:
        log.info("removed %d temp folder(s) of a killed build: %s", len(removed), ", ".join(p.name for p in removed))
    corpus_src, qa_src = resolve_sources(cfg)
    segmenter = Segmenter.from_model(cfg.retriever.model, cfg.data.window, cfg.data.stride)
    _check_window(cfg, segmenter)
    inputs = {
        "format_version": FORMAT_VERSION,
        "corpus": corpus_src.fingerprint(),
        "qa": qa_src.fingerprint(),
        "tokenizer": segmenter.tokenizer_fingerprint,
        "window": cfg.data.window,
        "stride": cfg.data.stride,
        "split_rule": {"seed": cfg.seed, "dev": cfg.data.dev_fraction, "test": cfg.data.test_fraction},
        "on_bad_line": cfg.data.on_bad_line,
    }
    if corpus_src.kind in ("nq", "nq_open") or qa_src.kind in ("nq", "nq_open"):
        inputs["hf_datasets"] = [cfg.data.nq_dataset, cfg.data.nq_open_dataset]
    build_key = fingerprint(inputs)
    if not force and _existing_build_key(store_dir) == build_key:
        store = SegmentStore.open(store_dir)
        return BuildResult(store_dir, True, store.manifest)

    t0 = time.perf_counter()
    stats = LoadStats()
    bad = BadInput(cfg.data.on_bad_line, stats)
    # QA first when it is a separate source, so only its gold documents are indexed (bounded memory).
    # An NQ corpus with NQ questions is read once: the QA examples arrive with their passages.
    one_pass = corpus_src.kind == "nq" and qa_src == corpus_src
    qa_records: list[tuple[str, QAExample]] = []
    if one_pass:
        from data_prep import nq

        docs = (d for _, d in nq.nq_documents(corpus_src.split, cfg.data, stats, qa_out=qa_records))
        wanted = None
    else:
        qa_records = read_qa(qa_src, cfg.data.on_bad_line, stats, cfg.data)
        wanted = {ex.gold_doc_id for _, ex in qa_records if ex.gold_doc_id is not None}
        docs = iter_documents(corpus_src, cfg.data.on_bad_line, stats, cfg.data)

    # Nothing is written for a corpus without documents: the first one is read before the store is opened.
    first_doc = next(iter(docs), None)
    if first_doc is None:
        raise UserError(_empty_corpus_message(corpus_src, stats))
    docs = itertools.chain([first_doc], docs)

    counts = {"zero_token_documents_skipped": 0, "long_titles": 0, "qa_gold_doc_missing": 0}
    doc_index: dict[str, tuple[str, int, int]] = {}  # gold doc id -> (title, first segment id, n segments)
    workers = resolve_workers(cfg.data.num_workers)
    use_bytes = corpus_src.kind == "jsonl"
    bar = tqdm(
        total=corpus_src.path.stat().st_size if use_bytes else None,
        unit="B" if use_bytes else " docs",
        unit_scale=use_bytes,
        desc="segmenting",
        disable=not progress,
    )
    n_docs, last_bytes = 0, stats.bytes_read  # bytes of the QA file, read above, are not corpus progress
    manifest_extra = {
        "builder": "data_prep.build",
        "build_key": build_key,
        "inputs": inputs,
        "source": {"corpus": cfg.data.corpus, "qa": cfg.data.qa},
        "tokenizer": {"model": cfg.retriever.model, "fingerprint": segmenter.tokenizer_fingerprint},
        "window": cfg.data.window,
        "stride": cfg.data.stride,
        "stride_meaning": "overlap in tokens between consecutive windows; title tokens count inside window",
        "split_rule": inputs["split_rule"],
    }
    with _undo_new_folders(store_dir.parent), StoreWriter(store_dir, manifest_extra=manifest_extra) as writer:
        seg_id = 0
        t_seg = time.perf_counter()  # segments/s covers reading + tokenizing + writing the corpus
        for doc, spans, title_len in iter_segmented(docs, segmenter, workers, cfg.data.chunk_docs):
            n_docs += 1
            if len(spans) == 0:
                counts["zero_token_documents_skipped"] += 1  # text of only whitespace/control characters
                continue
            counts["long_titles"] += title_len > cfg.data.window - segmenter.min_budget
            first = seg_id
            text, title = doc.text, doc.title
            for cs, ce, ts, te in spans.tolist():
                writer.add(Segment(seg_id, doc.id, title, text[cs:ce], cs, ce, ts, te))
                seg_id += 1
            if wanted is None or doc.id in wanted:
                doc_index[doc.id] = (title, first, seg_id - first)
            fault_point("build.document")
            if n_docs % 1000 == 0:
                _advance(bar, use_bytes, stats, n_docs, seg_id, last_bytes)
                last_bytes = stats.bytes_read
        _advance(bar, use_bytes, stats, n_docs, seg_id, last_bytes)
        bar.close()
        if seg_id == 0:  # raised inside the writer: its temp folder is deleted, the old store stays
            raise UserError(
                f"no document of the corpus {corpus_src.spec} has any text to segment ({n_docs} document(s), "
                "all of only whitespace or control characters); nothing was written"
            )
        seg_seconds = time.perf_counter() - t_seg
        view = writer.close_segments()
        t_qa = time.perf_counter()
        qa = finalize_qa(qa_records, doc_index, view, cfg, bad, counts)
        writer.add_qa(qa)
        counts.update(stats.counts())
        counts["documents_read"] = n_docs
        writer.manifest_extra["counts"] = counts
        writer.manifest_extra["build_seconds"] = round(time.perf_counter() - t0, 2)
        writer.manifest_extra["seconds"] = {
            "qa_read": round(t_seg - t0, 2),
            "segmentation": round(seg_seconds, 2),
            "gold_and_splits": round(time.perf_counter() - t_qa, 2),
        }
        writer.manifest_extra["segments_per_second"] = round(seg_id / max(seg_seconds, 1e-9), 1)
        writer.manifest_extra["num_workers"] = workers
    return BuildResult(
        store_dir,
        False,
        writer.manifest,
        seconds=time.perf_counter() - t0,
        segments_per_second=seg_id / max(seg_seconds, 1e-9),
        peak_rss_mb=_peak_rss_mb(),
    )


def _advance(bar, use_bytes: bool, stats: LoadStats, n_docs: int, n_segs: int, last_bytes: int) -> None:
    bar.update(stats.bytes_read - last_bytes if use_bytes else n_docs - bar.n)
    bar.set_postfix(docs=n_docs, segments=n_segs, refresh=False)


def summary(result: BuildResult) -> str:
    m = result.manifest
    c = m["counts"]
    lines = [
        f"store: {result.store_dir}  (fingerprint {m['fingerprint']})",
        f"  documents {c['documents']}  segments {c['segments']}  window {m.get('window')} "
        f"stride {m.get('stride')} (overlap)  tokenizer {m.get('tokenizer', {}).get('model')}",
        f"  qa {c['qa']} {c['qa_per_split']}  without gold segment {c['qa_without_gold_segment']}",
    ]
    skipped = {
        k: v
        for k, v in c.items()
        if k.endswith(("_skipped", "_missing", "non_utf8_lines", "long_titles")) and v
    }
    skipped.update({f"qa_skipped.{k}": v for k, v in c.get("qa_skipped", {}).items()})
    if skipped:
        lines.append("  skipped/repaired: " + ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())))
    if not result.skipped:
        lines.append(
            f"  built in {result.seconds:.1f} s, {result.segments_per_second:,.0f} segments/s; peak RSS "
            f"{result.peak_rss_mb['main']:.0f} MiB main, "
            f"{result.peak_rss_mb['largest_worker']:.0f} MiB per worker"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser("python -m data_prep.build", __doc__)
    parser.add_argument("--force", action="store_true", help="rebuild even if an identical store exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    cfg, ns = parse(parser, argv)
    result = build_store(cfg, force=ns.force, progress=not ns.no_progress)
    if result.skipped:
        print(
            f"an identical store already exists at {result.store_dir} (same inputs); use --force to rebuild"
        )
    print(summary(result))
    return 0


if __name__ == "__main__":
    run_main(main)
