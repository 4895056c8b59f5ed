"""`safepatch score` (table, --json, --k errors, default model) and the per-adapter PNG."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from app.cli.score import score
from app.orthogonality.plot import plot_adapter_score
from app.orthogonality.scoring import score_adapter
from tests.orthogonality.conftest import random_factors, write_lora


@pytest.fixture
def cli(tmp_path, monkeypatch) -> typer.Typer:
    monkeypatch.setenv("SAFEPATCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SAFEPATCH_MODEL", raising=False)
    app = typer.Typer()
    app.command()(score)
    return app


@pytest.fixture
def adapter(base_weights, tmp_path):
    return write_lora(
        tmp_path / "patch", random_factors(base_weights, 4, seed=5), r=4, lora_alpha=8
    )


def test_score_json_and_table(cli, adapter, tiny_model, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, [str(adapter), "--model", str(tiny_model), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"orthogonality", "phi", "baseline", "worst_module", "modules"} <= set(data)
    assert len(data["modules"]) == 14 and data["adapter"] == "patch"
    assert 0 < data["phi"] < 1 and data["orthogonality"] == pytest.approx(1 - data["phi"])
    assert data["phi"] == pytest.approx(data["right"]["phi"])  # the paper's right side
    assert data["left_phi"] == pytest.approx(data["left"]["phi"])
    assert data["left_orthogonality"] == pytest.approx(1 - data["left_phi"])
    assert data["worst_module"]["module"] in {row["module"] for row in data["modules"]}
    assert (tmp_path / "cache" / "subspaces").is_dir()  # Settings().cache_dir was used

    table = runner.invoke(cli, [str(adapter), "--model", str(tiny_model), "--k", "8"])
    assert table.exit_code == 0, table.output
    assert "orthogonality" in table.stdout and "model.layers.1.mlp.down_proj" in table.stdout
    assert "left orthogonality" in table.stdout
    assert len(table.stdout.splitlines()) >= 14 + 6


def test_score_errors_exit_2(cli, adapter, tiny_model, tmp_path):
    runner = CliRunner()
    bad_k = runner.invoke(cli, [str(adapter), "--model", str(tiny_model), "--k", "1000"])
    assert bad_k.exit_code == 2 and "k must be" in bad_k.output
    missing = runner.invoke(cli, [str(tmp_path / "nope"), "--model", str(tiny_model)])
    assert missing.exit_code == 2 and "adapter_config.json" in missing.output


def test_default_model_is_the_embedded_one(cli, adapter, tiny_model, monkeypatch, tmp_path):
    calls = []

    def fake_default(cache_dir):
        calls.append(cache_dir)
        return tiny_model

    monkeypatch.setattr("app.model.default_model.ensure_default_model", fake_default)
    result = CliRunner().invoke(cli, [str(adapter), "--json"])
    assert result.exit_code == 0, result.output
    assert calls == [tmp_path / "cache"]
    assert json.loads(result.stdout)["model"]["name"] == tiny_model.name


def test_plot_writes_png(adapter, tiny_model, tmp_path):
    result = score_adapter(adapter, tiny_model, cache_dir=tmp_path / "cache")
    out = plot_adapter_score(result, tmp_path / "plots" / "patch.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1000, 750)
