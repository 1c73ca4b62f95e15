"""Weight-only decoders with one GroupQueryAttention per layer (shared KV buffer) against the unfused build.

Both builds quantize the same weights the same way, so everything but attention's arithmetic order is equal:
logits must agree to float rounding and greedy tokens exactly, through left-padded batches, decode steps,
multi-token chunks after a past (chat turns; batch > 1 takes the backend's row-by-row path).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from rsvlm_edge.backends.ort_backend import OrtBackend
from rsvlm_edge.cli import main
from rsvlm_edge.engines.ort_fusions import fuse_attention
from rsvlm_edge.export.testing import export_checkpoint, make_checkpoint
from rsvlm_edge.generation import ChatSession, Generator, Request
from rsvlm_edge.manifest import Manifest
from rsvlm_edge.pipeline import load_tokenizer
from rsvlm_edge.sampling import SamplingConfig


def _build(fp32_dir, out, *flags):
    res = CliRunner().invoke(main, ["build", str(fp32_dir), str(out), "--precision", "int8", "--scheme", "weight-only",
                                    *flags])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("ckpt-gqa"))
    fp32 = export_checkpoint(ckpt, tmp_path_factory.mktemp("eng-gqa") / "fp32")
    root = tmp_path_factory.mktemp("wo")
    return _build(fp32, root / "plain", "--no-fuse-attention"), _build(fp32, root / "gqa")


def test_graph_and_manifest(builds):
    plain, gqa = builds
    man = Manifest.load(gqa)
    layers, kv = man.model_config["num_layers"], man.model_config["num_kv_heads"]
    comp = man.component("decoder_expert1")
    assert comp.extra["kv_layout"] == "bnsh-shared" and comp.extra["fused"]["attention"] == layers
    ops = Counter(n.op_type for n in onnx.load(str(gqa / comp.file), load_external_data=False).graph.node)
    # rotary inside GQA, q/k/v packed straight from the stacked projection: no Split left before attention
    assert ops["GroupQueryAttention"] == layers and ops["RotaryEmbedding"] == 0 and ops["Split"] == layers
    assert ops["Softmax"] == 0 and ops["Transpose"] == 0 and ops["Concat"] == 0
    hd = man.config().head_dim
    assert comp.input("past_key_0").shape == ["batch", kv, "capacity", hd]
    assert [t.name for t in comp.outputs][:3] == ["logits", "present_key_0", "present_value_0"]
    assert "kv_layout" not in Manifest.load(plain).component("decoder_expert1").extra
    assert OrtBackend.from_dir(gqa, verify=False).kv_layout == "bnsh-shared"


def _step_logits(engine_dir):
    """Logits of a left-padded batch-2 prefill, 3 decode steps, then a 3-token chunk at batch 2 (row by row)."""
    backend = OrtBackend.from_dir(engine_dir, threads=1, verify=False)
    cfg, rng = backend.config, np.random.default_rng(0)
    b, s, capacity = 2, 9, 24
    mask = np.ones((b, capacity), np.float32)
    mask[1, :4] = 0
    positions = np.maximum(np.cumsum(mask[:, :s], 1) - 1, 0).astype(np.int32)
    cache = backend.new_cache(b, capacity, expert=1)
    out = [backend.forward(cache, rng.normal(size=(b, s, cfg.hidden_size)).astype(np.float32), positions, mask[:, :s])]
    nxt = positions[:, -1:] + 1
    for _ in range(3):
        out.append(backend.forward(cache, rng.normal(size=(b, 1, cfg.hidden_size)).astype(np.float32), nxt,
                                   mask[:, :cache.length + 1]))
        nxt = nxt + 1
    chunk = (nxt + np.arange(3)).astype(np.int32)
    out.append(backend.forward(cache, rng.normal(size=(b, 3, cfg.hidden_size)).astype(np.float32), chunk,
                               mask[:, :cache.length + 3]))
    return np.stack(out)


def test_logits_match_the_unfused_graph(builds):
    plain, gqa = (_step_logits(d) for d in builds)
    err = np.abs(gqa - plain)
    # float rounding (~1e-7), except where it flips the rounding of MatMulNBits' run-time INT8 activations
    # (measured once: 2e-3 against logits of up to 1.4)
    assert np.median(err) < 1e-6 and err.max() < 1e-2 * np.abs(plain).max()


def test_generation_and_chat_match(builds):
    px = [np.random.default_rng(i).normal(size=(3, 128, 128)).astype(np.float32) for i in range(3)]
    prompts = ["[CAP] Describe the image.", "[VG] the ship", "How many planes are there?"]  # different lengths
    sampling = SamplingConfig(max_new_tokens=6, ignore_stop=True)
    results = []
    for d in builds:
        gen = Generator(OrtBackend.from_dir(d, threads=1, verify=False), load_tokenizer(d))
        batch = [g.token_ids for g in gen.generate([Request([p], "rgb", q) for p, q in zip(px, prompts)], sampling)]
        chat = ChatSession(gen, [px[0]], "rgb")
        turns = [chat.ask(q, sampling).token_ids for q in ("[CAP] Describe the image.", "[CAP] And the roads?")]
        results.append((batch, turns, chat.counters["reused_tokens"]))
    assert results[0] == results[1]
    assert results[1][2] > 0  # the second turn reused the cache: a multi-token chunk after a past


def test_fusion_leaves_an_unknown_graph_alone(builds):
    plain, _ = builds
    model = onnx.load(str(plain / "embedding.onnx"), load_external_data=False)
    before = model.SerializeToString()
    assert fuse_attention(model, 4, 2, 64, 4, 10000.0, 1024) == 0
    assert model.SerializeToString() == before


def test_unknown_kv_layout_is_refused(builds, tmp_path):
    import json
    import shutil

    from rsvlm_edge.backends.base import BackendError

    _, gqa = builds
    copy = tmp_path / "copy"
    shutil.copytree(gqa, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for name in manifest["experts"]["components"]:
        manifest["components"][name]["kv_layout"] = "paged"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BackendError, match="KV layout 'paged' is unknown"):
        OrtBackend.from_dir(copy, verify=False)


def test_skip_rms_norm_fusion_keeps_the_logits(tmp_path):
    """Residual Add + RMSNorm -> SkipSimplifiedLayerNormalization on an FP32 decoder: same logits and new K/V."""
    import onnxruntime as ort

    from rsvlm_edge.engines.ort_fusions import fuse_skip_rms_norm

    ckpt = make_checkpoint(tmp_path / "ckpt")
    fp32 = export_checkpoint(ckpt, tmp_path / "fp32")
    man = Manifest.load(fp32)
    cfg = man.config()
    model = onnx.load(str(fp32 / "decoder_expert0.onnx"))  # with its weights, so the copy can sit anywhere
    fused = onnx.ModelProto.FromString(model.SerializeToString())
    assert fuse_skip_rms_norm(fused) == 2 * cfg.num_layers - 1
    assert fuse_skip_rms_norm(onnx.load(str(fp32 / "embedding.onnx"))) == 0  # no RMSNorm there
    rng = np.random.default_rng(0)
    b, s = 2, 5
    feeds = {"inputs_embeds": rng.normal(size=(b, s, cfg.hidden_size)).astype(np.float32),
             "position_ids": np.tile(np.arange(s, dtype=np.int32), (b, 1)),
             "attention_mask": np.ones((b, s), np.float32)}
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            feeds[f"past_{kind}_{i}"] = np.zeros((0, b, cfg.num_kv_heads, cfg.head_dim), np.float32)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    ref, got = (ort.InferenceSession(m.SerializeToString(), so).run(None, feeds) for m in (model, fused))
    for a, c in zip(ref, got):
        np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-5)
