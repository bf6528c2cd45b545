"""Batched sampling on the GPU with no host round trip: temperature, top-k, top-p, min-p, per-row seeds.

Filters apply in Hugging Face's order (temperature, top-k, top-p, min-p); min-p compares with the most likely
token, so it keeps the same set whichever renormalisation came before. A token is drawn by the Gumbel-max
trick, argmax(logit / T + g), with g from a counter-based hash of (seed, token id): any row's draw depends only
on its own seed, so the caller gives each row and step its own seed (e.g. request seed + tokens generated).
Temperature 0 means greedy.
"""

import torch

from weir_server.kernels import HAS_TRITON, require_triton, tl, triton

_MASK32 = 0xFFFFFFFF
_SEED_SALT = 0x9E3779B9
_INDEX_SALT = 0x85EBCA6B
_ARGMAX_BLOCK = 4096


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding 32-bit values (int64 products wrap; the mask keeps the low bits)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def gumbel_noise(seeds: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] float32 standard Gumbel noise, a pure function of (seed, token id); the kernel computes the same."""
    seeds = seeds.long()
    key = _hash32((seeds & _MASK32) ^ _hash32(((seeds >> 32) & _MASK32) ^ _SEED_SALT))
    index = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    bits = _hash32(key[:, None] ^ _hash32(index[None, :] ^ _INDEX_SALT))
    # 23 bits: (2**23 - 0.5) / 2**23 is exact in float32, while 24 bits round the top value up to 1.0 (noise +inf,
    # and -inf + inf = NaN on a filtered token, which argmax would pick).
    uniform = ((bits >> 9).float() + 0.5) * (1.0 / (1 << 23))  # in (0, 1), never 0 or 1
    return -torch.log(-torch.log(uniform))


def apply_top_k_top_p_min_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None, min_p: torch.Tensor
) -> torch.Tensor:
    """Set logits outside each row's top-k / top-p / min-p set to -inf.

    top_k <= 0 and top_p = 1 turn a filter off for a row; None turns it off for the batch, and with both None
    no sort is needed (the caller knows this from its requests without asking the device).
    """
    if top_k is None and top_p is None:
        # p_i >= min_p * p_max  <=>  logit_i >= max logit + log(min_p); min_p = 0 gives -inf, keeping all.
        threshold = logits.max(dim=-1, keepdim=True).values + min_p[:, None].to(logits.dtype).log()
        return logits.masked_fill(logits < threshold, float("-inf"))
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
        remove |= torch.arange(vocab, device=logits.device)[None, :] >= k[:, None]
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
    if top_p is not None:
        mass_before = probs.cumsum(dim=-1) - probs
        remove |= mass_before >= top_p[:, None].to(probs.dtype)  # the smallest prefix holding top_p of the mass
    remove |= probs < min_p[:, None].to(probs.dtype) * probs[:, :1]
    remove[:, 0] = False  # the most likely token always survives
    return logits.scatter(-1, order, sorted_logits.masked_fill(remove, float("-inf")))


def sample_torch(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor,
    seeds: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The whole sampler in torch ops at `dtype`; [B] int64 token ids."""
    greedy = temperatures <= 0
    scaled = logits.to(dtype) / torch.where(greedy, 1.0, temperatures.to(dtype))[:, None]
    filtered = apply_top_k_top_p_min_p(scaled, top_k, top_p, min_p)
    noise = gumbel_noise(seeds, logits.shape[-1]).to(dtype).masked_fill(greedy[:, None], 0.0)
    return (filtered + noise).argmax(dim=-1)


def top_k_top_p_min_p_sample_ref(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor,
    seeds: torch.Tensor,
) -> torch.Tensor:
    """Reference in float64: logits [B, V], per-row parameters [B] -> token ids [B] int64."""
    return sample_torch(logits, temperatures, top_k, top_p, min_p, seeds, dtype=torch.float64)


def top_k_top_p_min_p_sample(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor,
    seeds: torch.Tensor,
) -> torch.Tensor:
    """Filters in float32 torch ops, then one Triton pass for noise + argmax; [B] int64 token ids."""
    require_triton()
    greedy = temperatures <= 0
    scaled = logits.float() / torch.where(greedy, 1.0, temperatures.float())[:, None]
    filtered = apply_top_k_top_p_min_p(scaled, top_k, top_p, min_p).contiguous()
    return gumbel_argmax(filtered, seeds, greedy)


def gumbel_argmax(logits: torch.Tensor, seeds: torch.Tensor, greedy: torch.Tensor) -> torch.Tensor:
    """Triton: argmax(logits + gumbel_noise(seeds)) per row (no noise on greedy rows), noise made in place."""
    require_triton()
    batch, vocab = logits.shape
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if batch:
        _gumbel_argmax_kernel[(batch,)](
            logits,
            seeds.long().contiguous(),
            greedy.contiguous(),
            out,
            vocab,
            logits.stride(0),
            BLOCK=_ARGMAX_BLOCK,
            num_warps=8,
        )
    return out


if HAS_TRITON:

    @triton.jit
    def _hash32_tl(x):
        x = x ^ (x >> 16)
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x = x ^ (x >> 15)
        x = (x * tl.full([], 0x846CA68B, tl.int64)) & 0xFFFFFFFF
        return x ^ (x >> 16)

    @triton.jit
    def _gumbel_argmax_kernel(logits_ptr, seeds_ptr, greedy_ptr, out_ptr, vocab, stride_row, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        seed = tl.load(seeds_ptr + row)
        noisy = tl.load(greedy_ptr + row) == 0
        key = _hash32_tl((seed & 0xFFFFFFFF) ^ _hash32_tl(((seed >> 32) & 0xFFFFFFFF) ^ 0x9E3779B9))
        best = tl.full([], float("-inf"), tl.float32)
        best_index = tl.full([], 0, tl.int64)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < vocab
            x = tl.load(logits_ptr + row.to(tl.int64) * stride_row + cols, mask=mask, other=float("-inf"))
            bits = _hash32_tl(key ^ _hash32_tl(cols.to(tl.int64) ^ 0x85EBCA6B))
            uniform = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)  # 23 bits, as gumbel_noise
            gumbel = -tl.log(-tl.log(uniform))
            score = tl.where(mask, x + tl.where(noisy, gumbel, 0.0), float("-inf"))
            chunk_best = tl.max(score, 0)
            chunk_index = tl.argmax(score, 0).to(tl.int64) + start
            better = chunk_best > best  # strict: the first maximum wins, as torch.argmax
            best_index = tl.where(better, chunk_index, best_index)
            best = tl.where(better, chunk_best, best)
        tl.store(out_ptr + row, best_index)
