"""`rsvlm-edge bench-peers`: the rounds, the table and the weight accounting without any peer;
the worker on this project's engine and on PyTorch eager; ONNX Runtime GenAI and llama.cpp only where installed
(they skip otherwise: the `peers` extra is not part of `dev`)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rsvlm_edge.bench.peers.exports import Step, plan
from rsvlm_edge.bench.peers.model import _hf_name
from rsvlm_edge.bench.peers.rounds import EngineFigures, Span, collect, schedule
from rsvlm_edge.bench.peers.run import NO_EXTRA_BUFTS, measure_engine, needed_steps
from rsvlm_edge.bench.peers.table import (
    bit_width,
    bytes_text,
    figures_from_json,
    format_header,
    format_ratios,
    format_table,
    span_text,
)
from rsvlm_edge.bench.peers.weights import lookup_adjusted, onnx_bytes_per_token, safetensors_bytes_per_token
from rsvlm_edge.bench.peers.worker import PeerSpec, measure, prompt_ids
from rsvlm_edge.cli import main


def test_every_engine_runs_once_per_round_in_rotated_order():
    order = schedule(["a", "b", "c"], 3)
    assert [name for _, name in order] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [r for r, _ in order] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="at least 1"):
        schedule(["a"], 0)


def test_collect_groups_rounds_by_engine_and_keeps_failures_apart():
    ok = {"prefill_s": 2.0, "decode_tok_s": 30.0, "peak_rss_mb": 1200.0}
    figures = collect(["a", "b"], [("b", ok), ("a", "exit code 1: boom"), ("b", {**ok, "prefill_s": 3.0})])
    assert [f.name for f in figures] == ["a", "b"]
    assert figures[0].errors == ["exit code 1: boom"] and not figures[0].prefill_s.values
    assert figures[1].prefill_s.values == [2.0, 3.0] and figures[1].to_dict()["decode_tok_s"] == [30.0, 30.0]
    noted = collect(["q4"], [("q4", {**ok, "note": NO_EXTRA_BUFTS}), ("q4", {**ok, "note": NO_EXTRA_BUFTS})])
    assert noted[0].notes == [NO_EXTRA_BUFTS] and len(noted[0].prefill_s.values) == 2


def test_spans_print_as_ranges_unless_the_rounds_agree():
    assert span_text(Span([7.28, 6.95, 7.1]), "{:.2f}") == "6.95-7.28"
    assert span_text(Span([5.01, 5.04]), "{:.1f}") == "5.0"
    assert span_text(Span(), "{:.1f}") == "-"
    assert bytes_text(317_000_000) == "317 MB" and bytes_text(1_980_000_000) == "1.98 GB" and bytes_text(None) == "-"


def test_table_has_one_row_per_engine_with_the_issue_columns():
    fast = EngineFigures("llama.cpp Q4_0", Span([4.96, 5.44]), Span([29.7, 33.8]), Span([690.0, 650.0]), 346_000_000)
    failed = EngineFigures("GenAI int4", errors=["killed"])
    lines = format_table([fast, failed], 740).splitlines()
    assert lines[0].startswith("| engine | prefill, 740 tokens (s) | decode tok/s | peak RSS (MB) |")
    assert lines[2] == "| llama.cpp Q4_0 | 4.96-5.44 | 29.7-33.8 | 690 | 346 MB |"
    assert lines[3] == "| GenAI int4 | - | - | - | - |"
    head = format_header("Intel(R) Xeon(R) Processor (AVX2, AVX-512, VNNI, AMX)", 2, 2, 3, 740, 64)
    assert head.startswith("machine: Intel(R) Xeon(R) Processor (AVX2, AVX-512, VNNI, AMX), 2 cores; 2 threads")
    assert "3 interleaved rounds, 740-token prompt, 64 new tokens" in head and "load average" not in head
    assert format_header("x", 2, 2, 1, 740, 64, load_avg=6.24).endswith("load average 6.2 over the last 15 minutes of the run")


def test_ratios_compare_each_round_with_the_best_peer_of_the_same_bit_width(tmp_path):
    ours = EngineFigures("rsvlm-edge INT4 weight-only", Span([2.0, 4.0]), Span([40.0, 30.0]))
    genai = EngineFigures("ONNX Runtime GenAI int4 (model builder)", Span([3.0, 5.0]), Span([38.0, 36.0]))
    llama = EngineFigures("llama.cpp Q4_0", Span([4.0, 4.4]), Span([20.0, 40.0]))
    q8 = EngineFigures("llama.cpp Q8_0", Span([1.0, 1.0]), Span([99.0, 99.0]))  # another bit width: not a rival
    fp32 = EngineFigures("rsvlm-edge FP32", Span([9.0, 9.0]), Span([9.0, 9.0]))
    assert [bit_width(f.name) for f in (ours, genai, llama, q8, fp32)] == [4, 4, 4, 8, None]
    # round 1: best decode 38 (GenAI), best prefill 3.0; round 2: best decode 40 (llama.cpp), best prefill 4.4
    assert format_ratios([ours, genai, llama, q8, fp32]) == (
        "rsvlm-edge INT4 weight-only against the best 4-bit peer, per round: decode 1.05, 0.75x; prefill 1.50, 1.10x")
    broken = EngineFigures("llama.cpp Q4_0", Span([4.0]), Span([20.0]), errors=["killed"])
    assert format_ratios([ours, genai, broken]) == ""  # rounds out of step: no line rather than a wrong one
    saved = {"engines": [f.to_dict() for f in (ours, genai)], "settings": {"prompt_tokens": 740}}
    again = figures_from_json(saved)
    assert format_ratios(again) == format_ratios([ours, genai])
    import json

    from rsvlm_edge.bench.peers import table

    path = tmp_path / "peers.json"
    path.write_text(json.dumps(saved))
    assert table.main([str(path)]) == 0 and table.main([]) == 2


def test_a_table_only_looked_up_counts_one_row_and_a_tied_head_counts_whole():
    sizes, rows = {"embed": 1000, "w": 64}, {"embed": 100, "w": 8}
    assert lookup_adjusted(sizes, rows, {"embed": ["Gather"], "w": ["MatMul"]}) == 10 + 64
    assert lookup_adjusted(sizes, rows, {"embed": ["Gather", "MatMul"], "w": ["MatMul"]}) == 1000 + 64
    assert lookup_adjusted(sizes, rows, {"embed": ["GatherBlockQuantized"], "w": ["MatMulNBits"]}) == 10 + 64


def test_onnx_weights_per_token_read_from_the_graph(tmp_path):
    from onnx import TensorProto, helper, numpy_helper, save

    table = numpy_helper.from_array(np.zeros((50, 8), np.float32), "table")
    weight = numpy_helper.from_array(np.zeros((8, 4), np.float32), "weight")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["x"]), helper.make_node("MatMul", ["x", "weight"], ["y"])],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [table, weight])
    save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    assert onnx_bytes_per_token(tmp_path) == 8 * 4 + 8 * 4 * 4


def test_torch_weights_per_token_count_fp32_and_one_embedding_row(tmp_path):
    from safetensors.numpy import save_file

    save_file({"model.embed_tokens.weight": np.zeros((100, 8), np.float16), "lm_head.weight": np.zeros((100, 8), np.float16),
               "model.norm.weight": np.zeros(8, np.float16)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    assert safetensors_bytes_per_token(tmp_path) == (8 + 800 + 8) * 4
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    assert safetensors_bytes_per_token(tmp_path) == (800 + 800 + 8) * 4


def test_experts_copy_the_qwen2_ffn_and_vision_tensors_are_drawn():
    assert _hf_name("model.layers.3.mlp.2.gate_proj.weight") == "model.layers.3.mlp.gate_proj.weight"
    assert _hf_name("model.layers.3.self_attn.q_proj.bias") == "model.layers.3.self_attn.q_proj.bias"
    assert _hf_name("model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert _hf_name("lm_head.weight") == "lm_head.weight"
    assert _hf_name("model.mm_projector.0.weight") is None
    assert _hf_name("model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight") is None


def test_a_step_runs_when_a_kept_engine_reads_its_output(tmp_path):
    steps, engines, _ = plan(tmp_path, ["a.png"], None)
    by_name = {e.name: e for e in engines}
    wanted = needed_steps(steps, [by_name["rsvlm-edge INT8 weight-only"].path])
    assert [s.out.name for s in wanted] == ["model", "fp32", "int8-weight-only"]
    assert needed_steps(steps, [by_name["PyTorch eager FP32"].path]) == []  # the hf dir is written, not built
    chain = [Step(tmp_path / "x", ["make"]), Step(tmp_path / "y", ["from", str(tmp_path / "x")])]
    assert needed_steps(chain, [tmp_path / "y"]) == chain


def test_prompt_ids_are_fixed_by_the_seed_and_below_the_vocab():
    ids = prompt_ids(740, 151643)
    assert len(ids) == 740 and max(ids) < 151643 and ids == prompt_ids(740, 151643)


def test_worker_measures_this_projects_engine(tmp_path):
    engine = Path(__file__).resolve().parents[1] / "models" / "tiny-demo"
    if not (engine / "manifest.json").is_file():
        pytest.skip("models/tiny-demo is not built in this checkout")
    vocab = json.loads((engine / "config.json").read_text())["vocab_size"]
    result = measure(PeerSpec("tiny", "rsvlm", str(engine), prompt_tokens=24, new_tokens=4, threads=1, vocab=vocab))
    assert result["prefill_s"] > 0 and result["decode_tok_s"] > 0 and result["peak_rss_mb"] > 10


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory) -> Path:
    """A 2-layer Qwen2 saved by transformers (the harness's own writer makes the full shape only)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from rsvlm_edge.bench.peers.model import qwen2_config

    out = tmp_path_factory.mktemp("tiny-qwen2")
    fields = qwen2_config(vocab=512)
    fields.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    config = transformers.Qwen2Config(**{k: v for k, v in fields.items() if k not in ("architectures", "model_type")})
    transformers.Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    return out


def test_worker_measures_pytorch_eager(tiny_qwen2):
    result = measure(PeerSpec("torch", "torch", str(tiny_qwen2), prompt_tokens=24, new_tokens=4, threads=1, vocab=512))
    assert result["prefill_s"] > 0 and result["decode_tok_s"] > 0


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None, reason="onnxruntime-genai not installed")
def test_genai_model_builder_engine_is_measured(tiny_qwen2, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "genai"
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(tiny_qwen2), "-o", str(out),
                    "-p", "int4", "-e", "cpu", "-c", str(tmp_path / "cache")], check=True, capture_output=True)
    result = measure(PeerSpec("genai", "genai", str(out), prompt_tokens=24, new_tokens=4, threads=1, vocab=512))
    assert result["prefill_s"] > 0 and result["decode_tok_s"] > 0
    fp32_bytes = safetensors_bytes_per_token(tiny_qwen2)
    assert 0 < onnx_bytes_per_token(out) < fp32_bytes / 2  # 4-bit weights: well under half the FP32 bytes


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None or not os.environ.get("RSVLM_LLAMA_CPP"),
                    reason="llama-cpp-python not installed or RSVLM_LLAMA_CPP (llama.cpp sources) not set")
def test_gguf_engine_is_converted_quantized_and_measured(tiny_qwen2, tmp_path):
    import shutil

    from rsvlm_edge.bench.peers.exports import run_step
    from rsvlm_edge.bench.peers.weights import gguf_bytes_per_token
    from rsvlm_edge.export.rsunivlm_testing import build_tokenizer

    hf = tmp_path / "hf"
    shutil.copytree(tiny_qwen2, hf)
    build_tokenizer(500).save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    steps, engines, _ = plan(tmp_path, ["unused.png"], Path(os.environ["RSVLM_LLAMA_CPP"]))
    q4 = next(e for e in engines if e.name == "llama.cpp Q4_0")
    for step in needed_steps(steps, [q4.path]):
        run_step(step, tmp_path / "build.log")
    # in a subprocess, as the harness runs it: a build whose AMX buffers crash is measured again without them
    result = measure_engine(PeerSpec("q4", "llama", str(q4.path), prompt_tokens=24, new_tokens=4, threads=1, vocab=500),
                            timeout_s=300)
    assert not isinstance(result, str), result
    assert result["prefill_s"] > 0 and result["decode_tok_s"] > 0
    assert 0 < gguf_bytes_per_token(q4.path) < safetensors_bytes_per_token(hf) / 4


def test_cli_help_names_the_peers_and_the_extra():
    result = CliRunner().invoke(main, ["bench-peers", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "ONNX Runtime GenAI" in text and "llama.cpp" in text and "[peers]" in text
