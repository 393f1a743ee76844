"""One key per device, for tables of per-device buffers and for "is this the same device"."""

from __future__ import annotations

import torch


def device_key(device: torch.device | str) -> torch.device:
    """One key per device: the engine builds with "cuda", tensors report "cuda:0", and
    torch.device("cuda") != torch.device("cuda:0"). A tensor's device (the per-layer lookups)
    is returned as it is."""
    if isinstance(device, torch.device) and (device.index is not None or device.type != "cuda"):
        return device
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
