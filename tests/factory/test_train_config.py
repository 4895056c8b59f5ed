"""`TrainConfig` is the one list of training options: the CLI takes each field under its name
with its default, and the metadata record is derived from the fields."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from pathlib import Path

from app.cli.train import CLI_ONLY, NOT_ON_CLI, RENAMED, build_config
from app.factory.config import TrainConfig, config_fields, training_record
from app.factory.data import parse_source
from app.patches.metadata import PatchMetadata

REPO = Path(__file__).resolve().parents[2]


def _cli_defaults() -> dict[str, object]:
    out = {}
    for name, param in inspect.signature(build_config).parameters.items():
        default = param.default
        out[name] = default.default if hasattr(default, "default") else default
    return out


def test_every_config_field_is_a_cli_option_and_back() -> None:
    cli = {RENAMED.get(name, name) for name in _cli_defaults() if name not in CLI_ONLY}
    assert cli == set(config_fields()) - NOT_ON_CLI


def test_cli_defaults_are_the_config_defaults() -> None:
    defaults = _cli_defaults()
    as_cli = {  # fields the CLI takes in another form
        "target_modules": lambda v: ",".join(v),
        "categories": lambda v: ",".join(v),
        "preserve": lambda v: v or None,  # repeatable option: none given
    }
    for name, field in config_fields().items():
        if name in NOT_ON_CLI or name in RENAMED.values():
            continue
        factory = field.default_factory
        value = factory() if callable(factory) else field.default
        if value is dataclasses.MISSING:  # required: required on the CLI too (or derived)
            assert defaults[name] in (inspect.Parameter.empty, None), name
            continue
        if value is None:
            assert defaults[name] is None, name
            continue
        assert defaults[name] == as_cli.get(name, lambda v: v)(value), name


def test_the_record_is_derived_from_the_fields(tmp_path: Path) -> None:
    source = parse_source("harmful.csv?where=label:x", split="train")
    config = TrainConfig(tmp_path, tmp_path / "out", "p", [source], rank=4, layers=[1, 2])
    record = training_record(config, steps=7, n_harmful=3)
    hidden = {f for f, v in config_fields().items() if v.metadata.get("record") is False}
    assert hidden == {
        "model_dir",
        "out_dir",
        "name",
        "description",
        "categories",
        "cache_dir",
        "threads",
    }
    expected = set(config_fields()) - hidden - {"harmful", "preserve"}
    assert set(record) == expected | {"harmful_sources", "preserve_sources", "n_harmful"}
    assert record["harmful_sources"] == [source.spec()] and record["steps"] == 7
    assert record["rank"] == 4 and record["layers"] == [1, 2] and record["preserve_sources"] == []
    # a record of an old run is just data: shipped metadata still loads, with its own keys
    for name in ("refusal-general", "cyber"):
        meta = PatchMetadata.read(REPO / "adapters" / name)
        assert meta is not None and "harmful_sources" in (meta.training or {})


def test_the_config_types_are_resolvable() -> None:
    hints = typing.get_type_hints(TrainConfig)
    assert set(hints) == set(config_fields())


def test_train_and_writer_do_not_import_each_other() -> None:
    def imports(path: Path) -> set[str]:
        tree = ast.parse(path.read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        return names

    assert "app.factory.train" not in imports(REPO / "app/factory/writer.py")
    assert "app.factory.writer" in imports(REPO / "app/factory/train.py")  # one way only
