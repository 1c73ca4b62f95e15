"""`rsvlm-edge convert rsunivlm`: synthetic RSUniVLM checkpoints (real names, BF16, random weights) convert into model
dirs whose tensors equal the source after the key map; every bad input gives one line, exit code 2, no output dir."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rsvlm_edge.cli import main
from rsvlm_edge.export.rsunivlm_keys import SIGLIP, map_state_dict, rsunivlm_key_map, target_shapes
from rsvlm_edge.export.rsunivlm_testing import SMALL, make_rsunivlm_checkpoint

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")


@pytest.fixture(scope="module")
def small_src(tmp_path_factory) -> Path:
    return make_rsunivlm_checkpoint(tmp_path_factory.mktemp("rsunivlm") / "src", seed=1)


def copy_src(src: Path, tmp_path: Path, name: str = "src") -> Path:
    out = tmp_path / name
    shutil.copytree(src, out)
    return out


def convert(src: Path, out: Path, *args: str):
    return CliRunner().invoke(main, ["convert", "rsunivlm", str(src), str(out), "--no-progress", *args])


def assert_refused(result, out: Path, *words: str) -> str:
    """Exit 2, one line naming the problem, no traceback, and nothing at OUT_DIR nor beside it."""
    text = result.output.strip()
    assert result.exit_code == 2, text
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    for word in words:
        assert word in text, text
    assert not out.exists() or not any(out.iterdir())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return text


def load(path: Path) -> dict:
    return safetensors_torch.load_file(str(path))


def rewrite_weights(src: Path, edit) -> None:
    """Load the (small) source tensors, let ``edit`` change the dict, save it back as the checkpoint."""
    tensors = load(src / "model.safetensors")
    edit(tensors)
    safetensors_torch.save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})


def edit_config(src: Path, **fields) -> None:
    path = src / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(fields)
    path.write_text(json.dumps(cfg))


# --------------------------------------------------------------------------------------------------- good input


def test_convert_small_checkpoint_equals_source_after_mapping(small_src, tmp_path):
    out = tmp_path / "model"
    result = convert(small_src, out)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "disk:" in result.output and "peak RAM" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "convert.json", "generation_config.json",
                                                     "model.safetensors", "tokenizer.json"]
    cfg = json.loads((out / "config.json").read_text())
    from tokenizers import Tokenizer

    tok_len = Tokenizer.from_file(str(small_src / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    assert cfg["vocab_size"] == tok_len < SMALL["stored_vocab"]  # rows cut to len(tokenizer)
    assert (cfg["image_preprocess"], cfg["prompt_template"], cfg["image_newline"]) == ("siglip-square", "qwen_1_5", True)
    assert not cfg["vision_stems"] and not cfg["vision_feature_norm"] and not cfg["router"]
    assert (cfg["vision_width"], cfg["vision_layers"], cfg["vision_heads"], cfg["num_layers"]) == (
        SMALL["mm_hidden_size"], SMALL["vision_layers"], 16, SMALL["num_hidden_layers"])
    for name in ("tokenizer.json", "generation_config.json"):
        assert (out / name).read_bytes() == (small_src / name).read_bytes()

    from rsvlm_edge.config import ModelConfig

    source = load(small_src / "model.safetensors")
    assert {t.dtype for t in source.values()} == {torch.bfloat16}
    key_map = rsunivlm_key_map(ModelConfig.load(out / "config.json"), SMALL["stored_vocab"])
    expected = map_state_dict(source, key_map)
    converted = load(out / "model.safetensors")
    assert list(converted) == list(expected)
    for key, value in expected.items():
        assert converted[key].dtype == torch.float16
        assert torch.equal(converted[key], value.to(torch.float16)), key  # same rounding as torch's cast
    q, k, v = (source[f"{SIGLIP}encoder.layers.1.self_attn.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(converted["vision.blocks.1.qkv.weight"], torch.cat([q, k, v]).half())
    assert torch.equal(converted["layers.1.experts.2.down_proj.weight"],
                       source["model.layers.1.mlp.2.down_proj.weight"].half())
    assert converted["vision.pos_embed"].shape == (1, 729, SMALL["mm_hidden_size"])

    provenance = json.loads((out / "convert.json").read_text())
    import hashlib

    assert provenance["source"]["model.safetensors"]["sha256"] == hashlib.sha256(
        (small_src / "model.safetensors").read_bytes()).hexdigest()
    assert provenance["dtype"] == {"source": "BF16", "output": "F16"}
    assert provenance["vocab"] == {"stored_rows": SMALL["stored_vocab"], "len_tokenizer": tok_len,
                                   "added_im_patch_token": False}
    assert provenance["config_fields"]["image_aspect_ratio"] == "square"
    assert sorted(provenance["not_stored"]) == [f"{SIGLIP}post_layernorm.bias", f"{SIGLIP}post_layernorm.weight"]


def test_key_map_targets_are_exactly_our_models_state_dict(small_src, tmp_path):
    from rsvlm_edge.config import ModelConfig, rsunivlm_1b_config
    from rsvlm_edge.modeling import build_model

    for cfg in (rsunivlm_1b_config(), ModelConfig.load(_converted(small_src, tmp_path) / "config.json")):
        ours = {k: tuple(v.shape) for k, v in build_model(cfg, device="meta", seed=None).state_dict().items()}
        assert target_shapes(rsunivlm_key_map(cfg, 151936)) == ours


def _converted(src: Path, tmp_path: Path, *args: str) -> Path:
    out = tmp_path / "model"
    result = convert(src, out, *args)
    assert result.exit_code == 0, result.output
    return out


def test_load_model_reads_the_converted_dir(small_src, tmp_path):
    from rsvlm_edge.modeling import load_model

    out = _converted(small_src, tmp_path, "--dtype", "fp32")
    model = load_model(out)
    source = load(small_src / "model.safetensors")
    assert torch.equal(model.embed_tokens.weight, source["model.embed_tokens.weight"][: model.cfg.vocab_size].float())
    assert torch.equal(model.vision.newline, source["model.image_newline"].float())
    pixels = torch.zeros(1, 3, 384, 384)
    assert model.encode_images(pixels, "rgb").shape == (1, 730, SMALL["hidden_size"])


@pytest.mark.parametrize("dtype,torch_dtype", [("fp32", "float32"), ("bf16", "bfloat16")])
def test_other_output_dtypes_are_exact(small_src, tmp_path, dtype, torch_dtype):
    out = _converted(small_src, tmp_path, "--dtype", dtype)
    source = load(small_src / "model.safetensors")
    converted = load(out / "model.safetensors")
    assert torch.equal(converted["lm_head.weight"],
                       source["lm_head.weight"][: converted["lm_head.weight"].shape[0]].to(getattr(torch, torch_dtype)))


def test_pad_flat_tied_and_im_patch_variants(tmp_path):
    src = make_rsunivlm_checkpoint(tmp_path / "src", tie=True, newline=False, generation_config=False,
                                   image_aspect_ratio="pad", mm_use_im_patch_token=True)
    out = _converted(src, tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["image_preprocess"] == "siglip-pad" and cfg["image_newline"] is False and cfg["tie_word_embeddings"]
    converted = load(out / "model.safetensors")
    assert "lm_head.weight" not in converted and "vision.newline" not in converted
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))  # builder.py adds <im_patch>, then resizes to len()
    assert tok.token_to_id("<im_patch>") == cfg["vocab_size"] - 1
    assert converted["embed_tokens.weight"].shape[0] == cfg["vocab_size"]
    assert not (out / "generation_config.json").exists()


def test_tied_model_with_a_different_stored_head_warns(tmp_path):
    src = make_rsunivlm_checkpoint(tmp_path / "src", tie=True)
    rewrite_weights(src, lambda t: t.update({"lm_head.weight": torch.ones_like(t["model.embed_tokens.weight"])}))
    result = convert(src, tmp_path / "model")
    assert result.exit_code == 0 and "warning: tie_word_embeddings is true" in result.output


def test_sharded_checkpoint(small_src, tmp_path):
    src = copy_src(small_src, tmp_path)
    tensors = load(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        safetensors_torch.save_file({k: tensors[k] for k in keys}, str(src / file), metadata={"format": "pt"})
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = _converted(src, tmp_path)
    reference = load(_converted(small_src, tmp_path / "single") / "model.safetensors")
    converted = load(out / "model.safetensors")
    assert all(torch.equal(converted[k], reference[k]) for k in reference)


def test_overwrite_replaces_an_existing_dir(small_src, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    result = convert(small_src, out)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert [p.name for p in out.iterdir()] == ["stale.txt"]  # refused: untouched
    assert convert(small_src, out, "--overwrite").exit_code == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()


# --------------------------------------------------------------------------------------------------- bad input


def test_truncated_safetensors(small_src, tmp_path):
    src = copy_src(small_src, tmp_path)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) - 1000])
    assert_refused(convert(src, tmp_path / "model"), tmp_path / "model", "model.safetensors", "truncated")
    (src / "model.safetensors").write_bytes(data[:100])
    assert_refused(convert(src, tmp_path / "model"), tmp_path / "model", "model.safetensors")
    (src / "model.safetensors").write_bytes(b"<html>404 not found</html>")
    assert_refused(convert(src, tmp_path / "model"), tmp_path / "model", "not a safetensors file")


@pytest.mark.parametrize("fields,words", [
    ({"model_type": "llava_qwen", "architectures": ["LlavaQwenForCausalLM"]}, ["llava_qwen", "llava_qwen_gmoe"]),
    ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, ["qwen2", "not RSUniVLM"]),
    ({"architectures": ["LlavaLlamaForCausalLM"]}, ["LlavaLlamaForCausalLM"]),
    ({"image_aspect_ratio": "anyres_max_9"}, ["image_aspect_ratio", "anyres_max_9"]),
    ({"image_aspect_ratio": None}, ["image_aspect_ratio"]),
    ({"mm_use_im_start_end": True}, ["mm_use_im_start_end"]),
    ({"mm_resampler_type": "spatial_pool"}, ["mm_resampler_type"]),
    ({"mm_projector_type": "linear"}, ["mm_projector_type"]),
    ({"mm_vision_tower": "openai/clip-vit-large-patch14-336"}, ["mm_vision_tower", "SigLIP"]),
    ({"use_sliding_window": True}, ["use_sliding_window"]),
    ({"mm_hidden_size": 1152}, ["mm_hidden_size"]),
    ({"hidden_size": None}, ["hidden_size"]),
    ({"vocab_size": 100}, ["vocab_size", "tokenizer"]),
    ({"num_hidden_layers": 3}, ["missing", "model.layers.2."]),
    ({"num_key_value_heads": 7}, ["another shape", "k_proj"]),
])
def test_config_json_refusals(small_src, tmp_path, fields, words):
    src = copy_src(small_src, tmp_path)
    edit_config(src, **fields)
    assert_refused(convert(src, tmp_path / "model"), tmp_path / "model", *words)


def test_plain_qwen2_keys_under_the_rsunivlm_tag(small_src, tmp_path):
    """Another architecture's tensors behind a copied config.json: the missing / unexpected lists say so."""
    src = copy_src(small_src, tmp_path)

    def dense(t):
        for name in [k for k in t if ".mlp." in k and k.startswith("model.layers.")]:
            layer, proj = name.split(".mlp.")[0], name.rsplit(".", 2)[-2]
            t[f"{layer}.mlp.{proj}.weight"] = t.pop(name)
        for name in [k for k in t if k.startswith("model.vision_tower") or k.startswith("model.mm_projector")]:
            del t[name]

    rewrite_weights(src, dense)
    text = assert_refused(convert(src, tmp_path / "model"), tmp_path / "model", "missing", "unexpected",
                          "model.layers.0.mlp.gate_proj.weight", "and ")
    assert len(text) < 3000  # lists are cut at ten names each


@pytest.mark.parametrize("case,words", [
    ("missing", ["1 missing", "model.layers.1.mlp.2.up_proj.weight"]),
    ("extra", ["1 unexpected", "model.router.weight"]),
    ("shape", ["another shape", "model.norm.weight [7]"]),
    ("dtype", ["mixes tensor dtypes", "F32", "BF16"]),
    ("int", ["non-float", "I64"]),
])
def test_tensor_refusals(small_src, tmp_path, case, words):
    src = copy_src(small_src, tmp_path)
    edits = {
        "missing": lambda t: t.pop("model.layers.1.mlp.2.up_proj.weight"),
        "extra": lambda t: t.update({"model.router.weight": torch.zeros(3, 4, dtype=torch.bfloat16)}),
        "shape": lambda t: t.update({"model.norm.weight": torch.zeros(7, dtype=torch.bfloat16)}),
        "dtype": lambda t: t.update({"model.norm.weight": t["model.norm.weight"].float()}),
        "int": lambda t: t.update({k: torch.zeros(t[k].shape, dtype=torch.int64) for k in t}),
    }
    rewrite_weights(src, edits[case])
    assert_refused(convert(src, tmp_path / "model"), tmp_path / "model", *words)


def test_missing_files(small_src, tmp_path):
    for name, words in (("tokenizer.json", ["tokenizer.json", "missing"]), ("config.json", ["config.json"]),
                        ("model.safetensors", ["model.safetensors.index.json"])):
        src = copy_src(small_src, tmp_path, f"src-{name}")
        (src / name).unlink()
        assert_refused(convert(src, tmp_path / "model"), tmp_path / "model", *words)
    assert_refused(convert(tmp_path / "nowhere", tmp_path / "model"), tmp_path / "model", "not found")


def test_tokenizer_without_chatml_tokens(small_src, tmp_path):
    from tokenizers import Tokenizer, models

    src = copy_src(small_src, tmp_path)
    Tokenizer(models.BPE()).save(str(src / "tokenizer.json"))
    assert_refused(convert(src, tmp_path / "model"), tmp_path / "model", "<|im_start|>", "ChatML")


def test_values_beyond_float16_are_refused_for_fp16_only(small_src, tmp_path):
    src = copy_src(small_src, tmp_path)
    rewrite_weights(src, lambda t: t["model.norm.weight"].__setitem__(0, 1e6))
    assert_refused(convert(src, tmp_path / "model"), tmp_path / "model", "model.norm.weight", "--dtype")
    assert convert(src, tmp_path / "model", "--dtype", "fp32").exit_code == 0


def test_crash_midway_leaves_no_output(small_src, tmp_path, monkeypatch):
    import rsvlm_edge.export.convert_rsunivlm as conv

    calls = {"n": 0}
    real = conv.from_float_array

    def failing(values, dtype):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError(28, "No space left on device")
        return real(values, dtype)

    monkeypatch.setattr(conv, "from_float_array", failing)
    out = tmp_path / "model"
    assert_refused(convert(small_src, out), out, "No space left on device")
    assert not out.exists()

    def interrupted(values, dtype):
        raise KeyboardInterrupt

    monkeypatch.setattr(conv, "from_float_array", interrupted)
    result = convert(small_src, out)
    assert result.exit_code != 0 and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model.")]


def test_map_state_dict_works_on_numpy(small_src):
    """The parity tests' entry point: the same map applied in memory (numpy here, torch above)."""
    from rsvlm_edge.config import ModelConfig, rsunivlm_1b_config

    cfg = ModelConfig(**{**rsunivlm_1b_config().to_dict(), "vision_width": 64, "vision_mlp": 96, "vision_layers": 2,
                         "hidden_size": 112, "intermediate_size": 160, "num_layers": 2, "vocab_size": 300})
    key_map = rsunivlm_key_map(cfg, SMALL["stored_vocab"])
    source = {k: np.asarray(v.float()) for k, v in load(small_src / "model.safetensors").items()}
    ours = map_state_dict(source, key_map)
    assert ours["embed_tokens.weight"].shape == (300, 112)
    np.testing.assert_array_equal(ours["vision.blocks.0.qkv.bias"], np.concatenate(
        [source[f"{SIGLIP}encoder.layers.0.self_attn.{n}_proj.bias"] for n in "qkv"]))


@pytest.mark.slow
def test_full_shape_checkpoint_converts(tmp_path):
    """RSUniVLM's real shapes (3.3 GB BF16 on disk): the converter streams it into an rsunivlm-1b dir whose tensors
    are our model's state dict (checked from the header, without loading 3.3 GB) and equal the source's."""
    from safetensors import safe_open

    from rsvlm_edge.config import ModelConfig
    from rsvlm_edge.export.safetensors_stream import read_index
    from rsvlm_edge.modeling import build_model

    src = make_rsunivlm_checkpoint(tmp_path / "src", full=True)
    out = _converted(src, tmp_path)
    cfg = ModelConfig.load(out / "config.json")
    assert cfg.name == "rsunivlm-1b" and cfg.vocab_size == 151647 and cfg.num_visual_tokens == 730
    ours = {k: tuple(v.shape) for k, v in build_model(cfg, device="meta", seed=None).state_dict().items()}
    assert {k: t.shape for k, t in read_index(out / "model.safetensors").items()} == ours
    with safe_open(str(src / "model.safetensors"), "pt") as theirs, safe_open(str(out / "model.safetensors"), "pt") as st:
        for mine, name in (("layers.23.experts.1.gate_proj.weight", "model.layers.23.mlp.1.gate_proj.weight"),
                           ("vision.blocks.25.fc2.weight", f"{SIGLIP}encoder.layers.25.mlp.fc2.weight")):
            assert torch.equal(st.get_tensor(mine), theirs.get_tensor(name).half())
        assert torch.equal(st.get_tensor("lm_head.weight"), theirs.get_tensor("lm_head.weight")[:151647].half())


def test_engine_dirs_keep_the_checkpoints_generation_config(small_src, tmp_path):
    """convert -> export -> build INT8: the generation defaults (eos ids, repetition penalty) travel into every engine
    dir, hashed like the graphs, and the pipeline over the engines answers with them."""
    from rsvlm_edge.manifest import Manifest
    from rsvlm_edge.pipeline import Pipeline

    model = _converted(small_src, tmp_path)
    engines, int8 = tmp_path / "engines", tmp_path / "int8"
    runner = CliRunner()
    result = runner.invoke(main, ["export", str(model), str(engines), "--no-check"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["build", str(engines), str(int8), "--precision", "int8", "--scheme", "weight-only"])
    assert result.exit_code == 0, result.output
    source = json.loads((small_src / "generation_config.json").read_text())
    for directory in (engines, int8):
        manifest = Manifest.load(directory)
        assert manifest.generation_config is not None and "generation_config.json" in manifest.all_files()
        assert json.loads((directory / "generation_config.json").read_text()) == source
        with Pipeline(directory) as pipe:
            assert pipe.generator.defaults.repetition_penalty == source["repetition_penalty"]
            assert set(pipe.generator.defaults.eos_token_ids) == set(source["eos_token_id"])
    (engines / "generation_config.json").write_text(json.dumps({**source, "repetition_penalty": 9.0}))
    with pytest.raises(Exception, match="generation_config.json"):
        Manifest.load(engines)  # altered after export: refused like any other listed file
