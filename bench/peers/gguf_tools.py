"""llama.cpp's own tools for the GGUF peers, run as subprocesses of the harness::

    python -m rsvlm_edge.bench.peers.gguf_tools convert LLAMA_CPP_DIR HF_DIR OUT.gguf   # convert_hf_to_gguf.py, BF16
    python -m rsvlm_edge.bench.peers.gguf_tools quantize IN.gguf OUT.gguf Q4_0         # llama_model_quantize

``LLAMA_CPP_DIR`` is a llama.cpp source tree (llama-cpp-python's sdist vendors one under ``vendor/llama.cpp``;
scripts/peers.sh unpacks it): its converter runs with its own ``gguf-py``, matching the library that loads the file.
Quantizing goes through the library's C API (llama-cpp-python exposes it), so no llama.cpp binaries are needed.
"""

from __future__ import annotations

import sys
from pathlib import Path

#: GGUF file types the harness quantizes to (llama.cpp's ``LLAMA_FTYPE_MOSTLY_*``).
QUANT_TYPES = ("Q4_0", "Q8_0")


def converter_dir(llama_cpp_dir: str | Path) -> Path:
    """The folder holding convert_hf_to_gguf.py: the tree itself or its ``vendor/llama.cpp`` (an unpacked sdist)."""
    root = Path(llama_cpp_dir)
    for candidate in (root, root / "vendor" / "llama.cpp"):
        if (candidate / "convert_hf_to_gguf.py").is_file() and (candidate / "gguf-py").is_dir():
            return candidate
    raise FileNotFoundError(f"{llama_cpp_dir}: no convert_hf_to_gguf.py with gguf-py beside it (give a llama.cpp "
                            f"source tree or an unpacked llama-cpp-python sdist)")


def convert(llama_cpp_dir: str | Path, hf_dir: str | Path, out_path: str | Path) -> None:
    src = converter_dir(llama_cpp_dir)
    sys.path[:0] = [str(src / "gguf-py"), str(src)]
    from conversion import base  # the converter's package, from the tree just put first on the path

    # The converter names a BPE pre-tokenizer by hashing its output on a test text, and knows only published
    # tokenizers. The harness's tokenizer is byte-level BPE with GPT-2's split (rsunivlm_testing.build_tokenizer),
    # which is what "gpt-2" tells llama.cpp to apply; the benchmark feeds token ids, so this only labels the vocab.
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"  # type: ignore[attr-defined]
    import convert_hf_to_gguf

    sys.argv = ["convert_hf_to_gguf.py", str(hf_dir), "--outfile", str(out_path), "--outtype", "bf16"]
    convert_hf_to_gguf.main()


def quantize(in_path: str | Path, out_path: str | Path, quant_type: str) -> None:
    import llama_cpp

    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant type must be one of {', '.join(QUANT_TYPES)}, got {quant_type!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant_type}")
    code = llama_cpp.llama_model_quantize(str(in_path).encode(), str(out_path).encode(), params)
    if code != 0:
        raise RuntimeError(f"llama_model_quantize {in_path} -> {quant_type} failed with code {code}")


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "convert":
        convert(*argv[1:])
    elif len(argv) == 4 and argv[0] == "quantize":
        quantize(*argv[1:])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
