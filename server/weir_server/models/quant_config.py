"""A checkpoint's quantization, read from config.json's `quantization_config` (as vLLM does) or asked for with
`--quantization fp8` (a float checkpoint quantized while it loads).

Weir keeps these weights quantized in memory: AWQ (AutoAWQ's GEMM format) and GPTQ (AutoGPTQ / GPTQModel, formats
`gptq` and `gptq_v2`) as 4-bit groups (layers/int4_linear.py), FP8 e4m3 with per-tensor or per-channel scales
(layers/fp8_linear.py). Anything else is refused at load with one line naming what is supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

INT4_METHODS = ("awq", "gptq")
METHODS = (*INT4_METHODS, "fp8")
INT4_GROUP_SIZES = (32, 64, 128)

Method = Literal["awq", "gptq", "fp8"]


class QuantConfigError(ValueError):
    """A quantization the checkpoint or the command line asks for that Weir cannot run."""


@dataclass(frozen=True)
class QuantConfig:
    """How a checkpoint's linear layers are quantized."""

    method: Method
    bits: int = 4
    group_size: int = 128
    # GPTQ's `gptq` format stores each zero point minus one (its packing's historical convention); `gptq_v2` and
    # AWQ store the zero itself.
    zero_offset: int = 0
    desc_act: bool = False  # GPTQ act-order: g_idx permutes the input rows into groups
    # FP8: True when the checkpoint holds float weights that are quantized per output channel while loading.
    quantize_on_load: bool = False
    # FP8 `activation_scheme: static`: the checkpoint's input_scale tensors are read and set aside (activations are
    # scaled per token at each call, which is at least as accurate).
    static_input_scale: bool = False

    @property
    def is_int4(self) -> bool:
        return self.method in INT4_METHODS


def quant_config_of(hf_config: Any, requested: str | None = None) -> QuantConfig | None:
    """The checkpoint's quantization (None for a float checkpoint); `requested` is `--quantization` (None, "awq",
    "gptq" or "fp8"). Raise QuantConfigError for what Weir cannot run."""
    raw = getattr(hf_config, "quantization_config", None)
    if raw is not None and not isinstance(raw, dict):
        raw = raw.to_dict() if hasattr(raw, "to_dict") else vars(raw)
    if raw is None:
        if requested == "fp8":
            return QuantConfig(method="fp8", bits=8, group_size=0, quantize_on_load=True)
        if requested in INT4_METHODS:
            raise QuantConfigError(
                f"--quantization {requested}: the checkpoint has no quantization_config in config.json; "
                f"{requested} needs a checkpoint quantized by its tool (--quantization fp8 quantizes a float one)"
            )
        return None
    method = str(raw.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        method = _compressed_tensors_method(raw)
    if method not in METHODS:
        raise QuantConfigError(
            f"quantization_config: quant_method {raw.get('quant_method')!r} is not supported; Weir runs "
            f"{', '.join(METHODS)} checkpoints"
        )
    if requested is not None and requested != method:
        raise QuantConfigError(f"--quantization {requested}, but the checkpoint is quantized with {method}")
    if method == "fp8":
        return _fp8(raw)
    return _int4(method, raw)


def _int4(method: str, raw: dict[str, Any]) -> QuantConfig:
    bits = int(raw.get("bits", raw.get("w_bit", 0)))
    if bits != 4:
        raise QuantConfigError(f"quantization_config: {method} with bits={bits} is not supported; Weir runs 4-bit")
    group_size = int(raw.get("group_size", raw.get("q_group_size", 0)))
    if group_size not in INT4_GROUP_SIZES:
        sizes = ", ".join(map(str, INT4_GROUP_SIZES))
        raise QuantConfigError(
            f"quantization_config: {method} group_size {group_size} is not supported; Weir runs group sizes {sizes}"
        )
    if raw.get("lm_head"):
        raise QuantConfigError(
            f"quantization_config: {method} with a quantized lm_head is not supported; Weir runs "
            "quantized decoder projections with a float lm_head"
        )
    if method == "awq":
        version = str(raw.get("version", "gemm")).lower()
        if version != "gemm":
            raise QuantConfigError(f"quantization_config: AWQ version {version!r} is not supported; Weir runs 'gemm'")
        if not raw.get("zero_point", True):
            raise QuantConfigError("quantization_config: AWQ without zero_point is not supported; Weir runs zero_point")
        return QuantConfig(method="awq", group_size=group_size)
    fmt = str(raw.get("checkpoint_format", raw.get("format", "gptq")) or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise QuantConfigError(
            f"quantization_config: GPTQ checkpoint_format {fmt!r} is not supported; Weir runs gptq and gptq_v2"
        )
    return QuantConfig(
        method="gptq",
        group_size=group_size,
        zero_offset=1 if fmt == "gptq" else 0,
        desc_act=bool(raw.get("desc_act", False)),
    )


def _fp8(raw: dict[str, Any]) -> QuantConfig:
    scheme = str(raw.get("activation_scheme", "dynamic")).lower()
    for group in (raw.get("config_groups") or {}).values():  # compressed-tensors says it per group of layers
        inputs = group.get("input_activations") if isinstance(group, dict) else None
        if isinstance(inputs, dict) and not inputs.get("dynamic", True):
            scheme = "static"
    if scheme not in ("dynamic", "static"):
        raise QuantConfigError(
            f"quantization_config: fp8 activation_scheme {scheme!r} is not supported; Weir runs dynamic (and static "
            "checkpoints with dynamic scales)"
        )
    block = raw.get("weight_block_size")
    if block:
        raise QuantConfigError(
            f"quantization_config: fp8 weight_block_size {block} (block-wise scales) is not supported; Weir runs "
            "per-tensor and per-channel scales"
        )
    return QuantConfig(method="fp8", bits=8, group_size=0, static_input_scale=scheme == "static")


def _compressed_tensors_method(raw: dict[str, Any]) -> str:
    """compressed-tensors configs name their format per group of layers; Weir runs the float8 ones as fp8."""
    formats = {str(raw.get("format", ""))}
    for group in (raw.get("config_groups") or {}).values():
        if isinstance(group, dict):
            formats.add(str(group.get("format", raw.get("format", ""))))
    formats.discard("")
    if formats and formats <= {"float-quantized", "naive-quantized"}:
        weights = [g.get("weights") or {} for g in (raw.get("config_groups") or {}).values() if isinstance(g, dict)]
        if all(w.get("type", "float") == "float" and int(w.get("num_bits", 8)) == 8 for w in weights):
            return "fp8"
    return f"compressed-tensors ({', '.join(sorted(formats)) or 'unknown format'})"
