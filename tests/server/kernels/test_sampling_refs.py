"""The torch sampler reference: filters against a per-row loop, seeded Gumbel noise, sampling frequencies."""

import math

import pytest
import torch

from weir_server.kernels.sampling import apply_top_k_top_p_min_p, gumbel_noise, top_k_top_p_min_p_sample_ref


def naive_keep(logits: list[float], top_k: int, top_p: float, min_p: float) -> set[int]:
    """Token ids a row may produce, filter by filter in Hugging Face's order."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    if top_k > 0:
        order = order[:top_k]
    weights = [math.exp(logits[i] - logits[order[0]]) for i in order]
    total = sum(weights)
    probs = [w / total for w in weights]
    kept, mass = [], 0.0
    for i, p in zip(order, probs, strict=True):
        if mass >= top_p:
            break
        kept.append((i, p))
        mass += p
    return {i for i, p in kept if p >= min_p * probs[0]}


def params(rows: list[tuple[float, int, float, float]]) -> tuple[torch.Tensor, ...]:
    t, k, p, m = zip(*rows, strict=True)
    return (
        torch.tensor(t, dtype=torch.float32),
        torch.tensor(k),
        torch.tensor(p, dtype=torch.float32),
        torch.tensor(m, dtype=torch.float32),
    )


ROWS = [(1.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.3, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.2), (0.5, 10, 0.9, 0.05)]


def test_filters_keep_the_same_tokens_as_a_per_row_loop():
    logits = torch.randn(len(ROWS), 40, dtype=torch.float64) * 2
    temperatures, top_k, top_p, min_p = params(ROWS)
    scaled = logits / temperatures.double()[:, None]
    filtered = apply_top_k_top_p_min_p(scaled, top_k, top_p, min_p)
    for row, (_, k, p, m) in enumerate(ROWS):
        kept = set(torch.nonzero(filtered[row] > float("-inf")).flatten().tolist())
        assert kept == naive_keep(scaled[row].tolist(), k, p, m)
        assert torch.equal(filtered[row][list(kept)], scaled[row][list(kept)])


def test_gumbel_noise_is_a_function_of_seed_and_token_only():
    seeds = torch.tensor([7, 2**40 + 3, -5])
    noise = gumbel_noise(seeds, 1000)
    assert torch.equal(noise, gumbel_noise(seeds, 1000))
    assert torch.equal(noise[1], gumbel_noise(seeds[1:2], 1000)[0])  # other rows do not matter
    assert torch.equal(noise[:, :10], gumbel_noise(seeds, 10))  # nor does the vocabulary size
    assert not torch.allclose(noise[0], noise[2])


def test_gumbel_noise_has_the_gumbel_mean_and_spread():
    noise = gumbel_noise(torch.arange(50), 4000).double()
    assert abs(noise.mean().item() - 0.5772156649) < 0.01
    assert abs(noise.std().item() - math.pi / math.sqrt(6)) < 0.01


def test_temperature_zero_and_top_k_one_are_greedy():
    logits = torch.randn(4, 100)
    temperatures, top_k, top_p, min_p = params([(0.0, 0, 1.0, 0.0), (1.5, 1, 1.0, 0.0)] * 2)
    tokens = top_k_top_p_min_p_sample_ref(logits, temperatures, top_k, top_p, min_p, torch.arange(4))
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_samples_stay_inside_each_rows_filtered_set():
    logits = torch.randn(len(ROWS), 64) * 3
    temperatures, top_k, top_p, min_p = params(ROWS)
    scaled = logits.double() / temperatures.double()[:, None]
    for seed in range(20):
        seeds = torch.arange(len(ROWS)) * 1000 + seed
        tokens = top_k_top_p_min_p_sample_ref(logits, temperatures, top_k, top_p, min_p, seeds)
        for row, (_, k, p, m) in enumerate(ROWS):
            assert tokens[row].item() in naive_keep(scaled[row].tolist(), k, p, m)


OVERFLOWING_SEED, OVERFLOWING_TOKEN = 3072118707688577666, 15525  # its 24 hash bits are all ones


def test_top_k_one_samples_the_greedy_token_even_where_the_noise_overflows():
    logits = torch.randn(1, 32000, generator=torch.Generator().manual_seed(0))
    temperatures, top_k, top_p, min_p = params([(1.0, 1, 1.0, 0.0)])
    seeds = torch.tensor([OVERFLOWING_SEED])
    token = top_k_top_p_min_p_sample_ref(logits, temperatures, top_k, top_p, min_p, seeds)
    assert token.item() == logits.argmax().item() != OVERFLOWING_TOKEN


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.6, 0.9)])
def test_sample_frequencies_follow_the_filtered_distribution(temperature, top_p):
    draws = 20000
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).expand(draws, -1)
    temperatures, top_k, top_p_t, min_p = params([(temperature, 0, top_p, 0.0)] * draws)
    tokens = top_k_top_p_min_p_sample_ref(logits, temperatures, top_k, top_p_t, min_p, torch.arange(draws))
    filtered = apply_top_k_top_p_min_p(logits[:1].double() / temperature, top_k[:1], top_p_t[:1], min_p[:1])
    expected = filtered.softmax(dim=-1)[0]
    observed = torch.bincount(tokens, minlength=6).double() / draws
    assert (observed - expected).abs().max() < 0.015


def test_batch_wide_off_filters_skip_the_sort_and_keep_the_same_tokens():
    logits = torch.randn(6, 300, dtype=torch.float64) * 3
    min_p = torch.tensor([0.0, 0.01, 0.1, 0.3, 0.9, 1.0], dtype=torch.float64)
    off_k, off_p = torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.float64)
    sorted_path = apply_top_k_top_p_min_p(logits, off_k, off_p, min_p)
    torch.testing.assert_close(apply_top_k_top_p_min_p(logits, None, None, min_p), sorted_path)
    temperatures = torch.full((6,), 0.8)
    seeds = torch.arange(6)
    assert torch.equal(
        top_k_top_p_min_p_sample_ref(logits, temperatures, None, None, min_p, seeds),
        top_k_top_p_min_p_sample_ref(logits, temperatures, off_k, off_p, min_p, seeds),
    )
