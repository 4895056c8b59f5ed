"""Evaluation prompt sets: option pairing, the default split, and which sets a patch never saw.

`safepatch eval --prompts A --kind harmful --prompts B --kind benign` pairs options by
position: a `--column`/`--kind` given once is the default for every `--prompts`; given once per
`--prompts`, the i-th goes with the i-th; any other count is an error (a later value never
silently overrides an earlier one). A spec's own `column=`/`kind=` wins over both.

Default split (`split=None`, `auto`): a file some patch was *trained* on (named in a patch's
`training.harmful_sources`/`preserve_sources`, by file name) is scored on its `dev` split, the
part no patch trained on; any other file (a user's own, a held-out public set) is scored whole.
The split used is stated per set in the report.

Leave-source-out: a patch is scored on a set it never saw when the set's file is in none of its
training sources (`source_status` = `held-out`), on a set whose file it trained on only through
the dev split (`dev`), or — when asked for explicitly — on its own training split (`trained`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from app.factory.data import Kind, Split, load_labelled, load_prompts, parse_source, with_split

SourceStatus = Literal["held-out", "dev", "trained"]
T = TypeVar("T")


@dataclass
class PromptSet:
    name: str
    kind: Kind
    prompts: list[str]
    categories: list[str] = field(default_factory=list)  # per prompt; "" where unlabelled
    split: Split = "all"
    available: int | None = None  # prompts in the file after filters, all splits, no limit
    file: str = ""  # the file's name, which training metadata names too


def pair_options(values: Sequence[T] | None, count: int, option: str) -> list[T | None]:
    """One value per `--prompts`: none -> None each, one -> that one for all, `count` -> by
    position; any other number is ambiguous and refused."""
    if not values:
        return [None] * count
    if len(values) == 1:
        return [values[0]] * count
    if len(values) == count:
        return list(values)
    raise ValueError(
        f"{len(values)} {option} values for {count} --prompts: give one (for all) or one per "
        f"--prompts in the same order, or put it in the spec ({option.strip('-')}=...)"
    )


def trained_files(metadata_trainings: Iterable[Mapping[str, Any] | None]) -> set[str]:
    """File names of every harmful and preserve source in the given `training` records."""
    names: set[str] = set()
    for training in metadata_trainings:
        for key in ("harmful_sources", "preserve_sources"):
            for spec in (training or {}).get(key, []):
                names.add(Path(spec.partition("?")[0]).name)
    return names


def patch_trainings(adapter_dirs: Iterable[Path]) -> dict[str, Mapping[str, Any] | None]:
    """Directory name -> `training` record of each patch directory that has metadata."""
    from app.patches.metadata import PatchMetadata

    out: dict[str, Mapping[str, Any] | None] = {}
    for adapter_dir in adapter_dirs:
        metadata = PatchMetadata.read(adapter_dir)
        out[adapter_dir.name] = metadata.training if metadata else None
    return out


def store_trainings(adapters_dir: Path) -> list[Mapping[str, Any] | None]:
    """`training` records of the shipped patches in `adapters_dir`."""
    if not adapters_dir.is_dir():
        return []
    dirs = [d for d in sorted(adapters_dir.iterdir()) if (d / "adapter_config.json").is_file()]
    return list(patch_trainings(dirs).values())


def build_sets(
    specs: Sequence[str],
    *,
    columns: Sequence[str] | None,
    kinds: Sequence[str] | None,
    split: Split | None,
    limit: int | None,
    training_files: set[str],
) -> list[PromptSet]:
    """The evaluation's prompt sets, options paired by position (module docstring)."""
    sets = []
    for spec, column, kind in zip(
        specs,
        pair_options(columns, len(specs), "--column"),
        pair_options(kinds, len(specs), "--kind"),
        strict=True,
    ):
        if kind not in (None, "harmful", "benign"):
            raise ValueError(f"--kind must be harmful or benign, got {kind!r}")
        explicit = parse_source(spec, column=column, kind=kind, limit=limit)  # type: ignore[arg-type]
        file = explicit.path.name
        has_split = "split=" in spec.partition("?")[2]
        chosen = explicit.split if has_split else split or _auto_split(file, training_files)
        source = with_split(explicit, chosen)
        if source.kind is None:
            raise ValueError(f"{spec}: say --kind harmful|benign (or kind= in the spec)")
        labelled = load_labelled(source)
        if not labelled:
            raise ValueError(f"{spec}: no prompts after filtering ({chosen} split)")
        available = len(load_prompts(with_split(_unlimited(source), "all")))
        sets.append(
            PromptSet(
                name=source.label,
                kind=source.kind,
                prompts=[p for p, _ in labelled],
                categories=[c for _, c in labelled],
                split=chosen,
                available=available,
                file=file,
            )
        )
    if len({s.name for s in sets}) != len(sets):
        raise ValueError("prompt sets need distinct names (use name= in the spec)")
    return sets


def _auto_split(file: str, training_files: set[str]) -> Split:
    return "dev" if file in training_files else "all"


def _unlimited(source: Any) -> Any:
    from dataclasses import replace

    return replace(source, limit=None)


def source_status(
    prompt_set: PromptSet, trainings: Sequence[Mapping[str, Any] | None]
) -> SourceStatus | None:
    """How a patch (a stack: all its members) relates to a set: never saw its file
    (`held-out`), trained only on the file's other split (`dev`), or trained on some of these
    very prompts (`trained`). None without any training record (the base model)."""
    known = [t for t in trainings if t is not None]
    if not known:
        return None
    splits = {
        parse_source(spec).split
        for training in known
        for key in ("harmful_sources", "preserve_sources")
        for spec in training.get(key, [])
        if Path(spec.partition("?")[0]).name == prompt_set.file
    }
    if not splits:
        return "held-out"
    if prompt_set.split == "dev" and splits == {"train"}:
        return "dev"
    return "trained"
