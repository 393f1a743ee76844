"""`tesela doctor`: what this machine has and what the attention policy decides on it.

The report lists versions, the device, every attention backend the policy table declares
(available here, or declared but unavailable and why: a missing package, no tesela adapter, a
variant not implemented), the decision for the given settings with one reason per line, and,
for illustration, what the policy does for flashinfer and triton on SM80/SM90/SM100 with
piecewise graphs on and off (assuming every package and adapter present, so the hardware
rules show).
"""

from __future__ import annotations

import importlib
import os
import platform

from tesela.attention.policy import (
    BACKEND_SPECS,
    DeviceInfo,
    availability,
    package_importable,
    resolve_attention,
)

ILLUSTRATED_CAPABILITIES = ((8, 0), (9, 0), (10, 0))
ILLUSTRATED_BACKENDS = ("flashinfer", "triton")


def doctor_report(
    device: str | None = None,
    *,
    attention_backend: str = "auto",
    dtype: str = "bfloat16",
    head_dim: int = 128,
    piecewise: bool | None = None,
    full_decode: bool = True,
    full_mixed: bool = True,
) -> str:
    """The plain-text report. `device` is "cpu", "cuda", "cuda:1" or None (auto).
    `piecewise` None means the engine's default there: on for CUDA, off for CPU (where the
    engine runs eagerly and nothing is captured)."""
    info = DeviceInfo.detect(device)
    if piecewise is None:
        piecewise = info.kind == "cuda"
    settings = dict(
        dtype=dtype,
        head_dim=head_dim,
        piecewise=piecewise,
        full_decode=full_decode,
        full_mixed=full_mixed,
    )
    sections = [
        _versions_section(),
        _device_section(info, device),
        _backends_section(),
        _decision_section(attention_backend, info, settings),
        _illustration_section(settings),
        _launchers_section(),
        _pdl_section(info, device),
        _tensor_parallel_section(info),
        _gemv_section(info),
        _lora_section(info),
    ]
    return "\n\n".join(sections) + "\n"


def _launchers_section() -> str:
    """How the Triton attention kernels are launched in this process: through their cached
    compiled handles, or through kernel[grid] and why (the interpreter, an unexpected Triton)."""
    try:  # optional dependency: triton
        from tesela.attention.triton_kernels.decode_attention import STAGE1, STAGE2
        from tesela.attention.triton_kernels.extend_attention import EXTEND
        from tesela.attention.triton_kernels.store_kv import STORE_KV
    except ImportError as error:
        return f"Triton kernel launchers: unavailable ({error})"
    lines = ["Triton kernel launchers:"]
    for launcher in (STORE_KV, EXTEND, STAGE1, STAGE2):
        reason = launcher.fallback_reason
        how = "cached compiled handle" if reason is None else f"kernel[grid] ({reason})"
        lines.append(f"  {launcher.name:<22} {how}")
    return "\n".join(lines)


def _pdl_section(info: DeviceInfo, requested: str | None) -> str:
    """Whether Triton kernels launch with programmatic dependent launch here (core/pdl.py)."""
    import torch

    from tesela.core import pdl

    device = torch.device(requested or ("cuda" if info.kind == "cuda" else "cpu"))
    return f"programmatic dependent launch (PDL): {pdl.status(device)[1]}"


def _tensor_parallel_section(info: DeviceInfo) -> str:
    """What a tensor-parallel engine over every visible GPU (two CPU ranks on a CPU machine)
    would pick for its all-reduces here, with the engine's defaults, and why: the same pure
    choices every rank makes at start-up (distributed/custom_all_reduce.py)."""
    from tesela.config import ParallelConfig
    from tesela.distributed.custom_all_reduce import (
        choose_all_reduce,
        choose_all_reduce_add_norm,
    )
    from tesela.distributed.fused_all_reduce import kernel_interpreted

    size = 2
    if info.kind == "cuda":
        import torch

        size = torch.cuda.device_count()
        if size < 2:
            return f"tensor parallelism: {size} GPU visible, nothing to split a model over"
    defaults = ParallelConfig()
    plain = choose_all_reduce(
        device_type=info.kind, world_size=size, enabled=defaults.custom_all_reduce, env=os.environ
    )
    fused = choose_all_reduce_add_norm(
        device_type=info.kind,
        world_size=size,
        enabled=defaults.fused_all_reduce_add_norm,
        env=os.environ,
        interpreted=kernel_interpreted(),
    )
    lines = [
        f"  all-reduce: {plain}",
        f"  decode batches' all-reduce + add + norm: {fused}",
    ]
    if plain.kind == "symm_mem" or (fused.kind == "fused" and info.kind == "cuda"):
        lines.append(
            "  peer memory serves the first TP engine of a process; a later one keeps NCCL"
        )
    return f"tensor parallelism at size {size} (engine defaults)\n" + "\n".join(lines)


def _gemv_section(info: DeviceInfo) -> str:
    """Which small-M kernel serves each decode GEMM on this device (the tuned table,
    tesela/layers/gemv.py), per M bucket, and what runs everywhere else."""
    from tesela.layers.gemv import table_kernels

    if info.kind != "cuda":
        return "small-M GEMMs: torch's linear on CPU (the Triton GEMVs serve tuned GPUs)"
    entries = table_kernels(info.name)
    lines = [f"small-M GEMMs on {info.name} (bfloat16; M buckets):"]
    for (prologue, n, k), kinds in sorted(entries.items()):
        what = "" if prologue == "none" else f" with the {prologue} prologue"
        where = "; ".join(f"{kind} at {', '.join(map(str, b))}" for kind, b in kinds.items())
        lines.append(f"  {n} x {k}{what}: {where}")
    rest = "everywhere else" if entries else "no entry for this card (python -m tesela.tune.gemv)"
    lines.append(f"  {rest}: the separate norm or SiLU kernel, then the plain entry or cuBLAS")
    return "\n".join(lines)


def _lora_section(info: DeviceInfo) -> str:
    """Where LoRA adds the deltas inside the base GEMM on this device (the tuned table's `fused`
    entries, tesela/lora/fused_gemm.py) and what runs everywhere else."""
    from tesela.lora.fused_gemm import fused_entries

    if info.kind != "cuda":
        return "LoRA kernels: the torch path (segment by segment) on CPU"
    entries = fused_entries(info.name)
    lines = [f"LoRA kernels on {info.name} (bfloat16; token buckets):"]
    for key, kinds in sorted(entries.items()):
        k, n, slices = key.split(",")
        where = [
            f"{what} at {', '.join(map(str, kinds[kind]))}"
            for kind, what in (("one_launch", "one launch"), ("fused", "shrink + fused GEMM"))
            if kinds[kind]
        ]
        lines.append(f"  K {k}, {slices} slice(s) of up to {n} rows: {'; '.join(where)}")
    rest = (
        "everywhere else" if entries else "no fused entry for this card (tune.lora --styles fused)"
    )
    lines.append(f"  {rest}: the base GEMM, then gather (decode) or sgmv shrink + expand")
    return "\n".join(lines)


def _versions_section() -> str:
    lines = [f"  python        {platform.python_version()} ({platform.platform()})"]
    for module in ("torch", "triton", "transformers", "flashinfer"):
        lines.append(f"  {module:<13} {_module_version(module)}")
    try:
        import torch

        lines.append(f"  torch CUDA    {torch.version.cuda or 'none (CPU build)'}")
    except ImportError:
        pass
    return "versions\n" + "\n".join(lines)


def _module_version(module: str) -> str:
    if not package_importable(module):
        return "not installed"
    try:
        return str(getattr(importlib.import_module(module), "__version__", "unknown version"))
    except ImportError as error:
        return f"installed but fails to import: {error}"


def _device_section(info: DeviceInfo, requested: str | None) -> str:
    if info.kind == "cpu":
        body = f"  cpu ({platform.machine()}, {os.cpu_count()} logical cores)"
        return f"device (asked: {requested or 'auto'})\n{body}"
    import torch

    index = torch.device(requested or "cuda").index or 0
    free, total = torch.cuda.mem_get_info(index)
    lines = [
        f"  cuda:{index} {info.name}",
        f"  compute capability {info.capability[0]}.{info.capability[1]} ({info.sm})",
        f"  memory {total / 2**30:.1f} GiB total, {free / 2**30:.1f} GiB free",
        f"  visible GPUs {torch.cuda.device_count()}",
    ]
    return f"device (asked: {requested or 'auto'})\n" + "\n".join(lines)


def _backends_section() -> str:
    lines = []
    for spec in BACKEND_SPECS.values():
        lines.append(f"  {spec.name:<11} {availability(spec)}\n    {spec.describe()}")
    return "attention backends (declared by the policy table)\n" + "\n".join(lines)


def _decision_section(requested: str, info: DeviceInfo, settings: dict) -> str:
    decision = resolve_attention(requested, info, log=False, **settings)
    shown = ", ".join(f"{key}={value}" for key, value in settings.items())
    lines = [
        f"  settings: attention_backend={requested}, {shown}",
        f"  decision: {decision.summary()}",
        *(f"    - {reason}" for reason in decision.reasons),
    ]
    return "attention decision on this device\n" + "\n".join(lines)


def _illustration_section(settings: dict) -> str:
    lines = []
    for capability in ILLUSTRATED_CAPABILITIES:
        device = DeviceInfo("cuda", capability)
        for backend in ILLUSTRATED_BACKENDS:
            for piecewise in (True, False):
                lines.append(_illustration_line(backend, device, settings, piecewise))
    header = "what the policy would do elsewhere (every package and adapter assumed present)"
    return f"{header}\n" + "\n".join(lines)


def _illustration_line(backend: str, device: DeviceInfo, settings: dict, piecewise: bool) -> str:
    settings = {**settings, "piecewise": piecewise}
    decision = resolve_attention(
        backend,
        device,
        importable=lambda _: True,
        implemented=lambda _spec, _variant: True,
        log=False,
        **settings,
    )
    variant_lines = [line for line in decision.reasons if line.startswith("variant")]
    why = "\n      ".join(decision.changes or variant_lines or ("as requested",))
    label = f"{device.sm} {backend} piecewise {'on' if piecewise else 'off'}"
    return f"  {label:<30} -> {decision.summary()}\n      {why}"
