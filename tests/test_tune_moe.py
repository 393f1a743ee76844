"""The MoE tuner's routings (tesela/tune/moe.py): each expert read cold, as in a decode step."""

from __future__ import annotations

import torch

from tesela.tune.moe import ROUTINGS, make_routings


def test_small_batches_take_disjoint_experts_in_turn():
    routings = make_routings(num_experts=128, top_k=8, num_tokens=1, device="cpu")
    assert len(routings) == 16
    ids = torch.cat([r[1].flatten() for r in routings])
    assert sorted(ids.tolist()) == list(range(128))  # every expert once: none served from L2
    for weights, expert_ids in routings:
        assert weights.shape == expert_ids.shape == (1, 8)


def test_batches_that_cover_the_experts_get_random_routings():
    assert len(make_routings(num_experts=8, top_k=2, num_tokens=4, device="cpu")) == 1
    routings = make_routings(num_experts=8, top_k=2, num_tokens=16, device="cpu")
    assert len(routings) == ROUTINGS and routings[0][1].shape == (16, 2)
