"""What a benchmark figure was measured on: the CPU model and the vector ISA that decides the engines' kernels.

Every printed figure names its machine (README rule), and the kernels ONNX Runtime picks differ between AVX2,
AVX-512, VNNI and AMX on x86 and NEON/SVE on ARM, so the line carries those flags too."""

from __future__ import annotations

import platform
from pathlib import Path

#: /proc/cpuinfo flag -> the name printed, in the order printed.
ISA_FLAGS = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "VNNI"), ("avx_vnni", "AVX-VNNI"),
             ("amx_tile", "AMX"), ("asimd", "NEON"), ("asimddp", "dotprod"), ("sve", "SVE"))


def parse_cpuinfo(text: str) -> tuple[str, list[str]]:
    """(CPU model, ISA names) from /proc/cpuinfo text: x86 ``model name`` / ``flags``, ARM ``CPU part`` /
    ``Features`` (ARM kernels print no model name)."""
    model, flags = "", set[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "Hardware") and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, [name for flag, name in ISA_FLAGS if flag in flags]


def cpu_description(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """``Intel(R) Xeon(R) Processor (AVX2, AVX-512, VNNI, AMX)``: the model and the ISA flags that matter."""
    try:
        model, isa = parse_cpuinfo(Path(cpuinfo).read_text(encoding="utf-8", errors="replace"))
    except OSError:
        model, isa = "", []
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    return f"{model} ({', '.join(isa)})" if isa else model
