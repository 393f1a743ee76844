"""Per-request seeds: a seeded row's draws depend on its seed and token index alone, never on
the other rows.

The sampler keys each row's noise by (its seed, the index of the token it draws); a sampler
that keyed noise by row position, or mixed rows' keys, would make a seeded request depend on
what it was batched with.
"""

from __future__ import annotations

import torch

from tesela.engine.sampler import Sampler
from tesela.engine.sampling_params import SamplingParams

VOCAB = 64
STEPS = 12


def draws(rows: list[tuple[str, SamplingParams]], watch: str) -> list[int]:
    """The tokens row `watch` draws over STEPS steps of flat logits, batched with `rows`."""
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = torch.zeros(len(rows), VOCAB)  # flat: every token is the noise's choice
    ids = [rid for rid, _ in rows]
    params = [p for _, p in rows]
    return [
        sampler(logits, params, ids, [step] * len(rows))[0][ids.index(watch)]
        for step in range(STEPS)
    ]


def test_seeded_row_draws_do_not_depend_on_the_batch():
    seeded = SamplingParams(seed=7)
    alone = draws([("a", seeded)], "a")
    assert len(set(alone)) > 3  # really random draws, not a constant
    batched = [
        [("b", SamplingParams(seed=99)), ("a", seeded)],
        [("c", SamplingParams()), ("b", SamplingParams(seed=1)), ("a", seeded)],
        [("a", seeded), ("g", SamplingParams(temperature=0)), ("d", SamplingParams(seed=7))],
    ]
    for rows in batched:
        assert draws(rows, "a") == alone, [rid for rid, _ in rows]


def test_two_requests_with_one_seed_draw_the_same_tokens_side_by_side():
    rows = [("x", SamplingParams(seed=5)), ("y", SamplingParams(seed=5))]
    assert draws(rows, "x") == draws(rows, "y") == draws([("z", SamplingParams(seed=5))], "z")


def test_noise_is_a_function_of_seed_and_index_only():
    from tesela.executor.sampling import uniform_noise

    seeds = torch.tensor([7, 7, 99, 2**32 - 1])
    index = torch.tensor([0, 1, 0, 5])
    noise = uniform_noise(seeds, index, VOCAB)
    assert noise.min() > 0 and noise.max() < 1
    order = torch.tensor([3, 1, 0, 2])  # another batch order: each row keeps its own noise
    assert torch.equal(uniform_noise(seeds[order], index[order], VOCAB), noise[order])
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    # A longer vocabulary extends each row's noise without changing its start.
    assert torch.equal(uniform_noise(seeds, index, 2 * VOCAB)[:, :VOCAB], noise)


def test_draws_follow_the_softmax_distribution():
    """Gumbel-max over the hashed noise samples tokens with the model's probabilities."""
    from tesela.executor.sampling import SamplingTensors, SamplingVariant, sample

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 4000
    params = [SamplingParams(temperature=1.0, seed=3)] * n
    tensors = SamplingTensors.build(params, [3] * n, list(range(n)), 4, "cpu")
    logits = probs.log().expand(n, 4)
    drawn = sample(logits, tensors, SamplingVariant(random=True)).tokens
    frequencies = torch.bincount(drawn, minlength=4).float() / n
    assert (frequencies - probs).abs().max() < 0.03, frequencies
    # Temperature 0.5 squares the odds: p_i^2 / sum p^2.
    cold = [SamplingParams(temperature=0.5, seed=3)] * n
    tensors = SamplingTensors.build(cold, [3] * n, list(range(n)), 4, "cpu")
    drawn = sample(logits, tensors, SamplingVariant(random=True)).tokens
    expected = probs**2 / (probs**2).sum()
    frequencies = torch.bincount(drawn, minlength=4).float() / n
    assert (frequencies - expected).abs().max() < 0.03, frequencies
