"""What precision means to each TensorRT version: builder flags, strong typing, calibrators. Pure (no TensorRT needed).

* TensorRT >= 11: no FP16/INT8 builder flags and no calibrators. Networks are strongly typed: the ONNX graph's own
  types are what runs, so ``fp16`` needs an FP16 ONNX (``rsvlm-edge export --precision fp16``) and ``int8`` an
  explicit Q/DQ ONNX.
* TensorRT 8.5 / 8.6 / 10.x: weakly typed networks; ``fp16`` sets ``BuilderFlag.FP16`` (on an FP32 or FP16 ONNX);
  ``int8`` sets ``INT8`` + ``FP16`` and takes its scales from Q/DQ nodes, or, for an FP32 graph, from a calibration
  cache replayed by an entropy calibrator. A component with neither stays FP16.
* Strong typing can be asked for on TensorRT 10 too (``strongly_typed=True``); TensorRT 8.x has no such flag.
* ``int4`` (TensorRT >= 10): weight-only INT4 from blockwise Q/DQ decoders (``rsvlm-edge build --precision int4
  --scheme qdq``); weakly typed builds set ``BuilderFlag.INT4`` and ``FP16`` for those components (the other graphs
  build in FP16), strongly typed ones take the graphs' types. TensorRT 8.x has no INT4 and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rsvlm_edge.backends.trt_env import trt_major
from rsvlm_edge.engines.trt_calib import cache_for_component
from rsvlm_edge.engines.trt_presets import BuildPreset, uses_dla
from rsvlm_edge.manifest import Component

PRECISIONS = ("fp32", "fp16", "int8", "int4")
INT4_MIN_MAJOR = 10  # blockwise INT4 DequantizeLinear (weight-only quantization) arrived in TensorRT 10.0
#: Kept FP32 in reduced-precision builds, as the FP16 exporter keeps them: the router is tiny and decides the expert.
FP32_COMPONENTS = ("router",)


class BuildSettingsError(ValueError):
    """The requested precision cannot be built from these graphs with this TensorRT version."""


@dataclass(frozen=True)
class PlanSettings:
    strongly_typed: bool
    flags: tuple[str, ...]  # BuilderFlag member names
    precision: str  # what the plan computes in (recorded in the manifest)
    calibration_cache: Path | None = None
    dla_core: int | None = None


def check_graph_precision(components: list[Component], precision: str, trt_version: str, strongly_typed: bool) -> None:
    """Refuse early when no graph carries the precision a strongly typed build would need."""
    if precision not in PRECISIONS:
        raise BuildSettingsError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "int4" and not any(c.precision == "int4" for c in components):
        raise BuildSettingsError("int4 plans are built from INT4 Q/DQ graphs (rsvlm-edge build ONNX_DIR OUT --precision "
                                 f"int4 --scheme qdq); these graphs are {sorted({c.precision for c in components})}")
    if not strongly_typed or precision == "fp32":
        return
    if not any(c.precision == precision for c in components):
        how = ("export with `rsvlm-edge export ... --precision fp16`" if precision == "fp16"
               else "quantize to an explicit Q/DQ ONNX first (rsvlm_edge.calibration / engines)")
        raise BuildSettingsError(f"TensorRT {trt_version} builds strongly typed networks: {precision} plans need {precision} "
                                 f"ONNX graphs, but these graphs are {sorted({c.precision for c in components})}; {how}")


def resolve_strongly_typed(trt_version: str, strongly_typed: bool | None) -> bool:
    major = trt_major(trt_version)
    if strongly_typed is None:
        return major >= 11
    if strongly_typed and major < 10:
        raise BuildSettingsError(f"TensorRT {trt_version} has no strongly typed networks (TensorRT >= 10 does)")
    if not strongly_typed and major >= 11:
        raise BuildSettingsError(f"TensorRT {trt_version} only builds strongly typed networks")
    return strongly_typed


def plan_settings(component: Component, precision: str, trt_version: str, preset: BuildPreset,
                  calib_cache: str | Path | None = None, strongly_typed: bool | None = None) -> PlanSettings:
    """Flags, typing and calibration for one component's plan."""
    if precision not in PRECISIONS:
        raise BuildSettingsError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "int4" and trt_major(trt_version) < INT4_MIN_MAJOR:
        raise BuildSettingsError(f"TensorRT {trt_version} has no INT4 weights (TensorRT >= {INT4_MIN_MAJOR} does)")
    strong = resolve_strongly_typed(trt_version, strongly_typed)
    dla = preset.dla_core if uses_dla(preset, component.name, precision) else None
    fallback = ("GPU_FALLBACK",) if dla is not None else ()
    if strong:
        if calib_cache is not None:
            raise BuildSettingsError(f"strongly typed networks (TensorRT {trt_version}) take no INT8 calibrator; build "
                                     f"from a Q/DQ ONNX instead of a calibration cache")
        return PlanSettings(True, fallback, component.precision, None, dla)
    if precision == "fp32" or component.name in FP32_COMPONENTS:
        return PlanSettings(False, (), "fp32")
    if precision == "fp16":
        return PlanSettings(False, ("FP16",) + fallback, "fp16", None, dla)
    if component.precision == "int4":  # weight-only INT4 through blockwise Q/DQ; activations FP16
        return PlanSettings(False, ("INT4", "FP16"), "int4", None, None)
    if component.precision == "int8":  # explicit quantization: scales live in the graph
        return PlanSettings(False, ("INT8", "FP16") + fallback, "int8", None, dla)
    cache = cache_for_component(calib_cache, component.name) if calib_cache is not None else None
    if cache is None:
        return PlanSettings(False, ("FP16",) + fallback, "fp16", None, dla)
    return PlanSettings(False, ("INT8", "FP16") + fallback, "int8", cache, dla)


def check_int8_inputs(components: list[Component], precision: str, calib_cache: str | Path | None, strongly_typed: bool) -> None:
    """An INT8 build without Q/DQ graphs or a calibration cache would silently be FP16: refuse it."""
    if precision != "int8" or strongly_typed:
        return
    if calib_cache is None and not any(c.precision == "int8" for c in components):
        raise BuildSettingsError("int8 plans need explicit Q/DQ ONNX graphs or a calibration cache (--calib-cache, "
                                 "written by rsvlm_edge.calibration); neither was given")
