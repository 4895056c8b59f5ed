"""Validation at the door: a valid patch passes, and each failure has its own code."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from app.constants import CONFIG_FILE, WEIGHTS_FILE
from app.model.identity import model_identity
from app.patches.metadata import weights_sha256
from app.patches.validation import (
    AdapterValidationError,
    ValidatedAdapter,
    validate_adapter,
    validate_name,
)

MAX_RANK = 16
MAX_BYTES = 10_000_000
A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def validate(adapter_dir: Path, model_dir: Path, **limits: int) -> ValidatedAdapter:
    kwargs = {"max_rank": MAX_RANK, "max_bytes": MAX_BYTES, **limits}
    return validate_adapter(adapter_dir, model_dir, **kwargs)


def snapshot(directory: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file, to show validation writes nothing."""
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def expect(code: str, adapter_dir: Path, model_dir: Path, **limits: int) -> AdapterValidationError:
    before = snapshot(adapter_dir) if adapter_dir.is_dir() else None
    with pytest.raises(AdapterValidationError) as info:
        validate(adapter_dir, model_dir, **limits)
    assert info.value.code == code, info.value.message
    assert info.value.message
    if before is not None:
        assert snapshot(adapter_dir) == before
    return info.value


def edit_config(adapter_dir: Path, **changes: object) -> None:
    path = adapter_dir / CONFIG_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def edit_weights(adapter_dir: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(adapter_dir / WEIGHTS_FILE))
    fn(tensors)
    save_file(tensors, str(adapter_dir / WEIGHTS_FILE), metadata={"format": "pt"})


def test_valid_adapter_passes(valid_adapter: Path, tiny_model: Path) -> None:
    before = snapshot(valid_adapter)
    result = validate(valid_adapter, tiny_model)
    assert result.rank == 4
    assert result.target_modules == ["q_proj", "v_proj"]
    assert len(result.modules) == 4 and result.modules[0].endswith(".weight")
    assert result.weights_sha256 == weights_sha256(valid_adapter)
    expected_size = sum((valid_adapter / f).stat().st_size for f in (CONFIG_FILE, WEIGHTS_FILE))
    assert result.size_bytes == expected_size
    assert result.base_model == model_identity(tiny_model)
    assert result.per_module_scaling is False and result.warnings == []
    assert snapshot(valid_adapter) == before


def test_patterned_adapter_passes_and_is_flagged(adapters: dict, tiny_model: Path) -> None:
    result = validate(adapters["pattern"], tiny_model)
    assert result.rank == 3 and result.per_module_scaling is True


@pytest.mark.parametrize("name", ["refusal-v1", "a", "pii.redact_2", "0" * 63])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "../etc", "a/b", "..", ".hidden", "UPPER", "a b", "x" * 64, "abc\n", "stack-0123", "é"],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(AdapterValidationError) as info:
        validate_name(name)
    assert (info.value.code, info.value.param) == ("invalid_name", "name")


def test_missing_dir(tmp_path: Path, tiny_model: Path) -> None:
    expect("missing_file", tmp_path / "nope", tiny_model)


@pytest.mark.parametrize("file_name", [CONFIG_FILE, WEIGHTS_FILE])
def test_missing_file(valid_adapter: Path, tiny_model: Path, file_name: str) -> None:
    (valid_adapter / file_name).unlink()
    assert expect("missing_file", valid_adapter, tiny_model).param == file_name


@pytest.mark.parametrize("file_name", ["adapter_model.bin", "extra.pt", "sub/weights.PKL"])
def test_pickled_weights_refused(valid_adapter: Path, tiny_model: Path, file_name: str) -> None:
    path = valid_adapter / file_name
    path.parent.mkdir(exist_ok=True)
    torch.save({"x": torch.zeros(1)}, path)
    assert expect("pickle_weights_refused", valid_adapter, tiny_model).param == file_name


def test_pickle_only_adapter_refused_as_pickle(valid_adapter: Path, tiny_model: Path) -> None:
    (valid_adapter / WEIGHTS_FILE).rename(valid_adapter / "adapter_model.bin")
    expect("pickle_weights_refused", valid_adapter, tiny_model)


def test_too_large(valid_adapter: Path, tiny_model: Path) -> None:
    expect("too_large", valid_adapter, tiny_model, max_bytes=1000)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"peft_type": "LORA", "r": 0}'])
def test_invalid_config(valid_adapter: Path, tiny_model: Path, text: str) -> None:
    (valid_adapter / CONFIG_FILE).write_text(text)
    expect("invalid_config", valid_adapter, tiny_model)


def test_not_lora(valid_adapter: Path, tiny_model: Path) -> None:
    edit_config(valid_adapter, peft_type="IA3")
    assert expect("not_lora", valid_adapter, tiny_model).param == "peft_type"


@pytest.mark.parametrize(
    "change", [{"use_dora": True}, {"modules_to_save": ["lm_head"]}, {"bias": "all"}]
)
def test_unsupported_feature(valid_adapter: Path, tiny_model: Path, change: dict) -> None:
    edit_config(valid_adapter, **change)
    expect("unsupported_feature", valid_adapter, tiny_model)


def test_corrupt_safetensors(valid_adapter: Path, tiny_model: Path) -> None:
    (valid_adapter / WEIGHTS_FILE).write_bytes(b"\xff" * 64)
    expect("invalid_weights", valid_adapter, tiny_model)


@pytest.mark.parametrize(
    "key",
    [
        "base_model.model.lm_head.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
        "model.layers.0.self_attn.k_proj.lora_A.weight",  # no PEFT prefix
        "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight",  # A without B
    ],
)
def test_unexpected_tensor_keys(valid_adapter: Path, tiny_model: Path, key: str) -> None:
    edit_weights(valid_adapter, lambda t: t.__setitem__(key, torch.zeros(4, 64)))
    assert expect("unexpected_tensor_keys", valid_adapter, tiny_model).param == key


def test_no_lora_weights(valid_adapter: Path, tiny_model: Path) -> None:
    save_file({}, str(valid_adapter / WEIGHTS_FILE))
    expect("no_lora_weights", valid_adapter, tiny_model)


def test_invalid_dtype(valid_adapter: Path, tiny_model: Path) -> None:
    edit_weights(valid_adapter, lambda t: t.__setitem__(A0, t[A0].to(torch.int32)))
    assert expect("invalid_dtype", valid_adapter, tiny_model).param == A0


def test_shape_mismatch_between_factors(valid_adapter: Path, tiny_model: Path) -> None:
    edit_weights(valid_adapter, lambda t: t.__setitem__(B0, t[B0][:, :3].contiguous()))
    expect("shape_mismatch", valid_adapter, tiny_model)


def test_rank_differs_from_config(valid_adapter: Path, tiny_model: Path) -> None:
    edit_config(valid_adapter, r=8)
    expect("shape_mismatch", valid_adapter, tiny_model)


def test_rank_too_large(valid_adapter: Path, tiny_model: Path) -> None:
    assert expect("rank_too_large", valid_adapter, tiny_model, max_rank=2).param == "r"


def test_module_missing_from_base(valid_adapter: Path, tiny_model: Path) -> None:
    def move_to_layer_5(t: dict[str, torch.Tensor]) -> None:
        for key in (A0, B0):
            t[key.replace("layers.0", "layers.5")] = t.pop(key)

    edit_weights(valid_adapter, move_to_layer_5)
    err = expect("base_model_mismatch", valid_adapter, tiny_model)
    assert err.param == "model.layers.5.self_attn.q_proj.weight"


def test_shapes_do_not_match_base(valid_adapter: Path, tiny_model: Path) -> None:
    """A LoRA for a wider model: A is (4 × 96) and B (96 × 4), the base q_proj is (64 × 64)."""

    def widen(t: dict[str, torch.Tensor]) -> None:
        t[A0] = torch.zeros(4, 96)  # (r, d_in)
        t[B0] = torch.zeros(96, 4)  # (d_out, r)

    edit_weights(valid_adapter, widen)
    err = expect("base_model_mismatch", valid_adapter, tiny_model)
    assert err.param == "model.layers.0.self_attn.q_proj.weight"


def test_architecture_difference_is_a_warning(valid_adapter: Path, tiny_model: Path) -> None:
    edit_config(valid_adapter, auto_mapping={"base_model_class": "MistralForCausalLM"})
    assert validate(valid_adapter, tiny_model).warnings


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights(valid_adapter: Path, tiny_model: Path, bad: float) -> None:
    def poison(t: dict[str, torch.Tensor]) -> None:
        t[B0][3, 1] = bad

    edit_weights(valid_adapter, poison)
    assert expect("non_finite_weights", valid_adapter, tiny_model).param == B0


@pytest.mark.parametrize(
    "change",
    [
        {"rank_pattern": {"(.*a)+$": 2}},  # catastrophic backtracking must not reach re.match
        {"rank_pattern": {"q_proj(": 2}},
        {"alpha_pattern": {"q_proj": -1}},
        {"rank_pattern": {"q_proj": 1.5}},
    ],
)
def test_invalid_patterns(valid_adapter: Path, tiny_model: Path, change: dict) -> None:
    edit_config(valid_adapter, **change)
    expect("invalid_config", valid_adapter, tiny_model)
