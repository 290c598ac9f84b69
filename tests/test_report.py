"""eval.report: report.md and the PNG plots show metrics.json's numbers, and re-render from the file."""

from __future__ import annotations

import json

import pytest

from common.errors import UserError
from eval import report as rep

PNG = b"\x89PNG\r\n\x1a\n"


def system(em, f1, k=None, top1=None, top5=None, latency=10.0, slots=0.0, bert=None):
    return {
        "em": em,
        "f1": f1,
        "contains": em,
        "bertscore_f1": bert,
        "bleurt": None,
        "retrieval_top1": top1,
        "retrieval_top5": top5,
        "latency_ms_mean": latency,
        "latency_ms_p95": latency * 1.5,
        "em_ci": [max(0.0, em - 0.1), min(1.0, em + 0.1)],
        "f1_ci": [max(0.0, f1 - 0.1), min(1.0, f1 + 0.1)],
        "contains_ci": None,
        "prompt_tokens_mean": 40.0,
        "prefix_slots_mean": slots,
        "k": k,
        "description": "d",
        "skipped": {},
    }


def fake_metrics(train_log=None, sweep=True) -> dict:
    systems = {
        "closed_book": system(0.05, 0.1, latency=20.0),
        "rag_text": system(0.25, 0.4, k=1, top1=0.8, top5=0.95, latency=60.0, bert=0.61),
        "dynamic_prefix": system(0.7, 0.75, k=1, top1=0.8, top5=0.95, latency=35.25, slots=40.0),
        "majority": system(0.125, 0.2, latency=0.0),
    }
    return {
        "n": 40,
        "split": "test",
        "order": list(systems),
        "systems": systems,
        "k_sweep": {
            "rag_text": {
                "1": {
                    "em": 0.25,
                    "f1": 0.4,
                    "contains": 0.3,
                    "latency_ms_mean": 60.0,
                    "latency_ms_p95": 80.0,
                    "prompt_tokens_mean": 300.0,
                    "prefix_slots_mean": 0.0,
                },
                "3": {
                    "em": 0.3,
                    "f1": 0.45,
                    "contains": 0.35,
                    "latency_ms_mean": 110.0,
                    "latency_ms_p95": 130.0,
                    "prompt_tokens_mean": 700.0,
                    "prefix_slots_mean": 0.0,
                },
            }
        }
        if sweep
        else {},
        "retrieval": {"n": 40, "top1_accuracy": 0.8, "top5_accuracy": 0.95, "k_searched": 5},
        "comparisons": [
            {
                "system": "dynamic_prefix",
                "baseline": "closed_book",
                "metric": "em",
                "diff": 0.65,
                "ci": [0.5, 0.8],
                "p_value": 0.0,
                "significant": True,
            }
        ],
        "skipped": {"bleurt": "no BLEURT checkpoint configured"},
        "majority": None,
        "config": {
            "lm": "tiny",
            "lm_config": {"num_hidden_layers": 2},
            "device": "cpu",
            "dtype": "auto",
            "max_new_tokens": 8,
            "retriever": "enc",
            "index": {"factory": "Flat", "ntotal": 100, "nprobe": 1},
            "checkpoint": "ck",
            "checkpoint_step": 10,
            "checkpoint_created": "now",
            "store": "s",
            "store_fingerprint": "f",
            "split": "test",
            "limit": 40,
            "seed": 0,
            "top_k": 1,
            "k_values": [1, 3],
            "batch_size": 8,
            "metrics": ["em"],
            "bootstrap": 100,
            "train_log": train_log,
            "created": "now",
            "eval_seconds": 1.0,
            "machine": {"processor": "x86", "cpu_count": 2, "torch": "2", "torch_threads": 2},
        },
    }


def test_report_and_plots_show_the_metrics(tmp_path):
    log = tmp_path / "train.jsonl"
    log.write_text(
        "".join(json.dumps({"step": s, "loss": {"dynamic_prefix": 4.0 / s}}) + "\n" for s in (1, 2, 3))
        + json.dumps({"step": 3, "final_dev_em": {"dynamic_prefix": 0.5}})
        + "\n"
    )
    m = fake_metrics(str(log))
    path = rep.write_report(m, tmp_path / "out")
    text = path.read_text()
    for name in ("metrics.png", "k_sweep.png", "loss.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == PNG
        assert f"]({name})" in text
    assert (
        "| `dynamic_prefix` | 1 | 0.700 [0.600, 0.800] | 0.750 [0.650, 0.850] | 0.700 | – | – | 0.800 | 0.950 | "
        "35.2 | 52.9 | 40.0 | 40.0 |" in text
    )
    assert "| `rag_text` | 1 | 0.250 [0.150, 0.350] | 0.400 [0.300, 0.500] | 0.250 | 0.610 |" in text
    assert "| `rag_text` | 3 | 0.300 | 0.450 | 0.350 | 110.0 | 130.0 | 700.0 | 0.0 |" in text
    assert "| `dynamic_prefix` | `closed_book` | EM | 0.650 * | [0.500, 0.800] | 0.000 |" in text
    assert "- BLEURT: no BLEURT checkpoint configured" in text
    assert "`dynamic_prefix` 0.500" in text and "batch of 8 questions" in text
    # the systems table keeps metrics.json's order
    assert [line.split("|")[1].strip() for line in text.split("## Systems")[1].splitlines()[4:8]] == [
        f"`{n}`" for n in m["order"]
    ]


def test_plots_draw_the_metrics_values(tmp_path):
    m = fake_metrics()
    drawn = rep.plot_metrics(m, tmp_path / "m.png")
    for metric in ("em", "f1", "contains"):
        assert drawn["quality"][metric] == {n: s[metric] for n, s in m["systems"].items()}
    assert drawn["quality"]["bertscore_f1"] == {"rag_text": 0.61} and "bleurt" not in drawn["quality"]
    assert drawn["latency_ms_mean"] == {n: m["systems"][n]["latency_ms_mean"] for n in m["order"][:3]}
    sweep = rep.plot_k_sweep(m, tmp_path / "k.png")
    assert sweep == {
        "em": {"rag_text": {1: 0.25, 3: 0.3}},
        "latency_ms_mean": {"rag_text": {1: 60.0, 3: 110.0}},
    }
    assert (tmp_path / "m.png").read_bytes()[:8] == PNG and (tmp_path / "k.png").read_bytes()[:8] == PNG


def test_without_sweep_or_log_no_such_plots(tmp_path):
    m = fake_metrics(sweep=False)
    text = rep.write_report(m, tmp_path).read_text()
    assert not (tmp_path / "k_sweep.png").exists() and not (tmp_path / "loss.png").exists()
    assert "## Answers vs k" not in text and "## Training" not in text
    assert rep.plot_training(str(tmp_path / "missing.jsonl"), tmp_path / "loss.png") is None


def test_cli_rerenders_from_metrics_json(tmp_path, capsys):
    out = tmp_path / "run" / "eval"
    with pytest.raises(UserError, match="run `python -m eval.run"):
        rep.main([f"run_dir={tmp_path / 'run'}"])
    out.mkdir(parents=True)
    (out / "metrics.json").write_text("{broken")
    with pytest.raises(UserError, match="not valid JSON"):
        rep.main([f"run_dir={tmp_path / 'run'}"])
    (out / "metrics.json").write_text(json.dumps(fake_metrics()))
    assert rep.main([f"run_dir={tmp_path / 'run'}"]) == 0
    assert (out / "report.md").is_file() and (out / "metrics.png").is_file()
    assert str(out / "report.md") in capsys.readouterr().out


@pytest.mark.parametrize(
    "value,ci,shown", [(None, None, "–"), (0.5, None, "0.500"), (0.5, [0.25, 0.75], "0.500 [0.250, 0.750]")]
)
def test_formatting(value, ci, shown):
    assert rep.fmt_ci(value, ci) == shown


def test_report_says_when_answers_were_span_decoded(tmp_path):
    m = fake_metrics(None)
    assert "qa.decoding=span" not in rep.write_report(m, tmp_path / "free").read_text()
    m["config"]["decoding"] = "span"
    assert "qa.decoding=span" in rep.write_report(m, tmp_path / "span").read_text()
