"""Admin orthogonality endpoints over the real scoring code on the tiny model."""

from __future__ import annotations

import time

from tests.conftest import ADMIN


def test_adapter_orthogonality_shape(fake_app) -> None:
    client, _ = fake_app
    body = client.get("/admin/adapters/alpha/orthogonality", headers=ADMIN).json()
    for key in ("orthogonality", "phi", "baseline", "worst_module", "modules", "layers"):
        assert key in body, key
    assert body["adapter"] == "alpha"
    assert 0.0 <= body["phi"] <= 1.0
    assert abs(body["orthogonality"] - (1.0 - body["phi"])) < 1e-9
    # the headline is the paper's right-side measure; the left side sits beside it
    assert body["phi"] == body["right"]["phi"] and body["left_phi"] == body["left"]["phi"]
    assert abs(body["left_orthogonality"] - (1.0 - body["left_phi"])) < 1e-9
    # alpha targets q_proj and v_proj in both layers of the tiny model
    assert len(body["modules"]) == 4
    right = client.get(
        "/admin/adapters/alpha/orthogonality?side=right&detail=false&k=2", headers=ADMIN
    ).json()
    assert right["side"] == "right" and right["k"] == 2 and "modules" not in right


def test_orthogonality_errors(fake_app) -> None:
    client, _ = fake_app
    missing = client.get("/admin/adapters/nope/orthogonality", headers=ADMIN)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "patch_not_found"
    for bad in ("0", "-3", "abc", "5000"):
        response = client.get(f"/admin/adapters/alpha/orthogonality?k={bad}", headers=ADMIN)
        assert response.status_code == 422, bad
        assert response.json()["error"]["param"] == "k"
    too_big = client.get("/admin/adapters/alpha/orthogonality?k=1000", headers=ADMIN)
    assert too_big.status_code == 422 and "k" in too_big.json()["error"]["message"]
    bad_side = client.get("/admin/adapters/alpha/orthogonality?side=up", headers=ADMIN)
    assert bad_side.status_code == 422
    assert client.get("/admin/adapters/alpha/orthogonality").status_code == 401


def test_plot_and_overview(fake_app) -> None:
    client, _ = fake_app
    png = client.get("/admin/adapters/beta/orthogonality.png", headers=ADMIN)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG")
    overview = client.get("/admin/orthogonality", headers=ADMIN).json()
    assert [row["adapter"] for row in overview["data"]] == ["alpha", "beta"]
    pairs = overview["interference"]
    assert pairs and {pairs[0]["a"], pairs[0]["b"]} == {"alpha", "beta"}


def test_scored_in_background_after_start(fake_app) -> None:
    client, _ = fake_app
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        summary = client.get("/admin/adapters/alpha", headers=ADMIN).json()["orthogonality"]
        if summary and summary["phi"] is not None:
            break
        time.sleep(0.5)
    assert summary is not None and 0.0 <= summary["phi"] <= 1.0
