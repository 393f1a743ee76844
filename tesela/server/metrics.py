"""Server metrics in the Prometheus text format, with no client library.

Counters, gauges and histograms are small and lock-protected: the event loop records request
outcomes and token timings, while engine-side numbers (queue depth, KV blocks, preemptions,
graph paths and fallback reasons) are read from the engine's latest stats snapshot when
`/metrics` is scraped.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Sequence

PREFIX = "tesela_"

# Seconds; the low end matters for per-token latency on GPUs, the high end for queued TTFT.
# fmt: off
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
    0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
)
# fmt: on


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        self.name = PREFIX + name
        self.help_text = help_text
        self.label_names = tuple(label_names)
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} {self.kind}"]


class Counter(Metric):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, label_names)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.label_names:
            items = [((), 0.0)]
        return self.header() + [
            f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items
        ]


def render_values(
    name: str,
    kind: str,
    help_text: str,
    values: dict[tuple[str, ...], float],
    label_names: Sequence[str] = (),
) -> list[str]:
    """One metric whose values are read from a snapshot (engine stats) at scrape time."""
    lines = [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} {kind}"]
    for key, value in sorted(values.items()):
        lines.append(f"{PREFIX}{name}{_labels(label_names, key)} {_number(value)}")
    return lines


class Histogram(Metric):
    """Observations in fixed buckets, rendered cumulatively as Prometheus expects."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float] = LATENCY_BUCKETS):
        super().__init__(name, help_text)
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float, times: int = 1) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, value)] += times
            self._sum += value * times
            self._count += times

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    def render(self) -> list[str]:
        with self._lock:
            counts, total, count = list(self._counts), self._sum, self._count
        lines = self.header()
        cumulative = 0
        for bound, n in zip((*self.buckets, math.inf), counts, strict=True):
            cumulative += n
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {cumulative}')
        lines.append(f"{self.name}_sum {_number(total)}")
        lines.append(f"{self.name}_count {count}")
        return lines


class ServerMetrics:
    """Every metric the server exports; `render(stats)` adds the engine's snapshot. Every
    sample carries a `model_name` label (as vLLM's do), so dashboards can tell servers apart."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.http_requests = Counter(
            "http_requests_total", "HTTP requests by route and status code.", ("route", "status")
        )
        self.requests_finished = Counter(
            "request_success_total",
            "Generation requests finished, by finish reason.",
            ("finish_reason",),
        )
        self.requests_rejected = Counter(
            "requests_rejected_total",
            "Requests refused before generation, by reason.",
            ("reason",),
        )
        self.prompt_tokens = Counter("prompt_tokens_total", "Prompt tokens of accepted requests.")
        self.lora_requests = Counter(
            "lora_requests_total",
            "Accepted generation requests by LoRA adapter (empty: the base model).",
            ("lora_name",),
        )
        self.generation_tokens = Counter("generation_tokens_total", "Tokens generated.")
        self.engine_errors = Counter("engine_errors_total", "Engine steps that raised.")
        self.time_to_first_token = Histogram(
            "time_to_first_token_seconds", "From request arrival to its first token."
        )
        self.time_per_output_token = Histogram(
            "time_per_output_token_seconds", "Time between consecutive tokens of a request."
        )
        self.e2e_latency = Histogram(
            "e2e_request_latency_seconds", "From request arrival to its last token."
        )
        self._own = (
            self.http_requests,
            self.requests_finished,
            self.requests_rejected,
            self.prompt_tokens,
            self.lora_requests,
            self.generation_tokens,
            self.engine_errors,
            self.time_to_first_token,
            self.time_per_output_token,
            self.e2e_latency,
        )

    def render(self, stats: dict) -> str:
        lines: list[str] = []
        for metric in self._own:
            lines += metric.render()
        lines += _engine_lines(stats)
        label = f'model_name="{_escape(self.model_name)}"'
        return "\n".join(_with_label(line, label) for line in lines) + "\n"


def _with_label(line: str, label: str) -> str:
    """Add `label` first to a sample line's label set (comment lines pass through)."""
    if line.startswith("#"):
        return line
    name_end = min(i for i in (line.find("{"), line.find(" ")) if i >= 0)
    if line[name_end] == "{":
        return f"{line[: name_end + 1]}{label},{line[name_end + 1 :]}"
    return f"{line[:name_end]}{{{label}}}{line[name_end:]}"


def _engine_lines(stats: dict) -> list[str]:
    gauges = (
        ("num_requests_running", "num_running", "Requests the scheduler is running."),
        ("num_requests_waiting", "num_waiting", "Requests waiting in the scheduler queue."),
        ("num_requests_pending", "num_pending", "Requests admitted by the server, not finished."),
        ("kv_blocks_used", "kv_blocks_used", "KV cache blocks held by requests."),
        ("kv_blocks_total", "kv_blocks_total", "KV cache blocks in the pool."),
        ("kv_blocks_cached", "kv_blocks_cached", "KV blocks in the prefix cache (any use)."),
        (
            "prefix_cache_hit_rate",
            "prefix_cache_hit_rate",
            "Fraction of prompt tokens served from the prefix cache.",
        ),
    )
    lines: list[str] = []
    for name, key, help_text in gauges:
        lines += render_values(name, "gauge", help_text, {(): stats.get(key, 0)})
    total = stats.get("kv_blocks_total") or 0
    usage = stats.get("kv_blocks_used", 0) / total if total else 0.0
    lines += render_values(
        "kv_cache_usage_ratio", "gauge", "Fraction of KV blocks in use.", {(): usage}
    )
    lines += render_values(
        "num_preemptions_total",
        "counter",
        "Requests preempted by the scheduler (KV pool exhausted).",
        {(): stats.get("num_preemptions", 0)},
    )
    for name, key, help_text in (
        ("prefix_cache_queries_total", "prefix_cache_queried_tokens", "Prompt tokens looked up."),
        ("prefix_cache_hits_total", "prefix_cache_hit_tokens", "Prompt tokens found cached."),
    ):
        lines += render_values(name, "counter", help_text, {(): stats.get(key, 0)})
    dispatch = stats.get("dispatch", {})
    paths = {(p,): n for p, n in dispatch.get("paths", {}).items()}
    lines += render_values(
        "graph_path_total", "counter", "Forward batches by dispatch path.", paths, ("path",)
    )
    fallbacks = {(r,): n for r, n in dispatch.get("fallbacks", {}).items()}
    lines += render_values(
        "graph_fallback_total",
        "counter",
        "Batches that fell back to eager, by reason.",
        fallbacks,
        ("reason",),
    )
    return lines
