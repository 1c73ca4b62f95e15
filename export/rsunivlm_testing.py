"""Synthetic RSUniVLM checkpoints for tests: the real folder layout, tensor names and BF16 dtype, random weights.

:func:`make_rsunivlm_checkpoint` writes config.json (the fields the real one carries, values scaled down unless
``full``), tokenizer.json (a small byte-level BPE with Qwen2's special tokens and ``<image>``; the full-shape variant
pads its vocab to Qwen2's 151,643 ordinary tokens), generation_config.json (Qwen2-Instruct style) and
model.safetensors streamed tensor by tensor (the full shape is 3.3 GB on disk and never in memory). Nothing is
downloaded. ``SMALL`` keeps the structure (16 SigLIP heads, 14/2 decoder heads, 3 experts, 27x27 patches at 384 px,
newline, untied head, stored vocab rows above len(tokenizer)) at a size the default test suite converts in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from rsvlm_edge.config import rsunivlm_1b_config
from rsvlm_edge.export.rsunivlm_keys import KeyMapping, rsunivlm_key_map
from rsvlm_edge.export.safetensors_stream import CHUNK_BYTES, OutputTensor, from_float_array, write_streamed

#: Qwen2's special tokens, in id order after the ordinary vocab; ``<image>`` is the checkpoint's added token.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>")
#: Qwen2's ordinary (BPE) vocab size: the full-shape tokenizer pads to it.
QWEN2_BPE_TOKENS = 151643

#: config.json sizes of the scaled-down checkpoint (the full one takes the real values).
SMALL = dict(hidden_size=112, intermediate_size=160, num_hidden_layers=2, num_attention_heads=14,
             num_key_value_heads=2, mm_hidden_size=64, vision_mlp=96, vision_layers=2, bpe_vocab=300, stored_vocab=352)
FULL = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
            num_key_value_heads=2, mm_hidden_size=1152, vision_mlp=4304, vision_layers=26,
            bpe_vocab=QWEN2_BPE_TOKENS, stored_vocab=151936)

_CORPUS = [
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
    "[CAP] Describe the image. A harbour with ships, a road and green fields.",
    "[VG] Where is the windmill? [12, 30, 45, 77]",
    "[SEG] water. 0*24\n1*12, 0*12",
    "[VQA] How many planes are parked? There are 3 planes.",
    "[CCD] Please briefly describe the changes in these two images. New buildings appeared.",
] * 4


def build_tokenizer(bpe_vocab: int) -> Any:
    """A byte-level BPE trained on a few RSUniVLM-style prompts, padded with unreachable filler tokens to
    ``bpe_vocab`` ordinary tokens, then Qwen2's specials (no BOS, no post-processor, like Qwen2's)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(bpe_vocab, 300), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for i in range(len(vocab), bpe_vocab):
        vocab[f"<|filler_{i}|>"] = i
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def hf_config(size: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """config.json as a LLaVA-OneVision / RSUniVLM training run saves it (Qwen2 fields + LLaVA mm_* fields)."""
    cfg = {
        "_name_or_path": "RSUniVLM",
        "architectures": ["LlavaQwenGMoeForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": size["hidden_size"],
        "image_aspect_ratio": "square",
        "image_crop_resolution": None,
        "image_grid_pinpoints": [[384, 384], [384, 768], [768, 384], [768, 768]],
        "image_split_resolution": None,
        "initializer_range": 0.02,
        "intermediate_size": size["intermediate_size"],
        "max_position_embeddings": 32768,
        "max_window_layers": 24,
        "mm_hidden_size": size["mm_hidden_size"],
        "mm_newline_position": "one_token",
        "mm_patch_merge_type": "spatial_unpad",
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_resampler_type": None,
        "mm_spatial_pool_mode": "bilinear",
        "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "google/siglip-so400m-patch14-384",
        "model_type": "llava_qwen_gmoe",
        "num_attention_heads": size["num_attention_heads"],
        "num_hidden_layers": size["num_hidden_layers"],
        "num_key_value_heads": size["num_key_value_heads"],
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "tokenizer_model_max_length": 32768,
        "tokenizer_padding_side": "right",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.45.2",
        "use_cache": True,
        "use_mm_proj": True,
        "use_pos_skipping": False,
        "use_sliding_window": False,
        "vision_tower_pretrained": None,
        "vocab_size": size["stored_vocab"],
    }
    cfg.update(overrides)
    return cfg


def checkpoint_key_map(size: dict[str, Any], tie: bool = False, newline: bool = True) -> dict[str, KeyMapping]:
    """The source tensors (names, shapes) a checkpoint of ``size`` holds, from the converter's own table."""
    import dataclasses

    cfg = dataclasses.replace(
        rsunivlm_1b_config(), vision_width=size["mm_hidden_size"], vision_mlp=size["vision_mlp"],
        vision_layers=size["vision_layers"], hidden_size=size["hidden_size"],
        intermediate_size=size["intermediate_size"], num_layers=size["num_hidden_layers"],
        num_heads=size["num_attention_heads"], num_kv_heads=size["num_key_value_heads"],
        vocab_size=size["stored_vocab"], tie_word_embeddings=tie, image_newline=newline)
    return rsunivlm_key_map(cfg, size["stored_vocab"])


def write_random_weights(path: str | Path, shapes: dict[str, tuple[int, ...]], seed: int = 0, dtype: str = "BF16",
                         std: float = 0.02) -> int:
    """Random normal weights (LayerNorm / RMSNorm weights near 1) streamed into a safetensors file."""

    def tensor(name: str, shape: tuple[int, ...], index: int) -> OutputTensor:
        def chunks():
            rng = np.random.default_rng([seed, index])
            remaining = int(np.prod(shape, dtype=np.int64))
            step = CHUNK_BYTES // 4
            norm = "norm" in name and name.endswith("weight")
            while remaining:
                n = min(step, remaining)
                values = rng.standard_normal(n, dtype=np.float32) * std
                if norm:
                    values += 1.0
                remaining -= n
                yield from_float_array(values, dtype)

        return OutputTensor(name, dtype, shape, chunks)

    tensors = [tensor(name, shape, i) for i, (name, shape) in enumerate(shapes.items())]
    return write_streamed(path, tensors, metadata={"format": "pt"})


def make_rsunivlm_checkpoint(directory: str | Path, full: bool = False, seed: int = 0, tie: bool = False,
                             newline: bool = True, generation_config: bool = True, **config_overrides: Any) -> Path:
    """A synthetic RSUniVLM folder in ``directory`` (see the module docstring). ``config_overrides`` replace
    config.json fields (after the sizes), e.g. ``image_aspect_ratio="pad"``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    size = FULL if full else SMALL
    tok = build_tokenizer(size["bpe_vocab"])
    tok.save(str(directory / "tokenizer.json"))
    merge = "spatial_unpad" if newline else "flat"
    config = hf_config(size, tie_word_embeddings=tie, mm_patch_merge_type=merge,
                       bos_token_id=tok.token_to_id("<|endoftext|>"), eos_token_id=tok.token_to_id("<|im_end|>"))
    config.update(config_overrides)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if generation_config:
        end, eot = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
        gen = {"bos_token_id": eot, "do_sample": True, "eos_token_id": [end, eot], "pad_token_id": eot,
               "repetition_penalty": 1.1, "temperature": 0.7, "top_k": 20, "top_p": 0.8,
               "transformers_version": "4.45.2"}
        (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    shapes = {name: m.shape for name, m in checkpoint_key_map(size, tie=tie, newline=newline).items()
              if not m.optional}  # a tied model saved by HF stores embed_tokens only
    write_random_weights(directory / "model.safetensors", shapes, seed=seed)
    return directory
