"""`--kv-cache-dtype` (vLLM's option): the KV cache in the model's dtype (auto) or in float8 e4m3 (fp8, fp8_e4m3),
which halves a bf16 cache. Values are stored unscaled (a scale of 1.0, vLLM's default without calibrated scales):
a cache write casts to e4m3 and attention reads back in the query's dtype. The e4m3 casts need a GPU of compute
capability 8.9 or newer; elsewhere the option is refused at start-up, before anything loads.
"""

from __future__ import annotations

import torch

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
_FP8_NAMES = ("fp8", "fp8_e4m3")


def check_kv_cache_dtype(name: str, device: str) -> None:
    """Raise ValueError (one line) for a --kv-cache-dtype this machine cannot hold with --device `device`."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"--kv-cache-dtype {name}: not supported; Weir runs {', '.join(KV_CACHE_DTYPES)}")
    if name == "auto":
        return
    target = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else device if device != "auto" else "cpu"
    )
    if target.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"--kv-cache-dtype {name} needs a CUDA GPU (compute capability 8.9+); on CPU use auto")
    capability = torch.cuda.get_device_capability(target)
    if capability < (8, 9):
        raise ValueError(
            f"--kv-cache-dtype {name} needs compute capability 8.9+ (Ada, Hopper); this GPU has "
            f"{capability[0]}.{capability[1]}: use auto"
        )


def kv_cache_torch_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the KV cache tensors hold."""
    return torch.float8_e4m3fn if name in _FP8_NAMES else model_dtype
