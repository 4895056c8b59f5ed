"""`safepatch eval` end to end through the real vLLM engine on the tiny model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.patches.metadata import PatchMetadata

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_eval_cli_end_to_end(trained_patch, tiny_model: Path, prompt_files, tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    config, result = trained_patch
    store = tmp_path / "adapters"
    store.mkdir()
    patch_dir = store / "tiny-refusal"
    patch_dir.symlink_to(result.out_dir, target_is_directory=True)
    _zero_patch(tiny_model, store / "zero")
    report_path, png = tmp_path / "report.json", tmp_path / "chart.png"
    env = {
        **os.environ,
        "SAFEPATCH_ADAPTERS_DIR": str(store),
        "OMP_NUM_THREADS": "2",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "SAFEPATCH_MAX_NUM_SEQS": "16",
    }
    command = [
        sys.executable,
        "-m",
        "app.cli.evaluate",
        "--model",
        str(tiny_model),
        "--patch",
        "tiny-refusal",
        "--patch",
        str(store / "zero"),
        "--stack",
        "tiny-refusal+zero",
        "--prompts",  # options pair with their --prompts by position
        f"{prompt_files['harmful']}?name=harm",
        "--column",
        "request",
        "--kind",
        "harmful",
        "--prompts",
        f"{prompt_files['benign']}?name=good",
        "--column",
        "instruction",
        "--kind",
        "benign",
        "--split",
        "all",  # the patch trained on these files: score them whole anyway
        "--max-tokens",
        "8",
        "--json",
        str(report_path),
        "--plot",
        str(png),
    ]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "refusal" in done.stdout  # the printed table
    report = json.loads(report_path.read_text())
    assert png.read_bytes()[:4] == b"\x89PNG"
    entries = {
        (e["config"], e["prompts"]): e for e in report["entries"] if e.get("mode") != "gated"
    }
    gated = {(e["config"], e["prompts"]): e for e in report["entries"] if e.get("mode") == "gated"}
    # base once, each patched configuration in both modes (the default), per set
    assert len(report["entries"]) == (1 + 3 * 2) * 2 and report["max_tokens"] == 8
    base_good = entries[("base", "good")]
    assert base_good["unchanged_rate"] == 1.0 and base_good["mean_kl"] == 0.0
    patched_harm = entries[("tiny-refusal", "harm")]
    assert patched_harm["n"] == 16 and 0.0 <= patched_harm["refusal_rate"] <= 1.0
    assert patched_harm["kind"] == "harmful" and entries[("base", "good")]["kind"] == "benign"
    assert patched_harm["source"] == "trained" and "source" not in entries[("zero", "harm")]
    patched_good = entries[("tiny-refusal", "good")]
    assert patched_good["mean_kl"] > 0.0  # the trained patch changes the distributions
    # the patch is served: its outputs differ from the base model's on the harmful prompts
    base_texts = [x["response"] for x in entries[("base", "harm")]["examples"]]
    assert [x["response"] for x in patched_harm["examples"]] != base_texts
    # a zero LoRA is the base model: KL exactly 0 through the real KL path, outputs identical
    zero_good = entries[("zero", "good")]
    assert zero_good["mean_kl"] == pytest.approx(0.0, abs=1e-9)
    assert zero_good["unchanged_rate"] == 1.0
    assert entries[("zero", "harm")]["refusal_rate"] == entries[("base", "harm")]["refusal_rate"]
    # stacking with the zero patch changes nothing (exact rank concatenation)
    stacked = entries[("tiny-refusal+zero", "good")]
    assert stacked["mean_kl"] == pytest.approx(patched_good["mean_kl"], rel=1e-3, abs=1e-6)
    assert stacked["refusal_rate"] == patched_good["refusal_rate"]
    # gated, derived from the same pass: passed prompts are the base's answers
    for (config, prompts), entry in gated.items():
        assert entry["fire_rate"] is not None and 1 <= entry["probe_tokens"] <= 64
        if prompts == "good":
            assert entry["unchanged_rate"] >= 1 - entry["fire_rate"] - 1e-9
            assert entry["mean_kl"] <= entries[(config, prompts)]["mean_kl"] + 1e-9
    zero_gated = gated[("zero", "good")]
    assert zero_gated["unchanged_rate"] == 1.0 and zero_gated["mean_kl"] == pytest.approx(
        0.0, abs=1e-9
    )
    # a patch without a training record is calibrated on every set; tiny-refusal trained on both
    assert set(report["gates"]) == {"zero"} and 1 <= report["gates"]["zero"]["probe_tokens"] <= 16
    assert "gate zero: probe_tokens" in done.stdout
    meta = PatchMetadata.read(result.out_dir)
    assert meta is not None and meta.evaluation is not None
    assert {e["config"] for e in meta.evaluation["entries"]} == {
        "base",
        "tiny-refusal",
        "tiny-refusal+zero",
    }


def test_stack_results_are_stored_with_each_member(trained_patch, tmp_path: Path) -> None:
    """`safepatch eval --stack a+b` alone stores the stack's rows in a's and b's metadata, so a
    patch's stored stack result is replaced when the stack is re-evaluated."""
    from app.factory.evaluate import build_configs, stored_patches
    from app.factory.report import build_report, store_in_patches

    _, result = trained_patch
    store = tmp_path / "adapters"
    store.mkdir()
    for name in ("a", "b"):
        shutil.copytree(result.out_dir, store / name)
    configs = build_configs([], ["a+b"], store, tmp_path / "work")
    assert [c.name for c in configs] == ["base", "a+b"]
    assert dict(configs[1].patch_dirs) == {"a": store / "a", "b": store / "b"}
    entry = {"prompts": "good", "kind": "benign", "n": 1, "refusal_rate": 0.0}
    report = build_report([{"config": "base", **entry}, {"config": "a+b", **entry}])
    assert store_in_patches(report, stored_patches(configs)) == ["a", "b"]
    for name in ("a", "b"):
        meta = PatchMetadata.read(store / name)
        assert meta is not None and meta.evaluation is not None
        stored = {(e["config"], e["created_at"]) for e in meta.evaluation["entries"]}
        assert ("a+b", report["created_at"]) in stored


def _zero_patch(model_dir: Path, out: Path) -> None:
    """A rank-2 LoRA with B = 0 (PEFT's default init): its update is exactly zero."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    )
    peft_model.save_pretrained(out)
