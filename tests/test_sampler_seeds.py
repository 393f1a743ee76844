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
