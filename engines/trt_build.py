"""Build TensorRT plans from an ONNX engine directory: one serialized plan per component, plus a TensorRT manifest.

Each graph is parsed with ``OnnxParser.parse_from_file`` (so the external data beside it, e.g. the decoder's
shared ``decoder_trunk.bin`` and its ``decoder_expert<e>.bin``, resolves), built with the preset's profiles and
memory limits (:mod:`~rsvlm_edge.engines.trt_profiles`, :mod:`~rsvlm_edge.engines.trt_presets`) and the
precision rules of the installed TensorRT (:mod:`~rsvlm_edge.engines.trt_settings`). One timing cache is shared by
every build and, given a path, loaded before and saved after, so rebuilding on the same device is fast.

The output manifest has ``engine.kind = "tensorrt"`` with the TensorRT version and the GPU compute capability the
plans were built for: :func:`rsvlm_edge.manifest.check_engine_compat` refuses them anywhere else. Each decoder plan
embeds the shared trunk (TensorRT plans own their weights), so ``decoder_expert<e>.plan`` loads alone.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from rsvlm_edge.backends.trt_env import LazyModule, compute_capability, load_tensorrt, trt_major
from rsvlm_edge.engines.trt_calib import make_cache_calibrator
from rsvlm_edge.engines.trt_presets import BuildPreset, get_preset
from rsvlm_edge.engines.trt_profiles import Profile, component_profiles
from rsvlm_edge.engines.trt_settings import (
    PlanSettings,
    check_graph_precision,
    check_int8_inputs,
    plan_settings,
    resolve_strongly_typed,
)
from rsvlm_edge.fileio import atomic_write_bytes
from rsvlm_edge.manifest import (
    Component,
    ExpertLayout,
    Manifest,
    ManifestError,
    Verify,
    copy_side_files,
    sha256_file,
)

if TYPE_CHECKING:
    import tensorrt as trt
else:
    trt = LazyModule(load_tensorrt)

PLAN_SUFFIX = ".plan"


class TrtBuildError(RuntimeError):
    """TensorRT could not parse a graph or build a plan."""


def plan_file(component: str) -> str:
    return f"{component}{PLAN_SUFFIX}"


# ----------------------------------------------------------------------------------------------- one plan
def network_flags(strongly_typed: bool) -> int:
    """EXPLICIT_BATCH before TensorRT 10 (later it is the only mode and the flag is deprecated); STRONGLY_TYPED."""
    flags = 0
    if trt_major(trt.__version__) < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return flags


def parse_onnx(builder: trt.Builder, logger: trt.ILogger, onnx_path: Path,
               strongly_typed: bool) -> tuple[trt.INetworkDefinition, trt.OnnxParser]:
    network = builder.create_network(network_flags(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TrtBuildError(f"TensorRT {trt.__version__} cannot parse {onnx_path.name}:\n  " + "\n  ".join(errors))
    return network, parser  # the parser must outlive the network's build


def check_network_io(network: trt.INetworkDefinition, component: Component) -> None:
    """The parsed network must have the manifest's inputs (a stale manifest would bind wrong names at run time)."""
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    expected = {t.name for t in component.inputs}
    if names != expected:
        raise TrtBuildError(f"{component.name}: the graph's inputs {sorted(names)} differ from the manifest's "
                            f"{sorted(expected)}; re-export the ONNX directory")


def make_config(builder: trt.Builder, preset: BuildPreset, settings: PlanSettings, profiles: list[Profile],
                timing_cache: trt.ITimingCache | None) -> trt.IBuilderConfig:
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, preset.workspace_bytes)
    if preset.optimization_level is not None and hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = preset.optimization_level
    for flag in settings.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    trt_profiles = []
    for profile in profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.shapes.items():
            p.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
        config.add_optimization_profile(p)
        trt_profiles.append(p)
    if settings.calibration_cache is not None:
        config.int8_calibrator = make_cache_calibrator(settings.calibration_cache)
        config.set_calibration_profile(trt_profiles[0])
    if settings.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = settings.dla_core
    if timing_cache is not None:
        config.set_timing_cache(timing_cache, False)
    return config


def build_plan(builder: trt.Builder, logger: trt.ILogger, onnx_path: Path, component: Component, preset: BuildPreset,
               settings: PlanSettings, profiles: list[Profile], timing_cache: trt.ITimingCache | None) -> bytes:
    network, _parser = parse_onnx(builder, logger, onnx_path, settings.strongly_typed)
    check_network_io(network, component)
    config = make_config(builder, preset, settings, profiles, timing_cache)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TrtBuildError(f"TensorRT {trt.__version__} failed to build {component.name} (see its log above); "
                            f"a smaller preset (less batch/context) or more workspace may help")
    return bytes(memoryview(plan))


def fit_to_device(settings: PlanSettings, builder: trt.Builder, component: str, say: Callable[[str], None]) -> PlanSettings:
    """A preset's DLA core on a device without one (a datacenter GPU, Orin Nano) means: build for the GPU."""
    if settings.dla_core is None or builder.num_DLA_cores > settings.dla_core:
        return settings
    say(f"{component}: no DLA core {settings.dla_core} on this device; building for the GPU")
    return replace(settings, flags=tuple(f for f in settings.flags if f != "GPU_FALLBACK"), dla_core=None)


# ----------------------------------------------------------------------------------------------- timing cache
def open_timing_cache(builder: trt.Builder, path: Path | None) -> tuple[trt.ITimingCache, trt.IBuilderConfig]:
    """One ITimingCache for all builds, seeded from ``path`` when it exists (returned with the config that made it,
    which the caller keeps alive as long as the cache)."""
    config = builder.create_builder_config()
    data = path.read_bytes() if path is not None and path.is_file() else b""
    return config.create_timing_cache(data), config


def save_timing_cache(cache: trt.ITimingCache, path: Path) -> None:
    atomic_write_bytes(path, bytes(memoryview(cache.serialize())))


# ----------------------------------------------------------------------------------------------- manifest
def plan_component(source: Component, plan_name: str, plan_path: Path, settings: PlanSettings, profiles: list[Profile]) -> Component:
    extra = {k: v for k, v in source.extra.items() if k not in ("bytes", "opset")}
    extra.update({"bytes": {plan_name: plan_path.stat().st_size}, "profiles": [p.to_dict() for p in profiles],
                  "strongly_typed": settings.strongly_typed, "builder_flags": list(settings.flags),
                  "dla_core": settings.dla_core, "source_graph": source.file, "source_sha256": source.sha256[source.file]})
    return Component(name=source.name, file=plan_name, precision=settings.precision, inputs=list(source.inputs),
                     outputs=list(source.outputs), sha256={plan_name: sha256_file(plan_path)}, external_data=[], extra=extra)


def trt_manifest(source: Manifest, components: dict[str, Component], version: str, cc: str, preset: BuildPreset,
                 precision: str) -> Manifest:
    # plans hold their weights: of the layout only the experts themselves stay (no data files to map)
    experts = ExpertLayout(num_experts=source.experts.num_experts, names=source.experts.names,
                           components=source.experts.components)
    return Manifest(model_config=dict(source.model_config), components=components,
                    tokenizer=dict(source.tokenizer) if source.tokenizer else None, experts=experts,
                    generation_config=dict(source.generation_config) if source.generation_config else None,
                    engine={"kind": "tensorrt", "trt_version": version, "compute_capability": cc,
                            "version_compatible": False, "hardware_compatible": False},
                    extra={"build": {"preset": asdict(preset), "precision": precision, "source": str(source.directory)}})


# ----------------------------------------------------------------------------------------------- whole directory
def build_trt_engines(onnx_dir: str | Path, out_dir: str | Path, preset: str | BuildPreset = "datacenter",
                      precision: str = "fp16", calib_cache: str | Path | None = None,
                      timing_cache: str | Path | None = None, trt_version: str | None = None,
                      components: list[str] | None = None, strongly_typed: bool | None = None,
                      verify: Verify = "size", log: Callable[[str], None] | None = None) -> Path:
    """Build one plan per component of ``onnx_dir`` into ``out_dir`` and write its TensorRT ``manifest.json``.

    ``trt_version``: refuse to build unless the installed TensorRT starts with it (pin a fleet's version);
    ``calib_cache``: a TensorRT calibration cache file, or a folder of ``<component>.cache`` (TensorRT < 11);
    ``timing_cache``: loaded if present, saved after the builds; ``components``: a subset (default all).
    """
    say = log or (lambda msg: print(msg, file=sys.stderr))
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    if out_dir.resolve() == onnx_dir.resolve():
        raise TrtBuildError("write the plans to another directory than the ONNX graphs (both have a manifest.json)")
    try:
        source = Manifest.load(onnx_dir, verify=verify)
    except ManifestError as exc:
        raise TrtBuildError(f"cannot build from {onnx_dir}: {exc}") from None
    if source.engine_kind != "onnx":
        raise TrtBuildError(f"{onnx_dir} holds {source.engine_kind} engines; TensorRT plans are built from ONNX graphs")
    if (source.extra.get("quantization") or {}).get("runtime") == "onnxruntime":
        raise TrtBuildError(f"{onnx_dir} is a weight-only INT8 dir for ONNX Runtime (MatMulNBits, which TensorRT "
                            f"cannot import); build from the FP32 export or a Q/DQ INT8 dir from `rsvlm-edge calibrate`")
    chosen = [source.component(n) for n in (components or list(source.components))]
    preset = get_preset(preset)
    load_tensorrt()  # a clear error with an install hint before anything else
    version = str(trt.__version__)
    if trt_version is not None and not (version == trt_version or version.startswith(f"{trt_version}.")):
        raise TrtBuildError(f"TensorRT {trt_version} was asked for, but {version} is installed")
    strong = resolve_strongly_typed(version, strongly_typed)
    check_graph_precision(chosen, precision, version, strong)
    check_int8_inputs(chosen, precision, calib_cache, strong)
    cc = compute_capability()
    cfg = source.config()

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    shared_cache, _cache_owner = open_timing_cache(builder, cache_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    built: dict[str, Component] = {}
    for comp in chosen:
        settings = fit_to_device(plan_settings(comp, precision, version, preset, calib_cache, strong), builder,
                                 comp.name, say)
        profiles = component_profiles(comp, cfg, preset, static_batch=settings.dla_core is not None)
        say(f"building {comp.name} ({settings.precision}, {', '.join(p.name for p in profiles)} profile"
            f"{'s' if len(profiles) > 1 else ''}{', DLA' if settings.dla_core is not None else ''}) ...")
        plan = build_plan(builder, logger, source.path(comp.file), comp, preset, settings, profiles, shared_cache)
        name = plan_file(comp.name)
        atomic_write_bytes(out_dir / name, plan)
        built[comp.name] = plan_component(comp, name, out_dir / name, settings, profiles)
    copy_side_files(source, out_dir)
    if cache_path is not None:
        save_timing_cache(shared_cache, cache_path)
    manifest = trt_manifest(source, built, version, cc, preset, precision)
    manifest.save(out_dir)
    say(f"wrote {len(built)} TensorRT {version} plans for compute capability {cc} to {out_dir}")
    return out_dir
