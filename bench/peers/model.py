"""The one decoder every engine of the peer harness runs: a random-init Qwen2 with the rsunivlm-1b decoder's shape
(Qwen2-0.5B: 24 layers, hidden 896, 14/2 heads, FFN 4864, vocab 151,936, untied head), written twice.

* ``hf/``: a Hugging Face folder (config.json, BF16 model.safetensors, tokenizer.json): what ONNX Runtime GenAI's
  model builder, llama.cpp's converter and PyTorch eager read.
* ``src/``: the same tensors laid out as an RSUniVLM checkpoint (``llava_qwen_gmoe``: each layer's FFN becomes every
  one of its three experts) with a small random SigLIP, so ``rsvlm-edge convert rsunivlm`` turns it into this
  project's model dir. The vision tower is shrunk because only the decoder is measured.

The weights are drawn by transformers' own initializer and stored in BF16, so every exporter starts from identical
values. Needs the ``peers`` extra (torch, transformers).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from rsvlm_edge.export.rsunivlm_testing import FULL, QWEN2_BPE_TOKENS, SMALL, build_tokenizer, checkpoint_key_map, hf_config
from rsvlm_edge.export.safetensors_stream import CHUNK_BYTES, OutputTensor, from_float_array, write_streamed

#: Decoder at full size, vision tower at the test size (decoder-only measurements).
SOURCE_SIZE = {**FULL, **{k: SMALL[k] for k in ("mm_hidden_size", "vision_mlp", "vision_layers")}}


def qwen2_config(vocab: int = FULL["stored_vocab"]) -> dict[str, Any]:
    """Qwen2 config.json fields of the rsunivlm-1b decoder."""
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "hidden_size": FULL["hidden_size"], "intermediate_size": FULL["intermediate_size"],
        "num_hidden_layers": FULL["num_hidden_layers"], "num_attention_heads": FULL["num_attention_heads"],
        "num_key_value_heads": FULL["num_key_value_heads"], "vocab_size": vocab, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False, "use_sliding_window": False,
        "initializer_range": 0.02, "torch_dtype": "bfloat16",
    }


def write_hf_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Random-init ``Qwen2ForCausalLM`` saved as a Hugging Face folder with a Qwen2-style tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(QWEN2_BPE_TOKENS)
    tok.save(str(out / "tokenizer.json"))
    eos, pad = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "model_max_length": 32768}, indent=2) + "\n")
    torch.manual_seed(seed)
    fields = qwen2_config()
    fields.update(bos_token_id=pad, eos_token_id=eos, pad_token_id=pad)
    model = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in fields.items() if k not in ("architectures", "model_type")}))
    torch.nn.Module.to(model, torch.bfloat16)  # transformers wraps PreTrainedModel.to; the Module method is the plain cast
    model.save_pretrained(out, safe_serialization=True)
    return out


def _hf_name(source: str) -> str | None:
    """RSUniVLM tensor name -> the Qwen2 tensor it copies (experts ``mlp.{e}.`` all copy ``mlp.``); None: vision."""
    if not (source.startswith("model.layers.") or source in ("model.embed_tokens.weight", "model.norm.weight",
                                                             "lm_head.weight")):
        return None
    parts = source.split(".")
    if len(parts) > 4 and parts[3] == "mlp" and parts[4].isdigit():
        del parts[4]
    return ".".join(parts)


def _random_chunks(name: str, shape: tuple[int, ...], index: int, seed: int) -> Iterator[bytes]:
    rng = np.random.default_rng([seed, index])
    values = rng.standard_normal(int(np.prod(shape)), dtype=np.float32) * 0.02
    if "norm" in name and name.endswith("weight"):
        values += 1.0
    yield from_float_array(values, "BF16")


def _copy_chunks(handle: Any, name: str) -> Iterator[bytes]:
    import torch

    flat = handle.get_tensor(name).to(torch.bfloat16).reshape(-1).view(torch.int16).numpy()
    step = CHUNK_BYTES // 2
    for start in range(0, flat.size, step):
        yield flat[start:start + step].tobytes()


def write_rsunivlm_source(hf_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """The Qwen2 weights of ``hf_dir`` as an RSUniVLM folder (see the module docstring), streamed tensor by tensor."""
    from safetensors import safe_open

    hf, out = Path(hf_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(SOURCE_SIZE["bpe_vocab"])
    tok.save(str(out / "tokenizer.json"))
    config = hf_config(SOURCE_SIZE, bos_token_id=tok.token_to_id("<|endoftext|>"),
                       eos_token_id=tok.token_to_id("<|im_end|>"))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shapes = {name: m.shape for name, m in checkpoint_key_map(SOURCE_SIZE).items() if not m.optional}
    with safe_open(str(hf / "model.safetensors"), framework="pt") as handle:
        tensors = []
        for index, (name, shape) in enumerate(shapes.items()):
            copied = _hf_name(name)
            if copied is not None:
                got = tuple(handle.get_slice(copied).get_shape())
                if got != shape:
                    raise ValueError(f"{hf}: {copied} is {got}, the rsunivlm-1b decoder needs {shape}")
                tensors.append(OutputTensor(name, "BF16", shape, partial(_copy_chunks, handle, copied)))
            else:
                tensors.append(OutputTensor(name, "BF16", shape, partial(_random_chunks, name, shape, index, seed)))
        write_streamed(out / "model.safetensors", tensors, metadata={"format": "pt"})
    return out
