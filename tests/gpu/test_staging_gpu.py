"""Pinned host staging (tesela/core/staging.py) on CUDA: a buffer of the ring is refilled only
after the copy that last read it has run, however far the GPU lags behind the host."""

from __future__ import annotations

import torch

from tesela.core.staging import HostStaging


def test_a_buffer_is_reused_only_after_its_copy_ran():
    staging = HostStaging(4, torch.int32, torch.device("cuda"), depth=2)
    targets = [torch.zeros(4, dtype=torch.int32, device="cuda") for _ in range(3)]
    torch.cuda._sleep(200_000_000)  # the GPU is busy for ~0.1 s: every copy below queues
    for value, target in enumerate(targets, start=1):
        host = staging.acquire()  # the third waits for the first copy (same host buffer)
        host[:] = value
        staging.send(target, 4)
    torch.cuda.synchronize()
    assert [t.tolist() for t in targets] == [[1] * 4, [2] * 4, [3] * 4]
