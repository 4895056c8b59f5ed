"""Prometheus metrics with tenant and patch-set labels, request ids, JSON logs."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.config import Settings
from app.observability.logging import JsonFormatter
from app.observability.metrics import Metrics
from tests.api.conftest import NO_SCORING
from tests.conftest import ADMIN, register_path
from tests.support.api_client import BASE, add_tenant, assert_error, chat
from tests.support.apps import running_app
from tests.support.fake_engine import FakeEngine

pytestmark = NO_SCORING

CHAT_ROUTE = "/v1/chat/completions"


def samples(client: TestClient, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called `name` on /metrics, parsed by prometheus-client."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = list(text_string_to_metric_families(response.text))
    return [(s.labels, s.value) for f in families for s in f.samples if s.name == name]


def value(client: TestClient, name: str, **labels: str) -> float:
    """The sample of `name` whose labels include `labels` (0 if there is none)."""
    found = [
        v for sample_labels, v in samples(client, name) if labels.items() <= sample_labels.items()
    ]
    assert len(found) <= 1, found
    return found[0] if found else 0.0


def test_metrics_count_a_chat_request_by_route_status_tenant_and_patches(api) -> None:
    client, _ = api
    key = add_tenant(client, "obs", default=["alpha"], optional=["beta"], allow_base=True)
    labels = dict(route=CHAT_ROUTE, status="200", tenant="obs", patches="alpha")
    assert value(client, "safepatch_requests_total", **labels) == 0
    assert chat(client, key, max_tokens=3).status_code == 200
    assert value(client, "safepatch_requests_total", **labels) == 1
    assert value(client, "safepatch_request_latency_seconds_count", **labels) == 1
    assert chat(client, key, max_tokens=3).status_code == 200
    assert value(client, "safepatch_requests_total", **labels) == 2
    # a stacked set and the bare base are labelled by what was applied
    for toggles, applied in ((["beta"], "alpha,beta"), (["-alpha"], "none")):
        assert chat(client, key, safety_patches=toggles).status_code == 200
        assert value(client, "safepatch_requests_total", **{**labels, "patches": applied}) == 1
    # tokens and time to first token, by tenant and patch set
    tokens = dict(tenant="obs", patches="alpha")
    assert value(client, "safepatch_tokens_total", kind="generated", **tokens) == 6
    assert value(client, "safepatch_tokens_total", kind="prompt", **tokens) > 0
    # time to first token is seen in streamed answers (a whole answer comes at once)
    assert value(client, "safepatch_time_to_first_token_seconds_count", **tokens) == 0
    assert chat(client, key, max_tokens=3, stream=True).status_code == 200
    assert value(client, "safepatch_time_to_first_token_seconds_count", **tokens) == 1
    assert value(client, "safepatch_engine_ready") == 1


def test_metrics_count_refusals_and_unknown_callers(api) -> None:
    client, _ = api
    key = add_tenant(client, "obs", mandatory=["alpha"])
    assert_error(chat(client, key, safety_patches=["-alpha"]), 403)
    assert (
        value(client, "safepatch_requests_total", route=CHAT_ROUTE, status="403", tenant="obs") == 1
    )
    assert_error(chat(client), 401)
    assert (
        value(
            client,
            "safepatch_requests_total",
            route=CHAT_ROUTE,
            status="401",
            tenant="anonymous",
            patches="none",
        )
        == 1
    )
    client.get("/v1/no-such-route")
    assert value(client, "safepatch_requests_total", route="unmatched", status="404") == 1
    assert client.get("/admin/adapters", headers=ADMIN).status_code == 200
    assert (
        value(
            client,
            "safepatch_requests_total",
            route="/admin/adapters",
            status="200",
            tenant="admin",
        )
        == 1
    )
    # path parameters stay out of the route label
    client.get("/admin/adapters/alpha", headers=ADMIN)
    client.get("/admin/adapters/beta", headers=ADMIN)
    assert (
        value(client, "safepatch_requests_total", route="/admin/adapters/{name}", status="200") == 2
    )


def test_metrics_count_adapter_events(api, patch_library: Path, store: Path) -> None:
    client, _ = api
    shutil.copytree(patch_library / "gamma", store / "gamma")
    assert register_path(client, "gamma", "gamma").status_code == 201
    assert client.post("/admin/adapters/gamma/pin", headers=ADMIN).status_code == 200
    assert client.delete("/admin/adapters/gamma", headers=ADMIN).status_code == 204
    for event in ("registered", "pinned", "deleted"):
        assert value(client, "safepatch_adapter_events_total", event=event) == 1, event


def test_engine_ready_gauge_follows_the_engine(settings: Settings) -> None:
    engine = FakeEngine(start_delay=1.0)
    with running_app(settings, engine, ready=False) as (client, _):
        assert value(client, "safepatch_engine_ready") == 0
        while client.get("/ready").status_code != 200:
            pass
        assert value(client, "safepatch_engine_ready") == 1


def test_label_cardinality_is_bounded() -> None:
    metrics = Metrics(max_label_values=2)
    for tenant in ("a", "b", "c", "d", "a"):
        metrics.observe_request("/r", 200, tenant, [tenant], 0.01)
    text = metrics.render().decode()
    tenants = {
        s.labels["tenant"]: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "safepatch_requests_total"
    }
    assert tenants == {"a": 2, "b": 1, "other": 2}


# --- request ids ------------------------------------------------------------------------------
def test_request_id_round_trips(api) -> None:
    client, _ = api
    key = add_tenant(client, "rid", allow_base=True)
    for response in (
        chat(client, {**key, "X-Request-ID": "req-abc-123"}),
        chat(client, {**key, "X-Request-ID": "req-abc-123"}, stream=True),
        chat(client, {"X-Request-ID": "req-abc-123"}),  # a 401
        client.get("/health", headers={"X-Request-ID": "req-abc-123"}),
    ):
        assert response.headers["X-Request-ID"] == "req-abc-123", response.status_code


def test_request_id_is_generated_when_absent_or_unusable(api) -> None:
    client, _ = api
    ids = [client.get("/health").headers["X-Request-ID"] for _ in range(2)]
    ids.append(client.get("/health", headers={"X-Request-ID": "x" * 500}).headers["X-Request-ID"])
    ids.append(client.get("/health", headers={"X-Request-ID": "a\tb"}).headers["X-Request-ID"])
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids), ids
    assert len(set(ids)) == 4


# --- logs -------------------------------------------------------------------------------------
class FormattedLines(logging.Handler):
    """Formats each record when it is emitted (in the request's context, as a stream handler
    does) with the service's JSON formatter."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextmanager
def json_log_lines() -> Iterator[list[str]]:
    handler = FormattedLines()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler.lines
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def test_json_formatter_writes_one_json_object_per_record() -> None:
    from app.observability.logging import request_id_var

    record = logging.LogRecord(
        "app.test", logging.WARNING, __file__, 1, "hello %s", ("world",), None
    )
    record.tenant = "acme"
    token = request_id_var.set("rid-1")
    try:
        line = JsonFormatter().format(record)
    finally:
        request_id_var.reset(token)
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["message"] == "hello world"
    assert entry["request_id"] == "rid-1"
    assert entry["level"] == "WARNING" and entry["logger"] == "app.test"
    assert entry["tenant"] == "acme"
    assert entry["time"].endswith("+00:00")


def test_a_request_logs_json_lines_with_its_request_id(settings: Settings) -> None:
    secret_prompt = "my very private prompt"
    with running_app(settings) as (client, _):
        key = add_tenant(client, "logs", allow_base=True)
        with json_log_lines() as lines:
            response = client.post(
                "/v1/chat/completions",
                headers={**key, "X-Request-ID": "log-rid-42"},
                json={
                    "model": BASE,
                    "max_tokens": 2,
                    "messages": [{"role": "user", "content": secret_prompt}],
                },
            )
            assert response.status_code == 200
        entries = [json.loads(line) for line in lines]  # every line is valid JSON
        mine = [e for e in entries if e["request_id"] == "log-rid-42"]
        assert mine, f"no log line carries the request id: {entries}"
        access = [e for e in mine if e.get("route") == CHAT_ROUTE]
        assert access and access[0]["status"] == 200 and access[0]["tenant"] == "logs", mine
        assert not [line for line in lines if secret_prompt in line]
        assert not [line for line in lines if key["Authorization"][7:] in line]


def test_an_engine_failure_is_a_500_with_request_id_log_and_metric(settings: Settings) -> None:
    with running_app(settings, raise_server_exceptions=False) as (client, engine):
        key = add_tenant(client, "boom", allow_base=True)
        engine.fail_with = RuntimeError("engine exploded")
        with json_log_lines() as lines:
            response = chat(client, {**key, "X-Request-ID": "rid-500"})
        error = assert_error(response, 500, "internal_error")
        assert error["type"] == "server_error"
        assert "exploded" not in error["message"]  # no internals leak to the client
        assert response.headers.get("X-Request-ID") == "rid-500"
        logged = [json.loads(line) for line in lines]
        failure = [e for e in logged if e["level"] == "ERROR"]
        assert failure and failure[0]["request_id"] == "rid-500", logged
        assert "engine exploded" in failure[0]["exc_info"]
        assert (
            value(client, "safepatch_requests_total", route=CHAT_ROUTE, status="500", tenant="boom")
            == 1
        )
        assert client.get("/health").status_code == 200


def test_a_streamed_answer_is_timed_and_logged_when_its_last_token_is_sent(
    settings: Settings,
) -> None:
    """A stream's headers go out with its first token; latency and the access log's duration
    must cover the whole answer (6 tokens, 0.05 s apart in the fake engine: ≥ 0.3 s)."""
    with running_app(settings, FakeEngine(token_delay=0.05)) as (client, _):
        key = add_tenant(client, "slow", allow_base=True)
        with json_log_lines() as lines:
            response = chat(
                client, {**key, "X-Request-ID": "rid-stream"}, max_tokens=6, stream=True
            )
            assert response.status_code == 200 and response.text.rstrip().endswith("[DONE]")
        labels = dict(route=CHAT_ROUTE, status="200", tenant="slow")
        assert value(client, "safepatch_request_latency_seconds_count", **labels) == 1
        assert value(client, "safepatch_request_latency_seconds_sum", **labels) >= 0.29
        access = [json.loads(line) for line in lines]
        access = [e for e in access if e.get("route") == CHAT_ROUTE]
        assert len(access) == 1 and access[0]["request_id"] == "rid-stream", access
        assert access[0]["duration_ms"] >= 290
