"""Export a model to an ONNX engine directory (graphs + external data + manifest), component by component.

Directory written (``--precision fp32``; the fp16 layout is the same)::

    manifest.json  config.json  tokenizer.json
    vision_stem_<sensor>.onnx + .bin     one per sensor (none when model_config.vision_stems is false)
    vision_encoder.onnx + .bin           shared ViT/CNN/projector
    embedding.onnx + .bin
    router.onnx + .bin                   absent when model_config.router is false (tag-routed models)
    decoder_expert<e>.onnx               e = 0..2, identical graphs except where their expert weights live
    decoder_trunk.bin                    attention, norms, final norm, lm_head: referenced by all three graphs
    decoder_expert<e>.bin                expert e's FFN weights (same tensor layout in every expert file)

Everything is written into a temporary sibling directory and moved into place at the end, so an interrupted
or failed export never leaves a half-written OUT_DIR.
"""

from __future__ import annotations

import gc
import io
import json
import re
import resource
import shutil
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import onnx
import torch

from rsvlm_edge import __version__
from rsvlm_edge.config import EXPERT_NAMES
from rsvlm_edge.export.checks import ExportCheckError, check_graph_file, parity_decoder, parity_simple
from rsvlm_edge.export.components import EXPERT_PARAM, ComponentSpec, component_specs
from rsvlm_edge.export.fp16 import convert_to_fp16
from rsvlm_edge.export.graph import (
    Graph,
    decompose_layer_norm,
    fold_constants,
    fold_weight_transposes,
    lift_weights,
    prune,
    rename_weights,
    scope_matches,
    set_io,
)
from rsvlm_edge.export.names import GROUPS, TRUNK_FILE, decoder_component, expert_file
from rsvlm_edge.export.static_shapes import static_shapes
from rsvlm_edge.export.weights import DataFileWriter, materialize, point_to_external, write_graph
from rsvlm_edge.fileio import staged_dir
from rsvlm_edge.manifest import (
    Component,
    ExpertLayout,
    Manifest,
    TensorLayout,
    TensorSpec,
    TrunkLayout,
    file_entry,
    sha256_file,
)
from rsvlm_edge.sampling import GENERATION_CONFIG_FILE

#: FP32 parity tolerance of the export check, relative to the reference's magnitude (tests use 1e-4 absolute).
FP32_TOLERANCE = 1e-4
LM_HEAD_SCOPE = re.compile(r"lm_head")


class ExportError(RuntimeError):
    """The export cannot run or a check failed; OUT_DIR is left untouched."""


@dataclass
class ExportOptions:
    precision: str = "fp32"  # "fp32" | "fp16"
    opset: int = 17
    components: tuple[str, ...] | None = None  # group names from GROUPS (None = everything)
    check: bool = True
    fp16_lm_head: bool = False  # fp16 only: run lm_head in FP16 too (halves its memory; logits stay FP32 outputs)
    overwrite: bool = False
    threads: int | None = None
    compare_prompts: int = 3
    compare_steps: int = 8
    trt_versions: tuple[str, ...] | None = None  # TensorRT versions the checks target (None = all in the op lists)


@dataclass
class ExportResult:
    out_dir: Path
    manifest: Manifest
    seconds: float
    peak_rss_mb: float
    timings: dict[str, float] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    comparison: dict[str, Any] | None = None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------------------------- tracing
def trace_to_onnx(spec: ComponentSpec, opset: int) -> onnx.ModelProto:
    """TorchScript-based export with parameters as graph inputs: no dedup, no renaming, no folding of weights."""
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(spec.module, spec.sample, buf, dynamo=False,  # type: ignore[arg-type]
                          export_params=False, keep_initializers_as_inputs=True, do_constant_folding=False,
                          opset_version=opset, input_names=[t["name"] for t in spec.inputs],
                          output_names=[t["name"] for t in spec.outputs], dynamic_axes=spec.dynamic_axes)
    return onnx.load_from_string(buf.getvalue())


def build_graph(spec: ComponentSpec, model: torch.nn.Module, opset: int) -> Graph:
    """Trace one component and clean its graph up (see :mod:`rsvlm_edge.export.graph`)."""
    names = {id(p): n for n, p in model.named_parameters()}
    names.update({id(b): n for n, b in model.named_buffers()})
    tensors = dict(spec.module.named_parameters()) | dict(spec.module.named_buffers())
    sources = {n: names[id(t)] for n, t in tensors.items()}
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    g = lift_weights(trace_to_onnx(spec, opset), sources, shapes)
    fold_weight_transposes(g)
    fold_constants(g)
    decompose_layer_norm(g)
    rename_weights(g, spec.rename)
    prune(g)
    set_io(g, spec.inputs, spec.outputs)
    static_shapes(g)
    g.model.producer_name = "rsvlm-edge"
    g.model.producer_version = __version__
    g.model.graph.name = spec.name
    return g


def keep_fp32_for(spec: ComponentSpec, options: ExportOptions) -> Callable[[onnx.NodeProto], bool] | None:
    if spec.kind == "decoder" and not options.fp16_lm_head:
        return lambda node: scope_matches(node, LM_HEAD_SCOPE)
    return None


def _specs_dtype(specs: list[dict]) -> list[TensorSpec]:
    return [TensorSpec(t["name"], t["dtype"], list(t["shape"])) for t in specs]


# ----------------------------------------------------------------------------------------------- the export
class _Writer:
    """Writes components into the staging directory and collects their manifest entries."""

    def __init__(self, model, staging: Path, options: ExportOptions, progress: Callable[[str], None]):
        self.model, self.dir, self.options, self.progress = model, staging, options, progress
        self.params = dict(model.named_parameters()) | dict(model.named_buffers())
        self.components: dict[str, Component] = {}
        self.experts = ExpertLayout()
        self.checks: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self._sha: dict[str, str] = {}  # file -> sha256 computed while writing

    def lookup(self, name: str) -> torch.Tensor:
        return self.params[name]

    def _entry(self, name: str, spec: ComponentSpec, files: list[str], graph_file: str, precision: str,
               extra: dict) -> Component:
        sha, sizes = {}, {}
        for f in files:
            sizes[f] = (self.dir / f).stat().st_size
            sha[f] = self._sha[f] if f in self._sha else sha256_file(self.dir / f)
        opset = next(o.version for o in onnx.load(str(self.dir / graph_file), load_external_data=False).opset_import
                     if o.domain in ("", "ai.onnx"))
        return Component(name=name, file=graph_file, precision=precision, inputs=_specs_dtype(spec.inputs),
                         outputs=_specs_dtype(spec.outputs), sha256=sha, external_data=[f for f in files if f != graph_file],
                         extra={"kind": spec.kind, "opset": opset, "bytes": sizes, **extra})

    def _write_simple(self, spec: ComponentSpec, g: Graph, precision: str) -> None:
        data_file = f"{spec.name}.bin"
        layouts = {}
        with DataFileWriter(self.dir / data_file) as writer:
            for name, ref in g.weights.items():
                layouts[name] = (data_file, writer.add(name, materialize(ref, self.lookup)))
            self._sha[data_file], _ = writer.close()
        point_to_external(g, layouts)
        graph_file = f"{spec.name}.onnx"
        self._sha[graph_file], _ = write_graph(g, self.dir / graph_file)
        self.components[spec.name] = self._entry(spec.name, spec, [graph_file, data_file], graph_file, precision, spec.extra)

    def _write_decoder(self, spec: ComponentSpec, g: Graph, precision: str) -> list[str]:
        num_experts = self.model.cfg.num_experts
        expert_names = [n for n, ref in g.weights.items() if EXPERT_PARAM.match(ref.source)]
        trunk_names = [n for n in g.weights if n not in expert_names]
        trunk_file = TRUNK_FILE
        layouts: dict[str, tuple[str, TensorLayout]] = {}
        with DataFileWriter(self.dir / trunk_file) as writer:
            for name in trunk_names:
                layouts[name] = (trunk_file, writer.add(name, materialize(g.weights[name], self.lookup)))
            self._sha[trunk_file], trunk_bytes = writer.close()
        trunk_layout = {n: layouts[n][1] for n in trunk_names}
        expert_layout: dict[str, TensorLayout] = {}
        written = []
        for e in range(num_experts):
            data_file = expert_file(e)
            with DataFileWriter(self.dir / data_file) as writer:
                for name in expert_names:
                    ref = g.weights[name]
                    source = EXPERT_PARAM.sub(rf"layers.\g<1>.experts.{e}.", ref.source)
                    layouts[name] = (data_file, writer.add(name, materialize(ref, self.lookup, source)))
                self._sha[data_file], expert_bytes = writer.close()
            layout = {n: layouts[n][1] for n in expert_names}
            if expert_layout and layout != expert_layout:
                raise ExportError("expert files do not share one tensor layout")  # cannot happen: same names/shapes/dtypes
            expert_layout = layout
            point_to_external(g, layouts)
            name = decoder_component(e)
            graph_file = f"{name}.onnx"
            g.model.graph.name = name
            self._sha[graph_file], _ = write_graph(g, self.dir / graph_file)
            self.components[name] = self._entry(name, spec, [graph_file, trunk_file, data_file], graph_file, precision,
                                                {"expert": e, "expert_name": EXPERT_NAMES[e]})
            written.append(name)

        def made_from(name: str, layout: TensorLayout, source: str) -> TensorLayout:
            return replace(layout, source=source, transform=g.weights[name].transform)

        def any_expert(name: str) -> str:
            """The parameter with "{e}" for the expert index: one layout serves every expert file."""
            return EXPERT_PARAM.sub(lambda m: f"layers.{m.group(1)}.experts.{{e}}.", g.weights[name].source)

        self.experts = ExpertLayout(
            num_experts=num_experts, names=list(EXPERT_NAMES[:num_experts]), components=written,
            trunk=TrunkLayout(file=trunk_file, bytes=trunk_bytes,
                              tensors={n: made_from(n, trunk_layout[n], g.weights[n].source) for n in trunk_names}),
            expert_files=[expert_file(e) for e in range(num_experts)],
            expert_bytes=expert_bytes,
            expert_tensors={n: made_from(n, expert_layout[n], any_expert(n)) for n in expert_names})
        return written

    def run(self, spec: ComponentSpec, index: int, total: int) -> None:
        o = self.options
        t0 = time.perf_counter()
        self.progress(f"[{index}/{total}] {spec.name}: tracing")
        g = build_graph(spec, self.model, o.opset)
        precision = o.precision
        if precision == "fp16" and spec.kind != "router":  # the router is tiny and decides the expert: kept fp32
            convert_to_fp16(g, keep_fp32_for(spec, o))
        elif precision == "fp16":
            precision = "fp32"
        nbytes = sum(int(torch.Size(r.shape).numel()) * (2 if r.dtype == "float16" else 4) for r in g.weights.values())
        self.progress(f"[{index}/{total}] {spec.name}: writing {len(g.graph.node)} nodes, {len(g.weights)} weights "
                      f"({nbytes / 1e6:.1f} MB{' per expert graph' if spec.kind == 'decoder' else ''})")
        if spec.kind == "decoder":
            names = self._write_decoder(spec, g, precision)
        else:
            self._write_simple(spec, g, precision)
            names = [spec.name]
        del g
        gc.collect()
        if o.check:
            for name in names:
                comp = self.components[name]
                self.checks[name] = check_graph_file(self.dir / comp.file, list(o.trt_versions) if o.trt_versions else None)
                self.checks[name].update(self._parity(spec, comp))
                self.progress(f"[{index}/{total}] {name}: checks ok ({self._parity_text(self.checks[name])})")
                gc.collect()
        self.timings[spec.name] = time.perf_counter() - t0
        self.progress(f"[{index}/{total}] {spec.name}: done in {self.timings[spec.name]:.1f} s "
                      f"(peak RSS {peak_rss_mb():.0f} MB)")

    def _parity(self, spec: ComponentSpec, comp: Component) -> dict[str, Any]:
        path = self.dir / comp.file
        if spec.kind == "decoder":
            res = parity_decoder(path, self.model, comp.extra["expert"], threads=self.options.threads)
            diff, scale = max(res["logits"], res["kv"], res.get("hidden", 0.0)), res["ref_logits_max_abs"]
            out = {"parity": {"logits_max_abs_diff": res["logits"], "kv_max_abs_diff": res["kv"]}}
            if "hidden" in res:
                out["parity"]["hidden_max_abs_diff"] = res["hidden"]
        else:
            res = parity_simple(path, spec.module, spec.sample, [t["name"] for t in spec.inputs], self.options.threads)
            diff, scale = res["max_abs_diff"], res["ref_max_abs"]
            out = {"parity": {"max_abs_diff": diff}}
        if comp.precision == "fp32" and diff > FP32_TOLERANCE * max(1.0, scale):
            raise ExportCheckError(f"{comp.name}: ONNX Runtime differs from PyTorch by {diff:.3g} (tolerance "
                                   f"{FP32_TOLERANCE:g} x max(1, |ref| = {scale:.3g}))")
        return out

    @staticmethod
    def _parity_text(check: dict) -> str:
        p = check["parity"]
        return ", ".join(f"{k.replace('_', ' ')} {v:.2g}" for k, v in p.items()) + " vs PyTorch"


def select_specs(model, components: tuple[str, ...] | None) -> list[ComponentSpec]:
    specs = component_specs(model)
    if not components:
        return specs
    unknown = [c for c in components if c not in GROUPS]
    if unknown:
        raise ExportError(f"unknown component(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    empty = [c for c in components if not any(s.name.startswith(GROUPS[c]) for s in specs)]
    if empty:
        raise ExportError(f"{model.cfg.name} has no {', '.join(empty)} component (model_config: vision_stems = "
                          f"{str(model.cfg.vision_stems).lower()}, router = {str(model.cfg.router).lower()}, "
                          f"box_pointer = {str(model.cfg.box_pointer).lower()}); leave it out of --components")
    prefixes = tuple(p for c in components for p in GROUPS[c])
    return [s for s in specs if s.name.startswith(prefixes)]


def export_model(model, out_dir: str | Path, tokenizer_file: str | Path | None, options: ExportOptions | None = None,
                 progress: Callable[[str], None] = lambda s: None, source: str | None = None,
                 generation_config_file: str | Path | None = None) -> ExportResult:
    """Export ``model`` (an :class:`~rsvlm_edge.modeling.RSVLM`) into ``out_dir``; see the module docstring.

    ``generation_config_file`` (a converted model's ``generation_config.json``: eos ids, repetition penalty) is copied
    and listed in the manifest, so engines answer with the model's own generation defaults."""
    options = options or ExportOptions()
    if options.precision not in ("fp32", "fp16"):
        raise ExportError(f"precision must be fp32 or fp16, got {options.precision!r}")
    if not 17 <= options.opset <= 20:
        raise ExportError(f"opset must be in 17..20 (17 for TensorRT 8.5 / JetPack 5), got {options.opset}")
    out_dir = Path(out_dir)
    model = model.eval()
    t0 = time.perf_counter()
    specs = select_specs(model, options.components)
    with staged_dir(out_dir, options.overwrite, ExportError) as staging:
        writer = _Writer(model, staging, options, progress)
        try:
            for i, spec in enumerate(specs, start=1):
                writer.run(spec, i, len(specs))
                del spec.module  # drop the view (and its traced state) before the next component
                gc.collect()
        except ExportCheckError as exc:
            raise ExportError(f"export check failed: {exc}") from None
        tokenizer = None
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, staging / "tokenizer.json")
            tokenizer = file_entry(staging / "tokenizer.json")
        generation = None
        if generation_config_file is not None:
            shutil.copyfile(generation_config_file, staging / GENERATION_CONFIG_FILE)
            generation = file_entry(staging / GENERATION_CONFIG_FILE)
        model.cfg.save(staging / "config.json")
        export_info = {"tool": f"rsvlm-edge {__version__}", "torch": torch.__version__, "onnx": onnx.__version__,
                       "exporter": "torch.onnx (TorchScript) + rsvlm_edge.export graph passes", "opset": options.opset,
                       "precision": options.precision, "source": source, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       "checks": writer.checks}
        manifest = Manifest(model_config=model.cfg.to_dict(), components=writer.components, tokenizer=tokenizer,
                            generation_config=generation,
                            experts=writer.experts, engine={"kind": "onnx", "trt_version": None, "compute_capability": None},
                            extra={"export": export_info}, directory=staging)
        comparison = None
        if options.check and options.precision == "fp16" and _complete(model.cfg, writer.components):
            comparison = fp16_report(model, staging, manifest, options, progress)
            export_info["fp16_vs_fp32"] = comparison
        manifest.save(staging)
        json.dumps(manifest.to_dict())  # serialisable
        elapsed = time.perf_counter() - t0
    manifest.directory = out_dir
    return ExportResult(out_dir, manifest, elapsed, peak_rss_mb(), writer.timings, writer.checks, comparison)


def _complete(cfg, components: dict[str, Component]) -> bool:
    """Whether the export holds every component a request runs (what the fp16 report compares)."""
    needed = {"vision_encoder", "embedding", "decoder_expert0"} | ({"router"} if cfg.router else set())
    return needed <= set(components) and (not cfg.vision_stems or any(c.startswith("vision_stem_") for c in components))


def fp16_report(model, directory: Path, manifest: Manifest, options: ExportOptions,
                progress: Callable[[str], None]) -> dict[str, Any]:
    """FP16 engines vs the FP32 PyTorch reference: component diffs and greedy token agreement."""
    from rsvlm_edge.backends.ort_backend import OrtBackend
    from rsvlm_edge.backends.torch_backend import TorchBackend
    from rsvlm_edge.export.compare import compare_backends, format_comparison

    manifest.save(directory)  # the backend reads it
    progress("fp16 check: comparing with the fp32 PyTorch reference (greedy decoding)")
    # one resident expert at a time: on CPU, ONNX Runtime upcasts FP16 weights, so this bounds the check's memory
    candidate = OrtBackend.from_dir(directory, threads=options.threads, verify=False, expert_budget_experts=1)
    sensor = next((c.extra["sensor"] for c in manifest.components.values() if c.extra.get("kind") == "vision_stem"),
                  next(iter(model.cfg.sensors)))
    try:
        report = compare_backends(TorchBackend(model), candidate, prompts=options.compare_prompts,
                                  steps=options.compare_steps, sensor=sensor)
    finally:
        candidate.close()
    progress(format_comparison(report))
    return report
