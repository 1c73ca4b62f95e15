"""Weight bytes one decode step reads, from each engine's own files: every weight once, except an embedding table
that only a lookup reads (one row per token). A head tied to the table reads all of it, so it counts whole."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from rsvlm_edge.bench.weights import engine_active_bytes

#: ONNX element sizes in bits (TensorProto data types that weights come in).
ONNX_BITS = {1: 32, 2: 8, 3: 8, 10: 16, 11: 64, 16: 16, 21: 4, 22: 4, 6: 32, 7: 64}
#: Ops whose first input is a table read by row.
LOOKUP_OPS = ("Gather", "GatherBlockQuantized")


def lookup_adjusted(sizes: dict[str, int], rows: dict[str, int], readers: dict[str, list[str]]) -> int:
    """Sum of ``sizes`` where a table whose every reader is a lookup counts one row (``size / rows[name]``).
    ``readers``: initializer -> the op types that read it. Pure, so the rule is tested without any engine."""
    total = 0
    for name, size in sizes.items():
        ops = readers.get(name, [])
        looked_up = bool(ops) and all(op in LOOKUP_OPS for op in ops) and rows.get(name, 0) > 0
        total += size // rows[name] if looked_up else size
    return total


def onnx_bytes_per_token(model_dir: str | Path) -> int:
    """An ONNX Runtime GenAI dir: the initializers of its model.onnx (external data included, by declared size)."""
    import onnx

    model = onnx.load(str(Path(model_dir) / "model.onnx"), load_external_data=False)
    sizes, rows = {}, {}
    for init in model.graph.initializer:
        external = {e.key: e.value for e in init.external_data}
        count = 1
        for d in init.dims:
            count *= d
        sizes[init.name] = int(external["length"]) if "length" in external else (
            len(init.raw_data) if init.raw_data else count * ONNX_BITS.get(init.data_type, 32) // 8)
        rows[init.name] = int(init.dims[0]) if init.dims else 0
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in sizes:
                readers.setdefault(name, []).append(node.op_type if i == 0 else f"{node.op_type}:{i}")
    return lookup_adjusted(sizes, rows, readers)


def gguf_bytes_per_token(path: str | Path) -> int:
    """A GGUF file: every tensor, with ``token_embd.weight`` as one row unless there is no separate ``output``."""
    from gguf import GGUFReader

    tensors = GGUFReader(str(path)).tensors
    names = {t.name for t in tensors}
    sizes = {t.name: int(t.n_bytes) for t in tensors}
    rows = {t.name: int(t.shape[-1]) for t in tensors}  # GGUF lists dims fastest-first: rows are last
    readers = {name: ["Gather"] if name == "token_embd.weight" and "output.weight" in names else ["MatMul"]
               for name in names}
    return lookup_adjusted(sizes, rows, readers)


def safetensors_bytes_per_token(model_dir: str | Path, bytes_per_weight: int = 4) -> int:
    """A Hugging Face dir run in FP32 by PyTorch eager (every tensor at ``bytes_per_weight``), from the header."""
    path = Path(model_dir) / "model.safetensors"
    with open(path, "rb") as fh:
        header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
    header.pop("__metadata__", None)
    tied = json.loads((Path(model_dir) / "config.json").read_text()).get("tie_word_embeddings", False)
    sizes, rows = {}, {}
    for name, info in header.items():
        count = 1
        for d in info["shape"]:
            count *= d
        sizes[name] = count * bytes_per_weight
        rows[name] = int(info["shape"][0]) if info["shape"] else 0
    readers = {name: ["Gather"] if name.endswith("embed_tokens.weight") and not tied else ["MatMul"] for name in sizes}
    return lookup_adjusted(sizes, rows, readers)


def bytes_per_token(kind: str, path: str | Path) -> int:
    if kind == "rsvlm":
        return engine_active_bytes(path)
    if kind == "genai":
        return onnx_bytes_per_token(path)
    if kind == "llama":
        return gguf_bytes_per_token(path)
    if kind == "torch":
        return safetensors_bytes_per_token(path)
    raise ValueError(f"unknown engine kind {kind!r}")
