"""``rsvlm-edge convert rsunivlm``: an RSUniVLM checkpoint folder (Hugging Face ``liux-cyber/RSUniVLM``) -> a model
dir that ``export``, ``infer --backend torch`` and the other commands take.

The reference is the model as RSUniVLM's ``builder.py`` loads it: ``LlavaQwenGMoeForCausalLM`` with its SigLIP tower
(26 layers, weights from the checkpoint itself), ``mlp2x_gelu`` projector, optional newline token and a Qwen2 decoder
with three experts per layer; embed / lm_head cut to ``len(tokenizer)`` (``resize_token_embeddings``, after adding
``<im_patch>`` when ``mm_use_im_patch_token`` is on, its default). Every config.json field that changes what the
model computes is read and checked; settings this runtime does not implement (anyres / highres tiling, image
start/end tokens, resamplers, sliding-window attention) are refused rather than approximated.

Nothing is downloaded. Tensors are read by byte range from the safetensors header and written chunk by chunk
(:mod:`rsvlm_edge.export.safetensors_stream`), so memory holds one chunk, not the 3.3 GB model. The output is
staged beside ``OUT_DIR`` and renamed into place at the end: a failure leaves no half-written dir.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from rsvlm_edge import __version__
from rsvlm_edge.config import STEMLESS_SENSORS, ModelConfig, rsunivlm_1b_config
from rsvlm_edge.export.rsunivlm_keys import SIGLIP, KeyMapping, rsunivlm_key_map, target_shapes
from rsvlm_edge.export.safetensors_stream import (
    DTYPE_SIZES,
    FLOAT_DTYPES,
    OutputTensor,
    SafetensorsError,
    TensorInfo,
    from_float_array,
    read_chunks,
    read_index,
    to_float_array,
    write_streamed,
)
from rsvlm_edge.fileio import atomic_write_text, staged_dir

ARCH = "llava_qwen_gmoe"
ARCH_CLASS = "LlavaQwenGMoeForCausalLM"
#: RSUniVLM's SigLipImageProcessor resizes to this, whatever the tower's name says (siglip_encoder.py).
SIGLIP_IMAGE_SIZE = 384
#: SigLIP-so400m's head count and LayerNorm eps: they come from the tower's own config (downloaded by the reference,
#: never stored in the checkpoint's config.json) and cannot be read from tensor shapes.
SIGLIP_HEADS, SIGLIP_EPS = 16, 1e-6
#: builder.py adds this token when mm_use_im_patch_token is true (its default when the field is absent).
IM_PATCH_TOKEN = "<im_patch>"
#: Tokens the qwen_1_5 prompt template needs.
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
#: Output dtypes: name -> safetensors dtype.
OUTPUT_DTYPES = {"fp16": "F16", "fp32": "F32", "bf16": "BF16"}
#: How many names of each kind an error lists before it says "and N more".
SHOW = 10


class ConvertError(ValueError):
    """The source folder is not a checkpoint this converter handles, or the output cannot be written."""


# --------------------------------------------------------------------------------------------------- source files


@dataclass
class Source:
    """What was read from SRC_DIR: config, tokenizer facts and the tensor index (nothing of the tensor data)."""

    root: Path
    hf_config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    weight_files: list[Path]
    tokenizer_json: dict[str, Any]
    tokenizer_len: int  # len(tokenizer) after builder.py's additions
    added_im_patch: bool
    generation_config: Path | None


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConvertError(f"{path} is missing: {what}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{path} is not valid JSON ({exc})") from None


def read_weights(root: Path) -> tuple[dict[str, TensorInfo], list[Path]]:
    """The tensor index of ``model.safetensors``, or of the shards a ``model.safetensors.index.json`` names."""
    single, index = root / "model.safetensors", root / "model.safetensors.index.json"
    try:
        if single.is_file():
            return read_index(single), [single]
        if not index.is_file():
            raise ConvertError(f"{root} has neither model.safetensors nor model.safetensors.index.json")
        weight_map = _read_json(index, "the shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConvertError(f"{index} has no weight_map")
        files = sorted({str(f) for f in weight_map.values()})
        tensors: dict[str, TensorInfo] = {}
        for name in files:
            shard = (root / name).resolve()
            if shard.parent != root.resolve() or not shard.is_file():
                raise ConvertError(f"{index} names the shard {name!r}, which is not a file in {root}")
            for key, info in read_index(shard).items():
                if weight_map.get(key) != name:
                    raise ConvertError(f"{index} does not list tensor {key!r} of {name} (or lists another shard)")
                tensors[key] = info
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ConvertError(f"{index} lists tensors no shard holds: {_names(missing)}")
        return tensors, [root / f for f in files]
    except SafetensorsError as exc:
        raise ConvertError(str(exc)) from None
    except OSError as exc:
        raise ConvertError(f"cannot read the weights in {root}: {exc.strerror or exc}") from None


def read_tokenizer(root: Path, hf_config: dict[str, Any]) -> tuple[dict[str, Any], int, bool]:
    """tokenizer.json as JSON, ``len(tokenizer)`` as builder.py leaves it, and whether ``<im_patch>`` was added."""
    from tokenizers import Tokenizer

    path = root / "tokenizer.json"
    data = _read_json(path, "RSUniVLM's own tokenizer (Qwen2 BPE) is required")
    try:
        tok = Tokenizer.from_str(json.dumps(data))
    except Exception as exc:  # tokenizers raises plain Exception subclasses for malformed files
        raise ConvertError(f"{path} is not a tokenizer the `tokenizers` library reads: {exc}") from None
    missing = [t for t in CHATML_TOKENS if tok.token_to_id(t) is None]
    if missing:
        raise ConvertError(f"{path} lacks {', '.join(missing)}: not a Qwen2 ChatML tokenizer")
    added = root / "added_tokens.json"
    if added.is_file():
        for token, token_id in _read_json(added, "").items():
            if tok.token_to_id(token) != token_id:
                raise ConvertError(f"{added} gives {token!r} id {token_id}, {path} gives {tok.token_to_id(token)}")
    size = tok.get_vocab_size(with_added_tokens=True)
    add_patch = bool(hf_config.get("mm_use_im_patch_token", True)) and tok.token_to_id(IM_PATCH_TOKEN) is None
    return data, size + int(add_patch), add_patch


def read_source(src_dir: str | Path) -> Source:
    root = Path(src_dir)
    if not root.is_dir():
        raise ConvertError(f"checkpoint folder not found: {root}")
    hf_config = _read_json(root / "config.json", "the checkpoint's config")
    if not isinstance(hf_config, dict):
        raise ConvertError(f"{root / 'config.json'} must hold a JSON object")
    check_arch(hf_config, root / "config.json")
    tok_json, tok_len, added_patch = read_tokenizer(root, hf_config)
    tensors, files = read_weights(root)
    gen = root / "generation_config.json"
    if gen.is_file():
        _read_json(gen, "")  # must at least parse: the runtime reads eos ids and repetition_penalty from it
    return Source(root, hf_config, tensors, files, tok_json, tok_len, added_patch, gen if gen.is_file() else None)


# --------------------------------------------------------------------------------------------------- config.json


def check_arch(hf: dict[str, Any], path: Path) -> None:
    model_type, archs = hf.get("model_type"), hf.get("architectures")
    if model_type != ARCH or (archs is not None and archs != [ARCH_CLASS]):
        what = f"model_type {model_type!r}" + (f" ({', '.join(map(str, archs))})" if isinstance(archs, list) else "")
        raise ConvertError(f"{path}: {what} is not RSUniVLM's {ARCH} ({ARCH_CLASS}); `convert rsunivlm` converts "
                           f"only that architecture")


def _need(hf: dict[str, Any], key: str, path: Path, kind: type | tuple[type, ...] = int) -> Any:
    value = hf.get(key)
    if value is None or isinstance(value, bool) or not isinstance(value, kind):
        raise ConvertError(f"{path}: field {key!r} is missing or not a number ({value!r})")
    return value


def _refuse(path: Path, key: str, value: Any, why: str) -> ConvertError:
    return ConvertError(f"{path}: {key} = {value!r} is not supported: {why}")


def vision_config(hf: dict[str, Any], tensors: dict[str, TensorInfo], path: Path) -> dict[str, Any]:
    """SigLIP sizes: the checkpoint's config.json names the tower only, so widths and depth come from the stored
    tensors (the reference loads them over the tower it builds, so they must agree), image size from the fixed
    SigLipImageProcessor. Without the tensors (an incomplete checkpoint) the preset's values stand in, and the key
    comparison reports what is missing."""
    tower = hf.get("mm_vision_tower") or hf.get("vision_tower")
    if not isinstance(tower, str) or "siglip" not in tower.lower():
        raise _refuse(path, "mm_vision_tower", tower, "only SigLIP towers (siglip-so400m-patch14-384) are handled")
    preset = rsunivlm_1b_config()
    out = dict(image_size=SIGLIP_IMAGE_SIZE, patch_size=preset.patch_size, vision_width=preset.vision_width,
               vision_mlp=preset.vision_mlp, vision_layers=preset.vision_layers, vision_heads=SIGLIP_HEADS,
               vision_norm_eps=SIGLIP_EPS)
    mm_hidden = hf.get("mm_hidden_size")
    if isinstance(mm_hidden, int) and not isinstance(mm_hidden, bool):
        out["vision_width"] = mm_hidden
    patch = tensors.get(SIGLIP + "embeddings.patch_embedding.weight")
    if patch is not None and len(patch.shape) == 4:
        if mm_hidden is not None and mm_hidden != patch.shape[0]:
            raise ConvertError(f"{path}: mm_hidden_size {mm_hidden} differs from the SigLIP width {patch.shape[0]} "
                               f"of the stored patch_embedding")
        out["vision_width"], out["patch_size"] = patch.shape[0], patch.shape[2]
    fc1 = tensors.get(SIGLIP + "encoder.layers.0.mlp.fc1.weight")
    if fc1 is not None and len(fc1.shape) == 2:
        out["vision_mlp"] = fc1.shape[0]
    layers = {int(m.group(1)) for k in tensors if (m := re.match(re.escape(SIGLIP) + r"encoder\.layers\.(\d+)\.", k))}
    if layers:
        out["vision_layers"] = max(layers) + 1
    if out["vision_width"] % SIGLIP_HEADS:
        raise ConvertError(f"{path}: the SigLIP width {out['vision_width']} is not divisible by its {SIGLIP_HEADS} heads")
    return out


def model_config(hf: dict[str, Any], tensors: dict[str, TensorInfo], tokenizer_len: int, path: Path) -> ModelConfig:
    """Our ModelConfig for the checkpoint; refuses settings the runtime does not implement."""
    projector = hf.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise _refuse(path, "mm_projector_type", projector, "only mlp2x_gelu is handled")
    if hf.get("mm_resampler_type"):
        raise _refuse(path, "mm_resampler_type", hf["mm_resampler_type"], "resamplers are not handled")
    if hf.get("mm_use_im_start_end", False):
        raise _refuse(path, "mm_use_im_start_end", True, "image start/end tokens are not handled")
    aspect = hf.get("image_aspect_ratio")
    if aspect not in ("square", "pad"):
        raise _refuse(path, "image_aspect_ratio", aspect, "only 'square' and 'pad' (one 384x384 view per image) are "
                      "handled; anyres / highres / crop_split tiling is not")
    merge = hf.get("mm_patch_merge_type", "flat")
    if not isinstance(merge, str) or not (merge == "flat" or merge.startswith("spatial")):
        raise _refuse(path, "mm_patch_merge_type", merge, "expected 'flat' or a 'spatial...' type")
    if hf.get("use_sliding_window", False):
        raise _refuse(path, "use_sliding_window", True, "sliding-window attention is not handled")
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse(path, "hidden_act", hf.get("hidden_act"), "Qwen2 experts are SwiGLU (silu)")
    hidden = _need(hf, "hidden_size", path)
    heads = _need(hf, "num_attention_heads", path)
    if "head_dim" in hf and hf["head_dim"] * heads != hidden:
        raise _refuse(path, "head_dim", hf["head_dim"], f"Qwen2 attention uses hidden_size / heads = {hidden // heads}")
    stored_vocab = _need(hf, "vocab_size", path)
    if tokenizer_len > stored_vocab:
        raise ConvertError(f"{path}: the tokenizer has {tokenizer_len} tokens, more than the model's vocab_size "
                           f"{stored_vocab} (the reference would add untrained rows)")
    values = dict(
        vision_config(hf, tensors, path),
        name="rsunivlm",
        hidden_size=hidden,
        intermediate_size=_need(hf, "intermediate_size", path),
        num_layers=_need(hf, "num_hidden_layers", path),
        num_heads=heads,
        num_kv_heads=_need(hf, "num_key_value_heads", path),
        rope_theta=float(hf.get("rope_theta", 10000.0)),  # Qwen2Config's defaults when a field is absent
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=_need(hf, "max_position_embeddings", path),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        vocab_size=tokenizer_len,
        image_newline="unpad" in merge,
        image_preprocess="siglip-pad" if aspect == "pad" else "siglip-square",
        prompt_template="qwen_1_5",
        sensors=dict(STEMLESS_SENSORS),
        vision_stems=False,
        vision_feature_norm=False,
        router=False,
        cnn_branch=False,
        cnn_channels=[],
        vision_feature_layers=[-1],
        token_pos_embed=False,
        box_pointer=False,
        attention_bias=True,
        num_experts=3,
    )
    preset = rsunivlm_1b_config()
    cfg = dataclasses.replace(preset, **values)
    same_shape = all(getattr(cfg, f.name) == getattr(preset, f.name) for f in dataclasses.fields(cfg)
                     if f.name not in ("name", "vocab_size", "rope_theta", "rms_norm_eps", "max_position_embeddings",
                                       "tie_word_embeddings", "image_newline", "image_preprocess"))
    cfg.name = "rsunivlm-1b" if same_shape else "rsunivlm"
    try:
        return cfg.validate()
    except ValueError as exc:
        raise ConvertError(f"{path}: {exc}") from None


def recorded_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """The config.json fields that decide the conversion (spec table), as read: provenance for convert.json."""
    keys = ("model_type", "architectures", "mm_vision_tower", "mm_projector_type", "mm_hidden_size",
            "mm_patch_merge_type", "image_aspect_ratio", "mm_use_im_patch_token", "mm_use_im_start_end",
            "mm_resampler_type", "mm_vision_select_layer", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings",
            "use_sliding_window", "sliding_window", "max_window_layers", "tie_word_embeddings", "vocab_size",
            "tokenizer_model_max_length", "tokenizer_padding_side", "torch_dtype", "hidden_act")
    return {k: hf.get(k) for k in keys if k in hf}


# --------------------------------------------------------------------------------------------------- key check


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:SHOW])
    return shown + (f" and {len(items) - SHOW} more" if len(items) > SHOW else "")


def check_tensors(key_map: dict[str, KeyMapping], tensors: dict[str, TensorInfo], where: str) -> str:
    """Refuse missing / unexpected keys, shape mismatches and mixed or non-float dtypes, all listed in one
    message. Returns the checkpoint's (single) float dtype."""
    missing = [k for k, m in key_map.items() if k not in tensors and not m.optional]
    unexpected = sorted(set(tensors) - set(key_map))
    shapes = [f"{k} {list(tensors[k].shape)} (expected {list(m.shape)})" for k, m in key_map.items()
              if k in tensors and tensors[k].shape != m.shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_names(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} with another shape: {_names(shapes)}")
    if problems:
        raise ConvertError(f"{where} does not match RSUniVLM's {len(key_map)} tensors for its config.json: "
                           + "; ".join(problems))
    by_dtype: dict[str, list[str]] = {}
    for k in key_map:
        if k in tensors:
            by_dtype.setdefault(tensors[k].dtype, []).append(k)
    if len(by_dtype) != 1 or next(iter(by_dtype)) not in FLOAT_DTYPES:
        found = "; ".join(f"{d}: {len(ks)} ({_names(ks[:3])})" for d, ks in sorted(by_dtype.items()))
        raise ConvertError(f"{where} mixes tensor dtypes or holds non-float ones ({found}); expected all of one of "
                           f"{', '.join(FLOAT_DTYPES)} (RSUniVLM is stored in BF16)")
    return next(iter(by_dtype))


# --------------------------------------------------------------------------------------------------- conversion


@dataclass
class ConvertStats:
    tensors: int = 0
    params: int = 0
    underflow: int = 0  # nonzero source values that became 0 in the output dtype
    warnings: list[str] = field(default_factory=list)


def _converted(sources: list[tuple[str, TensorInfo, KeyMapping]], out_dtype: str, stats: ConvertStats,
               handles: dict[Path, Any]) -> Callable[[], Iterator[bytes]]:
    """A chunk generator for one output tensor: its source parts in order, each cut to ``rows`` and converted."""

    def chunks() -> Iterator[bytes]:
        for name, info, m in sources:
            row_bytes = int(np.prod(info.shape[1:], dtype=np.int64)) * DTYPE_SIZES[info.dtype]
            nbytes = m.rows * row_bytes if m.rows is not None else None
            for data in read_chunks(handles[info.path], info, nbytes):
                if info.dtype == out_dtype:
                    yield data
                    continue
                values = to_float_array(data, info.dtype)
                out = from_float_array(values, out_dtype)
                if out_dtype == "F16":
                    half = np.frombuffer(out, dtype="<f2")
                    over = np.isinf(half) & np.isfinite(values)
                    if over.any():
                        raise ConvertError(f"tensor {name} has values beyond float16's range (max |x| = "
                                           f"{float(np.abs(values[over]).max()):.4g}); convert with --dtype bf16 or fp32")
                    stats.underflow += int(np.count_nonzero((half == 0) & (values != 0)))
                yield out

    return chunks


def plan_outputs(key_map: dict[str, KeyMapping], tensors: dict[str, TensorInfo], out_dtype: str, stats: ConvertStats,
                 handles: dict[Path, Any]) -> list[OutputTensor]:
    groups: dict[str, list[tuple[str, TensorInfo, KeyMapping]]] = {}
    for name, m in key_map.items():
        if m.target is not None:
            groups.setdefault(m.target, []).append((name, tensors[name], m))
    shapes = target_shapes(key_map)
    out = []
    for target, parts in groups.items():
        parts.sort(key=lambda p: p[2].part or 0)
        out.append(OutputTensor(target, out_dtype, shapes[target], _converted(parts, out_dtype, stats, handles)))
    return out


def tied_head_differs(tensors: dict[str, TensorInfo], rows: int, handles: dict[Path, Any]) -> bool:
    """For a tied model that still stores lm_head: do its first ``rows`` rows differ from embed_tokens'?"""
    head, embed = tensors.get("lm_head.weight"), tensors["model.embed_tokens.weight"]
    if head is None:
        return False
    nbytes = rows * int(np.prod(head.shape[1:], dtype=np.int64)) * DTYPE_SIZES[head.dtype]
    pairs = zip(read_chunks(handles[head.path], head, nbytes), read_chunks(handles[embed.path], embed, nbytes))
    return any(a != b for a, b in pairs)


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ConvertResult:
    out_dir: Path
    config: ModelConfig
    output_bytes: int
    seconds: float
    peak_rss_bytes: int
    stats: ConvertStats


def convert_rsunivlm(src_dir: str | Path, out_dir: str | Path, dtype: str = "fp16", overwrite: bool = False,
                     progress: bool = True) -> ConvertResult:
    """Check and convert; see the module docstring. Raises :class:`ConvertError` with one clear message."""
    if dtype not in OUTPUT_DTYPES:
        raise ConvertError(f"unknown output dtype {dtype!r}; choose one of {', '.join(OUTPUT_DTYPES)}")
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not overwrite)):
        raise ConvertError(f"{out_dir} exists and is not an empty directory; pass --overwrite to replace it")
    src = read_source(src_dir)
    cfg_path = src.root / "config.json"
    cfg = model_config(src.hf_config, src.tensors, src.tokenizer_len, cfg_path)
    stored_vocab = src.hf_config["vocab_size"]
    key_map = rsunivlm_key_map(cfg, stored_vocab)
    where = ", ".join(str(p) for p in src.weight_files)
    src_dtype = check_tensors(key_map, src.tensors, where)
    out_dtype = OUTPUT_DTYPES[dtype]
    stats = ConvertStats()
    handles = {p: open(p, "rb") for p in src.weight_files}
    try:
        if cfg.tie_word_embeddings and tied_head_differs(src.tensors, cfg.vocab_size, handles):
            stats.warnings.append("tie_word_embeddings is true but the stored lm_head.weight differs from "
                                  "embed_tokens; it is ignored, as the reference's tied model ignores it")
        outputs = plan_outputs(key_map, src.tensors, out_dtype, stats, handles)
        with staged_dir(out_dir, overwrite=overwrite, error=ConvertError) as stage:
            size = _write_weights(stage / "model.safetensors", outputs, cfg, progress)
            stats.tensors, stats.params = len(outputs), sum(int(np.prod(t.shape)) for t in outputs)
            cfg.save(stage / "config.json")
            _write_tokenizer(src, stage / "tokenizer.json")
            if src.generation_config is not None:
                shutil.copyfile(src.generation_config, stage / "generation_config.json")
            provenance = {
                "tool": "rsvlm-edge convert rsunivlm", "version": __version__, "arch": ARCH,
                "source": {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                           for p in src.weight_files + [src.root / "config.json", src.root / "tokenizer.json"]
                           + ([src.generation_config] if src.generation_config else [])},
                "config_fields": recorded_fields(src.hf_config),
                "dtype": {"source": src_dtype, "output": out_dtype},
                "vocab": {"stored_rows": stored_vocab, "len_tokenizer": cfg.vocab_size,
                          "added_im_patch_token": src.added_im_patch},
                "not_stored": sorted(k for k, m in key_map.items() if m.target is None and k in src.tensors),
                "float16_underflow_values": stats.underflow,
                "warnings": stats.warnings,
            }
            atomic_write_text(stage / "convert.json", json.dumps(provenance, indent=2) + "\n")
    except OSError as exc:
        raise ConvertError(f"cannot write {out_dir}: {exc.strerror or exc}") from None
    except SafetensorsError as exc:
        raise ConvertError(str(exc)) from None
    finally:
        for fh in handles.values():
            fh.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return ConvertResult(out_dir, cfg, size, time.perf_counter() - t0, peak, stats)


def _write_weights(path: Path, outputs: list[OutputTensor], cfg: ModelConfig, progress: bool) -> int:
    from tqdm import tqdm

    total = sum(t.nbytes for t in outputs)
    with tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=not progress, leave=False) as bar:
        return write_streamed(path, outputs, metadata={"format": "pt", "model": cfg.name},
                              progress=lambda t: bar.update(t.nbytes))


def _write_tokenizer(src: Source, path: Path) -> None:
    """The checkpoint's tokenizer.json byte for byte, or with ``<im_patch>`` added as builder.py adds it."""
    if not src.added_im_patch:
        shutil.copyfile(src.root / "tokenizer.json", path)
        return
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(src.root / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(IM_PATCH_TOKEN, special=True, normalized=False)])
    tok.save(str(path))
