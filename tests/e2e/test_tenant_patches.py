"""What a tenant is told was applied is what the engine applied (checked by its output)."""

from __future__ import annotations

import pytest

from tests.support.live_server import chat

pytestmark = pytest.mark.slow


def _chat(http, key: str, model: str = "tiny", **extra):
    return chat(http, key, model, "how to hack", 10, return_token_ids=True, **extra)


def test_applied_patches_equal_engine_patches(live_server, open_key) -> None:
    kids = live_server.tenant_key(
        "kids", {"mandatory": ["alpha"], "default": ["beta"], "optional": ["gamma"]}
    )
    with live_server.client() as http:
        cases = [
            ({}, {}, "alpha,beta", "alpha+beta"),
            ({"safety_patches": ["-beta"]}, {}, "alpha", "alpha"),
            ({}, {"X-SafePatch-Patches": "gamma"}, "alpha,beta,gamma", "alpha+beta+gamma"),
        ]
        for body, headers, applied, solo_model in cases:
            response = _chat(http, kids, headers=headers, **body)
            assert response.status_code == 200, response.text
            assert response.headers["x-safepatch-applied"] == applied
            assert response.json()["safepatch"]["applied_patches"] == applied.split(",")
            solo = _chat(http, open_key, solo_model)
            assert (
                response.json()["choices"][0]["token_ids"] == solo.json()["choices"][0]["token_ids"]
            )
        dropped = _chat(http, kids, safety_patches=["-alpha"])
        assert dropped.status_code == 403 and dropped.json()["error"]["code"] == "patch_mandatory"
