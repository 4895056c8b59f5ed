"""API fuzzing from the OpenAPI schema (issue 17): Schemathesis generates requests for every
operation the app documents (valid and invalid ones), sent to the real app over a fake engine.

Every answer: not a 5xx; an error is OpenAI-shaped; none takes longer than REQUEST_TIMEOUT_S.
Afterwards the store, the database and the engine agree, and no lease is left behind.

`fuzz_operations` takes any running app's TestClient and spec, so the same run can be pointed
at a rebuilt serving layer. Cases the fuzzer found are kept as explicit tests at the end.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode

from tests.api.conftest import NO_SCORING
from tests.conftest import ADMIN, make_settings
from tests.reliability.engine import RecordingEngine
from tests.support.apps import running_app

pytestmark = NO_SCORING

REQUEST_TIMEOUT_S = 10.0
EXAMPLES_PER_OPERATION = 20  # per generation mode; the whole run stays well under a minute
SKIPPED = {("GET", "/metrics")}  # Prometheus text, not JSON: covered by test_observability


def call(
    client: TestClient | httpx.Client, kwargs: dict[str, Any], timeout: float = REQUEST_TIMEOUT_S
) -> httpx.Response:
    """Send one request, failing if it takes longer than `timeout` seconds (a hang)."""
    result: dict[str, Any] = {}

    def send() -> None:
        try:
            result["response"] = client.request(**kwargs)
        except BaseException as exc:  # re-raised below, in the test's thread
            result["error"] = exc

    worker = threading.Thread(target=send, daemon=True)
    worker.start()
    worker.join(timeout)
    assert not worker.is_alive(), f"no answer within {timeout} s: {kwargs}"
    if "error" in result:
        raise result["error"]
    return result["response"]


# vLLM's Anthropic Messages routes answer their own errors in Anthropic's shape (what
# Anthropic clients parse): {"type": "error", "error": {"type", "message"}}
ANTHROPIC_ROUTES = ("/v1/messages",)


def check_answer(response: httpx.Response, request: dict[str, Any]) -> None:
    where = f"{request['method']} {request['url']} -> {response.status_code}: {response.text[:300]}"
    assert response.status_code < 500, where
    if response.status_code >= 400:
        body = response.json()
        error = body.get("error") if isinstance(body, dict) else None
        assert isinstance(error, dict), where
        assert isinstance(error.get("message"), str) and error["message"], where
        if body.get("type") == "error" and httpx.URL(request["url"]).path.startswith(
            ANTHROPIC_ROUTES
        ):
            assert set(error) == {"type", "message"}, where
            return
        assert set(body) == {"error"}, where
        assert set(error) == {"message", "type", "param", "code"}, where


def transport_kwargs(
    case: schemathesis.Case, headers: dict[str, str], base_url: str = "http://testserver"
) -> dict[str, Any]:
    """A Schemathesis case as httpx request arguments."""
    kwargs = case.as_transport_kwargs(base_url=base_url, headers=headers)
    if "data" in kwargs and not isinstance(kwargs["data"], dict):
        kwargs["content"] = kwargs.pop("data")  # raw bytes: httpx calls them content
    if "files" in kwargs:  # negative cases put numbers or None where file contents go
        kwargs["files"] = [(field, _as_file(value)) for field, value in _items(kwargs["files"])]
    kwargs.pop("allow_redirects", None)
    kwargs.pop("timeout", None)
    return kwargs


def steer(case: schemathesis.Case, rng: random.Random, known: dict[str, list[str]]) -> Any:
    """Half of the cases get existing names for their path parameters and body fields named in
    `known` (random names only ever reach the 404 branch), the rest stay as generated."""
    if rng.random() < 0.5:
        return case
    for key in list(case.path_parameters or {}):
        if key in known:
            case.path_parameters[key] = rng.choice(known[key])
    if isinstance(case.body, dict):
        for key in list(case.body):
            if key in known:
                case.body[key] = rng.choice(known[key])
        if "safety_patches" in case.body and "safety_patches" in known:
            case.body["safety_patches"] = rng.sample(known["safety_patches"], rng.randint(0, 2))
    return case


def _items(files: Any) -> list[tuple[str, Any]]:
    if files is None:  # a negative case with no file parts at all
        return []
    return list(files.items()) if isinstance(files, dict) else list(files)


def _as_file(value: Any) -> Any:
    """httpx wants bytes, str or (filename, content[, type]) for each file part."""
    if isinstance(value, tuple):
        return (value[0], _as_file(value[1]), *value[2:])
    if isinstance(value, bytes | str):
        return value
    return str(value).encode()


def fuzz_operations(
    client: TestClient | httpx.Client,
    spec: dict[str, Any],
    headers_for: Callable[[str], dict[str, str]],
    known: dict[str, list[str]],
    include: Callable[[str], bool] = lambda path: True,
    examples: int = EXAMPLES_PER_OPERATION,
    base_url: str = "http://testserver",
    timeout: float = REQUEST_TIMEOUT_S,
) -> int:
    """Fuzz every operation of `spec` against `client` (an in-process app's TestClient, or an
    httpx client of a live server at `base_url`); returns how many requests were sent.
    `known` maps path-parameter and body field names to values that exist (see `steer`)."""
    schema = schemathesis.openapi.from_dict(spec)
    sent = [0]
    for result in schema.get_all_operations():
        operation = result.ok()
        if (operation.method.upper(), operation.path) in SKIPPED or not include(operation.path):
            continue
        modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        strategy = st.tuples(
            st.one_of(*(operation.as_strategy(mode) for mode in modes)), st.randoms()
        ).map(lambda pair: steer(*pair, known))

        @settings(
            max_examples=examples,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,  # the same cases every run: CI failures reproduce locally
        )
        @given(case=strategy)
        def one_case(case: schemathesis.Case) -> None:
            kwargs = transport_kwargs(case, headers_for(case.path), base_url)
            check_answer(call(client, kwargs, timeout), kwargs)
            sent[0] += 1

        one_case()
    return sent[0]


@pytest.fixture
def fuzzed_app(
    tiny_model: Path, store: Path, tmp_path: Path
) -> Iterator[tuple[TestClient, RecordingEngine, Path]]:
    engine = RecordingEngine(yields=1)
    settings_ = make_settings(tiny_model, tmp_path, dev_mode=True)
    with running_app(settings_, engine) as (client, _):
        yield client, engine, store


def admin_headers(path: str) -> dict[str, str]:
    return dict(ADMIN) if path.startswith("/admin") else {}


def is_safepatch_own(path: str) -> bool:
    """Routes SafePatch implements itself; the rest of the schema is the engine's OpenAI app
    (vLLM's schemas, merged in by the front), answered through the front."""
    return path.startswith("/admin") or path in {"/health", "/ready", "/metrics", "/v1/models"}


def fuzz_app(fuzzed_app, include: Callable[[str], bool]) -> None:
    client, engine, store = fuzzed_app
    spec = client.get("/openapi.json").json()
    assert "/admin/adapters" in spec["paths"] and "/v1/chat/completions" in spec["paths"]
    for tenant in ("t1", "t2"):
        created = client.post("/admin/tenants", headers=ADMIN, json={"id": tenant})
        assert created.status_code == 201, created.text
    known = {
        "name": ["alpha", "beta"],
        "tenant_id": ["t1", "t2"],
        "model": ["tiny", "alpha", "beta"],
        "safety_patches": ["alpha", "beta"],
    }
    sent = fuzz_operations(client, spec, admin_headers, known, include)
    assert sent > 50
    assert_consistent(client, engine, store)


def test_fuzz_admin_and_health_operations(fuzzed_app) -> None:
    fuzz_app(fuzzed_app, is_safepatch_own)


def test_fuzz_openai_operations(fuzzed_app) -> None:
    fuzz_app(fuzzed_app, lambda path: not is_safepatch_own(path))


def assert_consistent(client: TestClient, engine: RecordingEngine, store: Path) -> None:
    """Store, database and engine agree, and nothing is left held or half-written."""
    registry = client.app.state.safepatch.registry
    targets = registry.targets
    assert targets.leases() == {}, "a lease outlived its request"
    for record in registry.list():
        assert (record.path / "adapter_config.json").is_file(), record.name
        assert (record.path / "adapter_model.safetensors").is_file(), record.name
    leftovers = [p.name for p in store.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"staging or trash left in the store: {leftovers}"
    live = {t.int_id for t in targets.live_targets()}
    assert set(engine.loaded) <= live | {t.int_id for t in targets.pending_unloads()}


# --- cases the fuzzer found, kept as regression tests -------------------------------------
@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data; boundary=x", b"garbage without any boundary"),
        ("multipart/form-data", b"--x\r\nno boundary parameter\r\n--x--\r\n"),
        ("multipart/form-data; boundary=x", b'--x\r\nContent-Disposition: form-data; name="name"'),
        (
            "multipart/form-data; boundary=x",
            b'--x\r\nContent-Disposition: form-data; name="name"\r\n\r\nn1\r\n'
            b'--x\r\nContent-Disposition: form-data; name="weights"; filename="w.safetensors"'
            b"\r\n\r\n0\r\n--x--\r\n",
        ),
    ],
)
def test_a_malformed_multipart_upload_is_400(fuzzed_app, content_type: str, body: bytes) -> None:
    """The fuzzer's multipart cases with numbers as file contents and cut-off parts."""
    client, engine, store = fuzzed_app
    response = client.post(
        "/admin/adapters", content=body, headers={**ADMIN, "Content-Type": content_type}
    )
    assert 400 <= response.status_code < 500, response.text
    check_answer(response, {"method": "POST", "url": "/admin/adapters"})
    assert_consistent(client, engine, store)


def test_an_audit_offset_past_the_databases_integers_is_422(fuzzed_app) -> None:
    """Found by the fuzzer: an offset of 2**63 overflowed SQLite's INTEGER (a 500)."""
    client, _, _ = fuzzed_app
    response = client.get("/admin/audit", params={"offset": 2**63}, headers=ADMIN)
    assert response.status_code == 422, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_a_responses_assistant_item_without_text_is_400(fuzzed_app) -> None:
    """Found by the fuzzer on the real engine (vLLM crashed: a 500 'list index out of range');
    refused before the engine is reached, so the fake engine shows it too."""
    client, engine, store = fuzzed_app
    item = {"type": "message", "role": "assistant", "id": "m", "status": "completed"}
    body = {"model": "tiny", "input": [{**item, "content": []}], "max_output_tokens": 4}
    response = client.post("/v1/responses", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "input[0].content"
    check_answer(response, {"method": "POST", "url": "/v1/responses"})
    assert_consistent(client, engine, store)
