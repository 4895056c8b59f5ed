"""Prometheus metrics, one registry per app instance (tests build many apps in a process).

Cardinality is bounded: tenant and patch-set labels take at most `max_label_values`
distinct values each; the rest are counted under "other".
"""

from __future__ import annotations

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class BoundedLabel:
    """Maps label values to themselves until `limit` distinct ones were seen, then 'other'."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self.seen or len(self.seen) < self.limit:
            self.seen.add(value)
            return value
        return "other"


class Metrics:
    def __init__(self, max_label_values: int = 100) -> None:
        self.registry = CollectorRegistry()
        self.tenant_label = BoundedLabel(max_label_values)
        self.patches_label = BoundedLabel(max_label_values)
        labels = ["route", "status", "tenant", "patches"]
        self.requests = Counter(
            "safepatch_requests_total", "HTTP requests", labels, registry=self.registry
        )
        self.latency = Histogram(
            "safepatch_request_latency_seconds",
            "HTTP request latency",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "safepatch_time_to_first_token_seconds",
            "Time to first token",
            ["tenant", "patches"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "safepatch_tokens_total",
            "Tokens processed",
            ["kind", "tenant", "patches"],
            registry=self.registry,
        )
        self.gate_decisions = Counter(
            "safepatch_gate_decisions_total",
            "Gated patches' probe decisions (fired: the patched answer was served)",
            ["patch", "decision"],
            registry=self.registry,
        )
        self.adapter_events = Counter(
            "safepatch_adapter_events_total",
            "Adapter registrations, engine loads and evictions",
            ["event"],
            registry=self.registry,
        )
        self.engine_requests = Gauge(
            "safepatch_engine_requests",
            "Requests the engine is working on (0 when idle: no aborted work left behind)",
            registry=self.registry,
        )
        self.leases_held = Gauge(
            "safepatch_lora_leases",
            "Requests in flight holding a LoRA (0 when idle: nothing leaked)",
            registry=self.registry,
        )
        self.engine_ready = Gauge(
            "safepatch_engine_ready", "1 when the engine serves", registry=self.registry
        )

    def labels(self, tenant: str, patches: list[str]) -> tuple[str, str]:
        return self.tenant_label(tenant), self.patches_label(",".join(patches) or "none")

    def observe_request(
        self, route: str, status: int, tenant: str, patches: list[str], seconds: float
    ) -> None:
        tenant_l, patches_l = self.labels(tenant, patches)
        values = (route, str(status), tenant_l, patches_l)
        self.requests.labels(*values).inc()
        self.latency.labels(*values).observe(seconds)

    def observe_generation(
        self,
        tenant: str,
        patches: list[str],
        prompt_tokens: int,
        completion_tokens: int,
        ttft: float | None,
    ) -> None:
        tenant_l, patches_l = self.labels(tenant, patches)
        self.tokens.labels("prompt", tenant_l, patches_l).inc(prompt_tokens)
        self.tokens.labels("generated", tenant_l, patches_l).inc(completion_tokens)
        if ttft is not None:
            self.ttft.labels(tenant_l, patches_l).observe(ttft)

    def render(self) -> bytes:
        """SafePatch's metrics, then the engine's (`vllm:*`, in prometheus_client's default
        registry, as `vllm serve`'s /metrics shows them)."""
        return generate_latest(self.registry) + generate_latest(REGISTRY)


def series_total(exposition: str, name: str) -> float | None:
    """The sum of every sample of the series `name` in a Prometheus text exposition (all its
    label sets), or None where it is not exposed: for benchmarks and tests reading /metrics."""
    values = [
        float(line.split()[-1])
        for line in exposition.splitlines()
        if line and not line.startswith("#") and line.split("{")[0].split()[0] == name
    ]
    return sum(values) if values else None
