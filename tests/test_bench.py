"""`rsvlm-edge bench`: every metric in the JSON, fractions of the machine limits in a sane range, the table,
errors for bad dirs, the cost model against the torch model, and no torch import outside the torch worker."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from rsvlm_edge.bench import model_cost
from rsvlm_edge.bench.report import format_table
from rsvlm_edge.bench.weights import engine_active_bytes, engine_precision, read_manifest, torch_active_bytes
from rsvlm_edge.cli import main

METRICS = ["load_s", "vision_ms", "ttft_ms", "prefill_ms", "decode_tok_s", "e2e_s_per_tile", "tiles_per_s",
           "batch_decode_tok_s", "peak_rss_mb", "expert_load_ms", "expert_switch_ms", "expert_hit_rate",
           "prompt_tokens", "new_tokens", "decode_steps"]
FRACTIONS = ["decode_bandwidth_frac", "batch_decode_bandwidth_frac", "prefill_gemm_frac", "vision_gemm_frac"]
FRACTION_BOUND = 5.0  # tiny weights partly fit in cache, so decode may beat the DRAM copy rate a little; not 5x


@pytest.fixture(scope="module")
def engine_dir(tiny_model_dir, tmp_path_factory):
    from rsvlm_edge.export.testing import export_checkpoint

    return export_checkpoint(tiny_model_dir, tmp_path_factory.mktemp("bench-engine") / "tiny-fp32")


@pytest.fixture(scope="module")
def bench_run(engine_dir, tiny_model_dir, sample_png, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    args = ["bench", "--engine", f"ort-fp32={engine_dir}", "--torch", str(tiny_model_dir), "--tiles", "2",
            "--new-tokens", "4", "--batch", "2", "--threads", "1", "--image", str(sample_png), "--quick-limits",
            "--no-progress", "--json", str(out / "bench.json"), "--plot", str(out / "bench.png")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result.output, json.loads((out / "bench.json").read_text()), out


def test_json_has_every_metric_for_every_engine(bench_run):
    _, data, _ = bench_run
    assert [r["name"] for r in data["engines"]] == ["ort-fp32", "torch-eager"]
    for row in data["engines"]:
        assert set(METRICS) <= set(row["metrics"]), row["name"]
        m = row["metrics"]
        assert m["new_tokens"] == 4 and m["decode_steps"] == 3  # ignore_stop: exactly --new-tokens
        for key in ["vision_ms", "ttft_ms", "prefill_ms", "decode_tok_s", "e2e_s_per_tile", "tiles_per_s", "peak_rss_mb"]:
            assert m[key] > 0, (row["name"], key)
        assert m["ttft_ms"] >= m["prefill_ms"]
        assert row["precision"] == "fp32"
    ort, torch_row = data["engines"]
    assert 0 < ort["metrics"]["expert_hit_rate"] <= 1 and ort["metrics"]["expert_load_ms"] > 0
    assert torch_row["metrics"]["expert_hit_rate"] is None  # no expert cache: every expert is resident
    assert ort["vs_torch"]["decode_tok_s"] > 0 and torch_row["vs_torch"] is None
    assert ort["fractions"]["active_weight_bytes"] == pytest.approx(torch_row["fractions"]["active_weight_bytes"], rel=0.01)


def test_fractions_of_limits_are_sane(bench_run):
    _, data, _ = bench_run
    mach = data["machine"]
    assert mach["bandwidth_gbs"] > 0 and mach["gemm_fp32_gflops"] > 0
    # sampled before and after each engine (fp32, torch); the limit is the best sample
    samples = mach["detail"]["bandwidth_samples_gbs"]
    assert len(samples) == 1 + len(data["engines"]) and mach["bandwidth_gbs"] == max(samples)
    for row in data["engines"]:
        for key in FRACTIONS:
            assert 0 < row["fractions"][key] <= FRACTION_BOUND, (row["name"], key, row["fractions"][key])


def test_table_and_plot(bench_run):
    output, data, out = bench_run
    assert "best of 3 samples" in output
    for label in ["decode (tok/s, batch 1)", "of bandwidth limit", "end-to-end (s/tile)", "peak RSS (MB)",
                  "expert cache hit rate", "ort-fp32", "torch-eager", "target e2e_vs_torch"]:
        assert label in output
    assert data["targets"]["int8_decode_vs_torch"]["met"] is None  # no INT8 engine given
    pytest.importorskip("matplotlib")
    assert (out / "bench.png").stat().st_size > 1000


def test_table_shows_missing_values_as_dash(bench_run):
    _, data, _ = bench_run
    data = json.loads(json.dumps(data))
    data["engines"][0]["metrics"]["expert_switch_ms"] = None
    line = next(ln for ln in format_table(data).splitlines() if ln.startswith("expert switch"))
    assert line.split()[3] == "-"


def test_cost_model_matches_the_torch_model():
    from rsvlm_edge.config import preset
    from rsvlm_edge.modeling import build_model

    for name in ["tiny", "rsunivlm-1b"]:
        cfg = preset(name)
        model = build_model(cfg, device="meta", seed=None)
        count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
        p = model_cost.decoder_params(cfg)
        assert p.expert == sum(count(layer.experts[0]) for layer in model.layers)
        assert p.attention == sum(count(layer.self_attn) for layer in model.layers)
        assert p.norms == sum(count(layer.input_layernorm) + count(layer.post_attention_layernorm)
                              for layer in model.layers) + count(model.norm)
        assert p.lm_head == count(model.lm_head) and p.embedding == count(model.embed_tokens)
    cfg = preset("tiny")
    p = model_cost.decoder_params(cfg)
    per_token = 2 * (p.attention + p.expert)
    assert model_cost.prefill_flops(cfg, 20) - model_cost.prefill_flops(cfg, 10) > 10 * per_token  # + attention
    assert model_cost.vision_flops(preset("rsunivlm-1b")) == pytest.approx(2 * 729 * 4.0e8, rel=0.15)  # ~2*N*params


def test_active_bytes_from_manifest(engine_dir, tiny_model_dir):
    assert engine_precision(read_manifest(engine_dir)) == "fp32"
    assert engine_active_bytes(engine_dir) == pytest.approx(torch_active_bytes(tiny_model_dir), rel=0.01)


def test_bad_dirs_are_clear_errors(engine_dir, tiny_model_dir, tmp_path):
    runner = CliRunner()
    bad = runner.invoke(main, ["bench", "--engine", "x"])
    assert bad.exit_code == 2 and "NAME=DIR" in bad.output
    missing = runner.invoke(main, ["bench", "--engine", f"e={tmp_path}", "--no-progress"])
    assert missing.exit_code == 2 and "manifest.json" in missing.output
    no_weights = runner.invoke(main, ["bench", "--torch", str(engine_dir), "--no-progress"])
    assert no_weights.exit_code == 2 and "model.safetensors" in no_weights.output
    nothing = runner.invoke(main, ["bench", "--no-progress"])
    assert nothing.exit_code == 2 and "nothing to measure" in nothing.output


def test_bench_is_torch_free_outside_the_torch_worker():
    code = ("import sys; import rsvlm_edge.cli, rsvlm_edge.bench.runner, rsvlm_edge.bench.report, "
            "rsvlm_edge.bench.plot, rsvlm_edge.bench.worker, rsvlm_edge.bench.limits; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_full_size_limits_and_default_settings(engine_dir, tiny_model_dir, sample_png, tmp_path):
    """Default tile/token counts and full-size limit probes (buffers beyond the caches): over 30 s."""
    result = CliRunner().invoke(main, ["bench", "--engine", f"ort-fp32={engine_dir}", "--torch", str(tiny_model_dir),
                                       "--image", str(sample_png), "--no-progress", "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "b.json").read_text())
    for row in data["engines"]:
        assert row["metrics"]["new_tokens"] == 16
        for key in FRACTIONS:
            assert 0 < row["fractions"][key] <= 2.0


def test_int8_rows_use_the_int8_peak_and_feed_the_targets():
    """No INT8 engine dir is built here: the derivation and the target logic run on made-up rows."""
    from rsvlm_edge.bench.limits import Limits
    from rsvlm_edge.bench.runner import derive, speedups, targets
    from rsvlm_edge.config import preset

    cfg = preset("tiny")
    limits = Limits(bandwidth_gbs=10.0, gemm_fp32_gflops=100.0, gemm_int8_gops=400.0, threads=2, detail={})
    metrics = {"decode_tok_s": 100.0, "batch_decode_tok_s": 300.0, "batch_size": 4, "prefill_ms": 10.0,
               "vision_ms": 5.0, "prompt_tokens": 77, "e2e_s_per_tile": 1.0, "tiles_per_s": 1.0, "ttft_ms": 10.0,
               "peak_rss_mb": 100.0}
    rows = []
    for name, backend, precision, speed in [("int8", "ort", "int8", 4.0), ("torch", "torch", "fp32", 1.0)]:
        m = dict(metrics, decode_tok_s=100.0 * speed, e2e_s_per_tile=1.0 / speed)
        row = {"name": name, "backend": backend, "precision": precision, "metrics": m}
        row["fractions"] = derive(row, cfg, limits, precision, active_bytes=50_000_000)
        rows.append(row)
    assert rows[0]["fractions"]["gemm_peak_used"] == "int8" and rows[1]["fractions"]["gemm_peak_used"] == "fp32"
    assert rows[0]["fractions"]["vision_gemm_frac"] * 4 == pytest.approx(rows[1]["fractions"]["vision_gemm_frac"])
    assert rows[0]["fractions"]["decode_bandwidth_frac"] == pytest.approx(50e6 * 400 / 10e9)
    assert rows[1]["fractions"]["batch_decode_bandwidth_frac"] == pytest.approx(50e6 * 300 / 4 / 10e9)
    int4 = derive(dict(rows[0], precision="int4"), cfg, limits, "int4", active_bytes=30_000_000)
    assert int4["gemm_peak_used"] == "int8"  # INT8 activations x 4-bit codes in integer dot products
    speedups(rows)
    got = targets(rows)
    assert got["int8_decode_vs_torch"]["value"] == pytest.approx(4.0) and got["int8_decode_vs_torch"]["met"]
    assert got["int8_decode_bandwidth_frac"]["met"] is True  # 2.0 >= 0.7
    assert got["e2e_vs_torch"]["value"] == pytest.approx(4.0)


def test_worker_timeout_is_a_clear_error(engine_dir, sample_png):
    from rsvlm_edge.bench.runner import BenchError, run_worker
    from rsvlm_edge.bench.worker import WorkerSpec

    with pytest.raises(BenchError, match="killed after --timeout"):
        run_worker(WorkerSpec("slow", "ort", str(engine_dir), [str(sample_png)], new_tokens=4), lambda _: None, 0.3)


def test_op_profile_splits_the_decode_step():
    from rsvlm_edge.bench.op_profile import summarize

    def node(op, ts, dur, weights=0):
        return {"cat": "Node", "name": f"/{op}_{ts}_kernel_time", "ts": ts, "dur": dur,
                "args": {"op_name": op, "parameter_size": str(weights)}}

    events = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 500},  # the prefill: left out
              node("MatMul", 10, 400, 4_000_000)]
    for start in (1000, 2000):  # two decode steps of 100 us, 80 of them in nodes
        events += [{"cat": "Session", "name": "model_run", "ts": start, "dur": 100},
                   node("MatMulNBits", start + 5, 60, 1_200_000), node("Add", start + 70, 20),
                   {"cat": "Node", "name": "/Add_fence_before", "ts": start + 69, "dur": 1, "args": {}}]
    report = summarize(events, steps=2, wall_us_per_step=200.0)
    ops = {row["op"]: row for row in report["ops"]}
    assert list(ops) == ["MatMulNBits", "Add"]  # slowest first; the prefill's MatMul is not a decode step
    assert ops["MatMulNBits"]["us_per_step"] == 60 and ops["MatMulNBits"]["share_of_step"] == pytest.approx(0.3)
    assert ops["MatMulNBits"]["weight_gbs"] == pytest.approx(1.2e6 / 60e-6 / 1e9)  # 20 GB/s inside the kernel
    assert ops["Add"]["weight_gbs"] is None and ops["Add"]["nodes_per_step"] == 1
    assert report["ort_between_nodes_us_per_step"] == pytest.approx(20)
    assert report["outside_decoder_us_per_step"] == pytest.approx(100)
    with pytest.raises(ValueError, match="fewer than"):
        summarize(events, steps=4, wall_us_per_step=200.0)
    # weights the backend hands ORT from outside the graph are counted from the graph file instead
    named = summarize(events, steps=2, wall_us_per_step=200.0, node_weights={"/Add_1070": 2_000_000, "/Add_2070": 0})
    assert {row["op"]: row for row in named["ops"]}["Add"]["weight_mb_per_step"] == pytest.approx(1.0)


def test_profile_cli_on_an_engine(engine_dir, sample_png, tmp_path):
    out = tmp_path / "profile.json"
    result = CliRunner().invoke(main, ["profile", str(engine_dir), "--threads", "1", "--new-tokens", "4",
                                       "--image", str(sample_png), "--json", str(out),
                                       "--keep-traces", str(tmp_path / "traces")])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["steps"] == 3 and report["decoder"].startswith("decoder_expert")
    assert "MatMul" in {row["op"] for row in report["ops"]} and "outside the decoder session" in result.output
    assert report["nodes_us_per_step"] <= report["ort_run_us_per_step"] <= report["wall_us_per_step"] * 1.01
    assert (tmp_path / "traces" / f"{report['decoder']}.json").is_file()
    matmul = next(row for row in report["ops"] if row["op"] == "MatMul")
    assert matmul["weight_mb_per_step"] > 1.0  # the decoder's external weights, from the graph file
    bad = CliRunner().invoke(main, ["profile", str(tmp_path), "--image", str(sample_png)])
    assert bad.exit_code == 2 and "cannot use" in bad.output


def test_decode_steps_interleaves_engines(engine_dir, tmp_path, capsys):
    from rsvlm_edge.bench.decode_steps import main as decode_steps

    out = tmp_path / "steps.json"
    assert decode_steps([str(engine_dir), str(engine_dir), "--rounds", "2", "--steps", "3", "--prompt", "6",
                         "--threads", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert len(data["rounds"]) == 2 and all(r["bandwidth_gbs"] > 0 for r in data["rounds"])
    summary = data["summary"][str(engine_dir)]
    assert summary["step_ms"] > 0 and summary["tok_s"] == pytest.approx(1e3 / summary["step_ms"])
    assert summary["weight_mb_per_token"] == pytest.approx(engine_active_bytes(engine_dir) / 1e6)
    lo, hi = summary["of_bandwidth_range"]
    assert lo <= summary["of_bandwidth"] <= hi
    assert "round 2/2" in capsys.readouterr().out
