"""bench/: every section end to end on a tiny run (tiny random LM and encoder), plus the pieces whose
numbers the report relies on: index memory, shared coarse quantizer, FLOP counting, forced answer
length, peak-memory probes, and the runner's files."""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from bench import encoding, qa_latency, report, retrieval, size, training
from bench.machine import CpuSnapshot, machine_record, other_cpu_share
from bench.retrieval_scale import measure
from configs.loader import save_config
from retriever.faiss_index import FaissIndex, auto_nprobe
from tests.tiny_run import make_tiny_run


def _clustered(n=3000, d=16, centers=8, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d)).astype(np.float32) * 3
    x = c[rng.integers(centers, size=n)] + rng.standard_normal((n, d)).astype(np.float32) * 0.5
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol_tokenizer):
    root = tmp_path_factory.mktemp("bench")
    cfg = make_tiny_run(
        root,
        smol_tokenizer,
        overrides=(
            f"bench.work_dir={root / 'work'}",
            f"bench.out_dir={root / 'out'}",
            "bench.n_vectors=3000",
            "bench.n_queries=40",
            "bench.repeats=1",
            "bench.nprobe_values=[1,4,64]",
            "bench.mixture_components=4",
            "bench.encode_segments=4",
            "bench.encode_tokens=32",
            "bench.encode_batch_size=2",
            "bench.matmul_size=64",
            "bench.qa_questions=2",
            "bench.qa_warmup=1",
            "bench.qa_answer_tokens=3",
            "bench.qa_k_values=[1,2]",
            "bench.train_systems=[dynamic_prefix@p2,dynamic_prefix@pfull,rag_text_tuned]",
            "bench.train_steps=1",
            "bench.train_warmup=1",
            "bench.train_segment_tokens=64",
        ),
    )
    # Factory strings hold commas, so a list of them is given in YAML or, as here, in code.
    cfg.bench.compression = ["IVF{nlist},SQ8", "IVF{nlist},PQ8"]
    cfg.bench.ann_factories = ["HNSW32,Flat", "IVF{nlist}_HNSW32,Flat", "IVF{nlist},SQ8,Refine(Flat)"]
    cfg.bench.ann_ef_search_values = [16, 64]
    cfg.bench.ann_k_factors = [2.0]
    return cfg


def test_machine_record_and_peak_memory():
    m = machine_record()
    for key in (
        "cpu_model",
        "logical_cores",
        "physical_cores",
        "ram_gb",
        "versions",
        "date",
        "load_average_at_start",
    ):
        assert key in m
    assert m["versions"]["torch"] and m["versions"]["faiss-cpu"]


PEAK_PROBE = """
import copy
import json
import numpy as np
from bench.machine import PeakRSS
with PeakRSS() as mem:
    block = np.ones(64 * 2**20 // 8)  # 64 MB, touched
    del block
print(json.dumps(mem.as_dict()))
"""


def test_peak_memory_of_a_block_in_a_fresh_process():
    # A fresh process: in the test session's own process, file-backed pages (mapped model weights, stores) that
    # the kernel drops under memory pressure can shrink the RSS by more than the block adds (regression: CI saw
    # peak_over_before_mb 0.0 on a machine shared with training jobs).
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", PEAK_PROBE], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    d = json.loads(out.stdout.strip().splitlines()[-1])
    assert d["peak_rss_mb"] >= d["rss_before_mb"]
    if d["peak_is_per_phase"]:
        assert d["peak_over_before_mb"] > 50


def test_other_cpu_share_counts_only_other_processes():
    start = CpuSnapshot(wall=0.0, machine_busy=100.0, own=10.0)
    # 10 s on 2 cores: the machine was busy 12 s, 2 of them ours -> others used 10 of 20 core-seconds
    assert other_cpu_share(start, CpuSnapshot(wall=10.0, machine_busy=112.0, own=12.0), cores=2) == 0.5
    assert other_cpu_share(start, CpuSnapshot(wall=10.0, machine_busy=104.0, own=14.0), cores=2) == 0.0
    assert other_cpu_share(start, start, cores=2) is None


def test_other_cpu_share_sees_a_busy_process_beside_us():
    import subprocess
    import sys

    before = CpuSnapshot.take()
    busy = subprocess.Popen(
        [sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"]
    )
    time.sleep(2.0)
    share = other_cpu_share(before, CpuSnapshot.take())  # taken before the child is waited for
    busy.wait()
    cores = os.cpu_count() or 1
    assert share >= 0.4 / cores  # the child held one core for ~1.5 of the 2 s


def test_report_judges_sharing_by_cpu_time_not_the_load_average_at_start():
    # Regression: RESULTS.md called an idle run "shared" because the previous job's load average lingered.
    from bench.report import _sharing

    machine = {"load_average_at_start": [1.5, 1.0, 0.9], "logical_cores": 2}
    assert "shared" not in _sharing({"machine": machine, "other_cpu_share": 0.02})
    assert "shared" in _sharing({"machine": machine, "other_cpu_share": 0.6})
    assert "shared" in _sharing({"machine": machine})  # results from before the CPU-time measure


def test_index_bytes_matches_serialized_size():
    x = _clustered(n=1200)
    for factory in ("Flat", "IVF16,Flat", "IVF16,SQ8", "IVF16,PQ4", "HNSW16,Flat", "IVF16_HNSW8,Flat",
                    "IVF16,SQ8,Refine(Flat)", "IVF16,PQ4x4fs,RFlat"):
        index = FaissIndex.create(factory, 16, use_gpu="false")
        ivf = faiss.try_extract_index_ivf(index.cpu_index)
        if ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ):
            faiss.downcast_index(ivf).do_polysemous_training = False  # slow, and irrelevant to sizes
        index.train(x)
        index.add(x, np.arange(len(x)))
        real = len(faiss.serialize_index(index.cpu_index))
        assert abs(retrieval.index_bytes(index.cpu_index) - real) < 0.02 * real + 2048, factory


def test_compressed_codec_reuses_the_coarse_quantizer_and_recommendation():
    x, q = _clustered(n=4000), _clustered(n=60, seed=3)
    keep: dict = {}
    measure(x, q, nlist=16, nprobe_values=(1, 4, 16), repeats=1, single_queries=5, keep=keep)
    v = retrieval.compressed_variant(keep["index"], "IVF{nlist},SQ8", x, q, keep["truth"], (1, 16), repeats=1)
    assert v["factory"] == "IVF16,SQ8" and v["bytes_per_vector"] < 0.5 * 16 * 4 + 8 + 16
    # all lists probed: only the 8-bit codes separate it from exact search
    assert v["by_nprobe"][-1]["recall@10"] > 0.8
    rows = [
        {"nprobe": 1, "recall@10": 0.5},
        {"nprobe": 4, "recall@10": 0.96},
        {"nprobe": 16, "recall@10": 0.99},
    ]
    assert retrieval.recommend_nprobe(rows)["nprobe"] == 4
    assert retrieval.recommend_nprobe(rows[:1])["nprobe"] == 1  # goal out of reach: the most accurate


def test_best_row_is_the_fastest_setting_reaching_the_recall_goal():
    cands = [
        {"factory": "A", "rows": [{"params": {"nprobe": 4}, "recall@10": 0.99, "qps": 100.0}]},
        {"factory": "B", "rows": [
            {"params": {"ef_search": 16}, "recall@10": 0.90, "qps": 900.0},
            {"params": {"ef_search": 64}, "recall@10": 0.96, "qps": 400.0},
        ]},
    ]
    assert retrieval.best_row(cands, 10, 0.95) == {"factory": "B", "params": {"ef_search": 64}, "recall@10": 0.96,
                                                   "qps": 400.0}
    assert retrieval.best_row(cands, 10, 0.995) is None


def test_encoder_flop_count_matches_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import BertConfig, BertModel

    model = BertModel(
        BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            attn_implementation="eager",
        )
    ).eval()
    ids = torch.randint(5, 100, (3, 48))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    counted = counter.get_total_flops() / 3
    ours = encoding.encoder_flops_per_sequence(model, 48)
    assert abs(ours - counted) / counted < 0.02


def test_fixed_length_inputs_are_full_windows(smol_tokenizer, tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny.retriever.model)
    ids = encoding.fixed_length_inputs(tok, ["capital of kalo", "river vo"], rows=3, tokens=12)
    assert ids.shape == (3, 12)
    assert (ids[:, 0] == tok.cls_token_id).all() and (ids[:, -1] == tok.sep_token_id).all()
    assert encoding.matmul_peak_flops(torch.float32, 64, repeats=1) > 0


def test_retrieval_section(tiny):
    r = retrieval.run(tiny)
    assert r["scale"]["n_vectors"] == 3000 and r["scale"]["queries"] == "mixture samples"
    ivf = r["scale"]["ivf"]
    # the automatic index.nprobe is measured beside bench.nprobe_values: every list of this small index
    assert ivf["default_nprobe"] == ivf["nlist"] == auto_nprobe(ivf["nlist"], 3000)
    assert [row["nprobe"] for row in ivf["by_nprobe"]] == sorted({1, 4, 64, ivf["nlist"]})
    assert [row["nprobe"] for row in r["compressed"][0]["by_nprobe"]] == [
        row["nprobe"] for row in ivf["by_nprobe"]
    ]
    assert r["recommended_nprobe"] in (1, 4, 64, ivf["nlist"])
    assert 0 <= r["ivf_recall_at_10"] <= 1 and r["ivf_speedup_vs_flat"] > 0
    assert isinstance(r["met"], bool)
    assert [v["factory"].split(",")[1] for v in r["compressed"]] == ["SQ8", "PQ8"]
    assert r["memory"]["ivfflat_bytes_per_vector"] > r["compressed"][0]["bytes_per_vector"]
    assert r["scale"]["ivf"]["build_memory"]["peak_rss_mb"] > 0
    assert r["fitted_segments"] < r["fit_segments_wanted"]  # the tiny run has a few dozen segments
    # ANN candidates: every factory built, swept over its own parameters, on the same exact top-10
    assert [c["factory"] for c in r["ann"]] == [
        "HNSW32,Flat", f"IVF{ivf['nlist']}_HNSW32,Flat", f"IVF{ivf['nlist']},SQ8,Refine(Flat)"
    ]
    hnsw, ivf_hnsw, refine = r["ann"]
    assert [row["params"] for row in hnsw["rows"]] == [{"ef_search": 16}, {"ef_search": 64}]
    assert not hnsw["coarse_reused"] and ivf_hnsw["coarse_reused"] and refine["coarse_reused"]
    assert all(row["params"]["ef_search"] == 64 for row in ivf_hnsw["rows"])  # automatic max(64, 2k)
    assert {row["params"]["k_factor"] for row in refine["rows"]} == {2.0}
    # every list searched, and the graph over only a few dozen centroids: IVFFlat's exact answers
    assert ivf_hnsw["rows"][-1]["recall@10"] == ivf["by_nprobe"][-1]["recall@10"]
    assert hnsw["rows"][-1]["recall@10"] > 0.9  # a 3,000-vector graph at ef 64
    dim = r["scale"]["dim"]
    assert hnsw["bytes_per_vector"] > dim * 4 + 8 and refine["bytes_per_vector"] > dim * 5
    assert all(c["build_s"] > 0 and c["exact_qps_before_sweep"] > 0 for c in r["ann"])
    best = r["best"]
    assert best is not None and best[f"recall@{r['scale']['k']}"] >= retrieval.RECALL_GOAL
    md = retrieval.to_markdown(r)
    assert "recommended" in md and "fewer than bench.fit_segments" in md
    assert "ANN candidates" in md and "| HNSW32,Flat (exact " in md and "| ef_search 64" in md and "Fastest setting" in md
    assert (
        f"| {ivf['nlist']} (default, `index.nprobe=0`)" in md
        or f"{ivf['nlist']} **(recommended)** (default" in md
    )


def test_encoding_section(tiny, monkeypatch):
    monkeypatch.setattr(encoding, "cpu_half_slowdown", lambda dtype: 1.0)  # as on a CPU with native bf16
    r = encoding.run(tiny)
    assert set(r) >= {"fp32", "bf16", "fraction_of_peak", "met"}
    for key in ("fp32", "bf16"):
        assert r[key]["segments_per_s"] > 0 and r[key]["fraction_of_peak"] > 0
    assert r["fraction_of_peak"] == r[r["better_dtype"]]["fraction_of_peak"]
    assert "| float32" in encoding.to_markdown(r)


def test_encoding_section_skips_bf16_without_native_kernels(tiny, monkeypatch):
    """Regression: on an AVX2-only CPU the 4096² bf16 peak matmul and encoder took minutes (0.9 GFLOP/s)."""
    monkeypatch.setattr(encoding, "cpu_half_slowdown", lambda dtype: 50.0)
    r = encoding.run(tiny)
    assert "skipped" in r["bf16"] and "50x slower" in r["bf16"]["skipped"]
    assert r["better_dtype"] == "fp32" and r["fp32"]["segments_per_s"] > 0
    assert "not run: bfloat16 matmul is 50x slower" in encoding.to_markdown(r)
    assert "bf16" not in report.headline("encoding", r).split(";", 1)[1]


@pytest.fixture(scope="module")
def latency(tiny):
    return qa_latency.run(tiny, progress=False)


def test_qa_latency_section_forces_equal_answers_and_reuses_the_prefix_store(tiny, latency):
    r = latency
    for k in (1, 2):
        e = r[f"k{k}"]
        assert set(e["systems"]) == {"rag_text", "dynamic_prefix (online)", "dynamic_prefix (precomputed)"}
        assert e["dynamic_over_rag"] > 0 and e["dynamic_online_over_rag"] > 0
        # text RAG reads the segments in its prompt; the dynamic prefix does not
        assert (
            e["systems"]["rag_text"]["prompt_tokens"]
            > e["systems"]["dynamic_prefix (online)"]["prompt_tokens"]
        )
        assert (
            e["systems"]["dynamic_prefix (precomputed)"]["prefix_slots"]
            == e["systems"]["dynamic_prefix (online)"]["prefix_slots"]
            > 0
        )
    assert r["closed_book"]["ttft_ms"]["mean"] <= r["closed_book"]["total_ms"]["mean"]
    assert r["prefix_store"]["segments"] >= 2
    assert r["goal_k"] == 2 and r["met"] is False  # the goal is judged at k = 5 only
    t = r["retrieval"]
    assert t["configured"] == "dense" and t["dense_ms_per_question"] > 0 and t["hybrid_over_dense"] > 0
    # One measurement rounded twice (to 0.1 and to 0.01 ms): equal within the coarser rounding. Regression:
    # 208.6499 -> 208.6 but 208.65 -> 208.7 failed an exact comparison.
    assert abs(r["retrieve_ms_per_question"] - t["dense_ms_per_question"]) <= 0.05 + 1e-9
    assert "hybrid / dense" in qa_latency.to_markdown(r)
    again = qa_latency.run(tiny, progress=False)
    assert again["prefix_store"]["precompute"]["dynamic_prefix"].get("skipped") is True
    assert "(precomputed)" in qa_latency.to_markdown(r)


def test_precomputed_prefix_equals_online_prefix(tiny, latency):
    """The precomputed path must hand the LM the same prefix as the online path (store dtype aside)."""
    from bench.common import load_lm_template
    from data_prep.store import SegmentStore
    from knowledge_encoder.backbones import build_backbone
    from knowledge_encoder.prefix_store import PrefixStore, prefix_dir
    from lm.prompting import TextSegment
    from qa.batching import Batcher, Example
    from qa.checkpoint import encoder_sha256, new_model
    from qa.prefix_source import PrefixSource
    from qa.system import QASettings, QASystem
    from qa.systems import parse_system

    r = latency  # the section built the prefix store for its questions
    lm, tok, template = load_lm_template(tiny)
    system = parse_system("dynamic_prefix")
    torch.manual_seed(tiny.seed)
    model = new_model(system, tiny, lm, template, None).eval().requires_grad_(False)
    work = qa_latency.bench_cfg(tiny).run_dir
    sub = SegmentStore.open(f"{work}/store")
    store = PrefixStore.open(
        prefix_dir(work, "dynamic_prefix"),
        encoder_sha256(f"{work}/checkpoints/final", "dynamic_prefix"),
        sub.fingerprint,
    )
    seg = sub.get(0)
    example = [Example("Who leads it?", [TextSegment(seg.title, seg.text)], [0])]
    kcfg = tiny.knowledge_encoder
    backbone = build_backbone(kcfg, lm, template, tiny.retriever.model, "cpu")
    qa = QASystem(QASettings.from_config(tiny), lm, tok, None, {"dynamic_prefix": model},
                  {"dynamic_prefix": "dynamic_prefix"})
    _, online = qa.prepare(
        system, model, example, Batcher(template, qa_latency.FreshFeatures(backbone), "cpu")
    )
    qa.prefix_sources["dynamic_prefix"] = PrefixSource(store=store)
    _, stored = qa.prepare(system, model, example, Batcher(template, qa_latency.NoFeatures(), "cpu"))
    assert online.length == stored.length
    for a, b in zip(online.keys + online.values, stored.keys + stored.values):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
    assert r["prefix_store"]["segments"] == len(sub)


def test_training_section(tiny):
    r = training.run(tiny)
    assert set(r["systems"]) == {"dynamic_prefix@p2", "dynamic_prefix@pfull", "rag_text_tuned"}
    assert 50 <= r["segment_tokens_mean"] <= 64
    p2, full = r["systems"]["dynamic_prefix@p2"], r["systems"]["dynamic_prefix@pfull"]
    assert p2["teacher_pass"] and not full["teacher_pass"]
    assert full["prefix_slots"] > p2["prefix_slots"]  # P = n reads every segment token
    for d in r["systems"].values():
        assert d["examples_per_s"] > 0 and d["memory"]["peak_rss_mb"] > 0
    assert "| rag_text_tuned |" in training.to_markdown(r)


def test_long_segment_fits_the_budget(tiny):
    from bench.common import load_lm_template
    from data_prep.store import SegmentStore

    _, _, template = load_lm_template(tiny)
    store = SegmentStore.open(f"{tiny.run_dir}/store")
    seg = training.long_segment(store, template, 0, 64)
    n = len(template.segment_ids(seg, 10**9))
    assert 50 <= n <= 64 and seg.title == store.get(0).title


def test_runner_writes_results_and_labels_a_development_run(tiny, tmp_path):
    from bench.run import main

    config = tmp_path / "tiny.yaml"
    save_config(tiny, config)
    out = tmp_path / "out"
    # size runs in a subprocess (the default), encoding inline: both paths of the runner
    assert main(["--config", str(config), "--sections", "size", f"bench.out_dir={out}"]) == 0
    assert main(["--config", str(config), "--sections", "encoding", "--inline", f"bench.out_dir={out}"]) == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("machine", "retrieval", "encoding", "qa_latency", "training", "size"):
        assert key in results
    assert results["size"]["command"].endswith(f"--sections size bench.out_dir={out}")
    assert results["encoding"]["fraction_of_peak"] > 0
    assert results["size"]["index"]["bytes_per_segment"] > 0  # the first run's section was kept
    assert results["development_run"] is True and "n_vectors" in results["reduced_sizes"]
    md = (out / "RESULTS.md").read_text()
    assert "SMALL DEVELOPMENT RUN" in md and "## 5. Size" in md and "## 2. Encoding throughput" in md
    assert "Not run." in md  # retrieval, qa_latency, training
    assert "**Another machine**" not in md  # both sections ran here


def test_partial_run_keeps_the_machine_of_the_sections_it_did_not_rerun(tiny, tmp_path):
    """Regression: `--sections X` replaced the header's machine, so the kept sections claimed a machine
    they never ran on (bf16 figures of an AVX-512 machine under an AVX2-only one)."""
    from bench.machine import machine_label, machine_record
    from bench.run import main

    config = tmp_path / "tiny.yaml"
    save_config(tiny, config)
    out = tmp_path / "out"
    elsewhere = machine_record() | {"cpu_model": "Elsewhere CPU 9000", "cpu_flags": ["avx512_bf16"]}
    size_result = size.run(tiny) | {"command": "an earlier run", "seconds_total": 1.0}
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"machine": elsewhere, "size": size_result}))
    assert main(["--config", str(config), "--sections", "encoding", "--inline", f"bench.out_dir={out}"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["size"]["machine"] == machine_label(elsewhere)
    assert results["encoding"]["machine"] == machine_label(results["machine"]) != machine_label(elsewhere)
    md = (out / "RESULTS.md").read_text()
    size_part = md.split("## 5. Size")[1]
    assert "**Another machine**: this section ran on Elsewhere CPU 9000 (avx512_bf16)" in size_part
    assert "**Another machine**" not in md.split("## 2. Encoding throughput")[1].split("## 3.")[0]


def test_size_section_matches_the_files(tiny):
    from pathlib import Path

    r = size.run(tiny)
    index_file = Path(tiny.run_dir) / "index" / "index.faiss"
    assert r["index"]["bytes"] == index_file.stat().st_size
    computed = r["prefix_store_computed"]
    # tiny LM: 2 layers, 2 KV heads, head_dim 24, 2-byte floats; int8 adds float16 scales per channel and slot
    assert computed["bytes_per_segment"]["P=8"] == 2 * 2 * 2 * 8 * 24 * 2 + 8 + 8
    int8 = computed["bytes_per_segment_by_dtype"]["int8"]["P=8"]
    assert int8 == 2 * 2 * 2 * 8 * 24 * 1 + 2 * 2 * (24 + 8) * 2 + 8 + 8
    int4 = computed["bytes_per_segment_by_dtype"]["int4"]["P=8"]  # half a byte a code, a minimum beside each scale
    assert int4 == 2 * 2 * 2 * 8 * 24 // 2 + 2 * 2 * (24 + 8) * 2 * 2 + 8 + 8
    assert "| faiss index |" in size.to_markdown(r)


def test_bench_reads_a_run_dir_of_its_own_not_a_stale_index_in_run_dir(tiny, caplog):
    # Regression: `make bench` after scripts/compare.sh failed in qa_latency, because run_dir/index had been
    # rebuilt with the fine-tuned encoder while retriever.model still named the packaged one.
    import copy

    from bench.run import prepare_run_dir

    cfg = copy.deepcopy(tiny)
    run = Path(prepare_run_dir(cfg))
    assert run == Path(tiny.bench.work_dir) / "run" and cfg.run_dir == str(run)
    index_file = run / "index" / "index.faiss"
    built = index_file.stat().st_mtime_ns
    assert (run / "store" / "manifest.json").is_file()
    assert Path(prepare_run_dir(copy.deepcopy(tiny))) == run
    assert index_file.stat().st_mtime_ns == built  # reused, not rebuilt
    manifest_file = run / "index" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["encoder"]["fingerprint"] = "another-encoder"
    manifest_file.write_text(json.dumps(manifest))
    with caplog.at_level("INFO", logger="retriever.index"):
        assert Path(prepare_run_dir(copy.deepcopy(tiny))) == run
    # regression: the rebuild's reason named retriever.model=`None`
    assert f"retriever.model=`{tiny.retriever.model}`" in caplog.text
    assert index_file.stat().st_mtime_ns != built  # an index of another encoder is rebuilt
    assert json.loads(manifest_file.read_text())["encoder"]["fingerprint"] != "another-encoder"
    explicit = copy.deepcopy(tiny)
    explicit.bench.run_dir = tiny.run_dir
    assert prepare_run_dir(explicit) == tiny.run_dir


def test_bench_sizes_the_encoder_by_its_backbone_not_the_lm(tiny):
    # Regression: bench's training and qa_latency sections gave a non-`lm_kv` backbone the LM's hidden size,
    # so `knowledge_encoder.backbone=retriever` (the retriever's smaller width) failed at the first step.
    cfg = copy.deepcopy(tiny)
    cfg.knowledge_encoder.backbone = "retriever"
    cfg.bench.train_systems = ["dynamic_prefix@p2"]
    r = training.run(cfg)
    assert r["systems"]["dynamic_prefix@p2"]["examples_per_s"] > 0
