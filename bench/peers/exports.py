"""Every engine of the peer table built from the one decoder (:mod:`.model`), each by its project's own tool:

    hf/ ──convert rsunivlm──▶ model/ ──export──▶ rsvlm/fp32 ──build──▶ rsvlm/int8-weight-only, rsvlm/int8-dynamic, rsvlm/int4
     │                                              └──calibrate──▶ rsvlm/int8-qdq
     ├──onnxruntime_genai.models.builder──▶ genai/int4, genai/int8
     └──convert_hf_to_gguf.py──▶ gguf/bf16.gguf ──llama_model_quantize──▶ gguf/Q4_0.gguf, gguf/Q8_0.gguf

Each step runs as a subprocess into a ``.partial`` path renamed on success, so a work dir can be re-used: steps whose
output exists are skipped, and a failed step leaves nothing half-written.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

CLI = [sys.executable, "-m", "rsvlm_edge.cli"]
GGUF = [sys.executable, "-m", "rsvlm_edge.bench.peers.gguf_tools"]
PARTIAL = "{out}"  # placeholder in a step's command for its staging path


@dataclass(frozen=True)
class Engine:
    """One column of the table: its label, how the worker runs it (worker.RUNNERS) and the path it runs."""

    name: str
    kind: str
    path: Path


@dataclass
class Step:
    out: Path
    command: list[str]
    needs: list[Path] = field(default_factory=list)

    def staged(self) -> Path:
        return self.out.with_name(f".{self.out.name}.partial")

    def argv(self) -> list[str]:
        return [str(self.staged()) if a == PARTIAL else a for a in self.command]


def available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def int4_supported() -> bool:
    """Whether this checkout's `rsvlm-edge build` offers ``--precision int4``."""
    from rsvlm_edge.engines.cli import build_command

    option = next(p for p in build_command.params if p.name == "precision")
    return "int4" in getattr(option.type, "choices", ())


def plan(work: Path, calib_images: list[str], llama_cpp_dir: Path | None) -> tuple[list[Step], list[Engine], list[str]]:
    """The steps to build, the engines they give (table order) and why any peer is left out."""
    hf, model, rsvlm = work / "hf", work / "model", work / "rsvlm"
    steps = [Step(model, CLI + ["convert", "rsunivlm", str(work / "src"), PARTIAL, "--dtype", "bf16", "--no-progress"]),
             Step(rsvlm / "fp32", CLI + ["export", str(model), PARTIAL, "--no-check"]),
             Step(rsvlm / "int8-weight-only", CLI + ["build", str(rsvlm / "fp32"), PARTIAL, "--precision", "int8",
                                                     "--scheme", "weight-only"]),
             Step(rsvlm / "int8-dynamic", CLI + ["build", str(rsvlm / "fp32"), PARTIAL, "--precision", "int8",
                                                 "--scheme", "weight-only", "--decoder-kernel", "dynamic"]),
             Step(rsvlm / "int8-qdq", CLI + ["calibrate", str(rsvlm / "fp32"), *calib_images, "--out", PARTIAL,
                                             "--method", "minmax", "--limit", str(len(calib_images)),
                                             "--decode-steps", "2"])]
    engines = [Engine("rsvlm-edge INT8 weight-only", "rsvlm", rsvlm / "int8-weight-only"),
               Engine("rsvlm-edge INT8 weight-only, dynamic kernel", "rsvlm", rsvlm / "int8-dynamic"),
               Engine("rsvlm-edge INT8 Q/DQ", "rsvlm", rsvlm / "int8-qdq"),
               Engine("rsvlm-edge FP32", "rsvlm", rsvlm / "fp32")]
    skipped = []
    if int4_supported():
        steps.append(Step(rsvlm / "int4", CLI + ["build", str(rsvlm / "fp32"), PARTIAL, "--precision", "int4"]))
        engines.insert(0, Engine("rsvlm-edge INT4 weight-only", "rsvlm", rsvlm / "int4"))
    else:
        skipped.append("rsvlm-edge INT4: this checkout's `rsvlm-edge build` has no --precision int4")
    if available("onnxruntime_genai"):
        for bits in ("int4", "int8"):
            steps.append(Step(work / "genai" / bits, [sys.executable, "-m", "onnxruntime_genai.models.builder",
                                                      "-i", str(hf), "-o", PARTIAL, "-p", bits, "-e", "cpu",
                                                      "-c", str(work / "genai" / "cache")]))
            engines.append(Engine(f"ONNX Runtime GenAI {bits} (model builder)", "genai", work / "genai" / bits))
    else:
        skipped.append("ONNX Runtime GenAI: onnxruntime-genai is not installed (pip install 'rsvlm-edge[peers]')")
    if not available("llama_cpp"):
        skipped.append("llama.cpp: llama-cpp-python is not installed (scripts/peers.sh builds it)")
    elif llama_cpp_dir is None:
        skipped.append("llama.cpp: no llama.cpp source tree for convert_hf_to_gguf.py (--llama-cpp DIR)")
    else:
        bf16 = work / "gguf" / "bf16.gguf"
        steps.append(Step(bf16, GGUF + ["convert", str(llama_cpp_dir), str(hf), PARTIAL]))
        for quant in ("Q4_0", "Q8_0"):
            out = work / "gguf" / f"{quant}.gguf"
            steps.append(Step(out, GGUF + ["quantize", str(bf16), PARTIAL, quant]))
            engines.append(Engine(f"llama.cpp {quant}", "llama", out))
    engines.append(Engine("PyTorch eager FP32", "torch", hf))
    return steps, engines, skipped


def run_step(step: Step, log: Path) -> None:
    """Run one step unless its output exists; its output goes to ``log`` (appended), shown if it fails."""
    if step.out.exists():
        return
    staged = step.staged()
    _remove(staged)
    staged.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(step.argv())}\n")
        fh.flush()
        code = subprocess.run(step.argv(), stdout=fh, stderr=subprocess.STDOUT).returncode
    if code != 0 or not staged.exists():
        _remove(staged)
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{step.out.name}: `{' '.join(step.argv())}` failed (exit code {code}); log {log}:\n{tail}")
    staged.rename(step.out)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
