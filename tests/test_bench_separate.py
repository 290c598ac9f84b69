"""bench.separate: the benchmarks run as their own commands reach RESULTS.md from the files they write."""

from __future__ import annotations

import json

from bench.separate import SEPARATE_FILES, load_separate, provenance, render_separate

SERVICE = {
    "rows": [
        {
            "clients": c,
            "requests": 40,
            "ok": 40,
            "errors": 0,
            "qps": q,
            "p50_ms": 9.0,
            "p95_ms": 12.5,
            "p99_ms": 20.0,
        }
        for c, q in ((1, 50.0), (8, 90.5), (50, 93.25))
    ]
}
BACKENDS = {
    "split": "test",
    "questions": 120,
    "segments": 300,
    "dim": 384,
    "k": 10,
    "backends": {
        "faiss Flat": {
            "build_s": 0.01,
            "search_s": 0.02,
            "ms_per_question": 0.17,
            "same_order": 1.0,
            "same_set": 1.0,
        },
        "milvus FLAT": {
            "build_s": 2.5,
            "search_s": 0.4,
            "ms_per_question": 3.33,
            "same_order": 0.99,
            "same_set": 1.0,
        },
    },
}
RAY = {
    "segments": 600,
    "encoder": "embedded:minilm-l6",
    "batch_size": 64,
    "ray_cpus_per_worker": 1,
    "rows": [
        {
            "engine": "local",
            "workers": None,
            "torch_threads": 2,
            "seconds": 50.0,
            "segments_per_s": 12.0,
            "startup_s": 4.0,
            "steady_segments_per_s": 12.5,
            "same_files_as_local": True,
        },
        {
            "engine": "ray",
            "workers": 2,
            "torch_threads": 1,
            "seconds": 60.0,
            "segments_per_s": 10.0,
            "startup_s": 35.0,
            "steady_segments_per_s": 24.0,
            "same_files_as_local": False,
        },
    ],
}


def test_provenance_names_the_command_and_machine():
    p = provenance("bench.service_load", ["--config", "configs/demo.yaml", "--requests", "400"])
    assert p["command"] == "python -m bench.service_load --config configs/demo.yaml --requests 400"
    assert p["date"] and "logical cores" in p["machine_label"] and len(p["load_average_at_start"]) == 3


def test_separate_files_render_with_their_commands(tmp_path):
    for name, body in zip(SEPARATE_FILES, (SERVICE, BACKENDS, RAY)):
        report = {**provenance(f"bench.{name[:-5]}", ["--out", name]), **body}
        (tmp_path / name).write_text(json.dumps(report), encoding="utf-8")
    found = load_separate(tmp_path)
    assert list(found) == list(SEPARATE_FILES)
    text = "\n".join(render_separate(found))
    assert text.count("Command: `python -m bench.") == 3
    assert "| 50 | 40 | 0 | 93.25 |" in text  # the service table, one row per client level
    assert "| milvus FLAT | 2.50 | 0.40 | 3.33 | 0.9900 | 1.0000 |" in text
    assert "| Ray, 2 worker(s) | 60.0 | 10.0 | 35.0 | 24.0 | no |" in text


def test_unreadable_or_anonymous_files_are_left_out(tmp_path, caplog):
    (tmp_path / "service_load.json").write_text("{not json", encoding="utf-8")
    (tmp_path / "vector_backends.json").write_text(json.dumps(BACKENDS), encoding="utf-8")  # no command
    (tmp_path / "unrelated.json").write_text("{}", encoding="utf-8")
    assert load_separate(tmp_path) == {}
    assert render_separate({}) == []
    assert "service_load.json is not readable JSON" in caplog.text and "no command" in caplog.text
