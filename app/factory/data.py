"""Prompt files (CSV / JSON / JSONL) and the deterministic train/dev split.

A prompt source is a path with an optional query string, so one CLI option can say which
column to read, which split, and how to filter:

    app/factory/data/advbench_harmful_behaviors.csv?column=goal&match=cyber&limit=100
    app/factory/data/xstest_prompts.csv?where=label:safe&kind=benign&name=xstest-safe

Keys: `column` (default: the first of prompt/goal/instruction/text/question present), `split`
(`train`, `dev` or `all`), `match` / `exclude` (a category name from `CATEGORIES` or a regex,
case-insensitive), `where=COL:VALUE` (exact match; repeated for one column: any of the values,
for different columns: all), `limit`, `kind` (`harmful`/`benign`, used by evaluation) and
`name` (label in reports).

A path that does not exist as given is looked up by its file name in the vendored
`app/factory/data/`, then in the external data folder (`SAFEPATCH_DATA_DIR`, setting
`data_dir`), which holds the sets whose licence forbids vendoring (CC BY-NC). So
`harmless_train.json?limit=1000` works on any machine that has that folder.

The split is a function of the prompt text only (see `split_of`), documented in
`app/factory/data/LICENSES.md`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs

from app import files

Split = Literal["train", "dev", "all"]
Kind = Literal["harmful", "benign"]

DATA_DIR = Path(__file__).resolve().parent / "data"
SPLIT_SALT = "safepatch-split-v1"
DEV_PER_MILLE = 300  # ≈30 % of prompts are held out for development evaluation
COLUMN_CANDIDATES = ("prompt", "goal", "instruction", "text", "question")
CATEGORIES: dict[str, str] = {
    # Cyber attacks / intrusion / malware. Checked by hand against AdvBench: every match is a
    # computer-security request; "steal personal information" alone is not cyber.
    "cyber": (
        r"\bhack|malware|ransomware|\bvirus|\bworm\b|trojan|keylogger|botnet|spyware|rootkit"
        r"|backdoor|exploit(s|ing)? (a |the )?(vulnerab|software|system|security)|vulnerabilit"
        r"|cyber(?!.?bully)|ddos|denial.of.service|phishing|sql injection"
        r"|crack(ing)? (passwords?|software)"
        r"|password|firewall|unauthori[sz]ed access|bypass(ing)? security|digital rights management"
        r"|(from|into|on|infect) (a |the )?(user's |someone's |their |people's )?computers?\b"
        r"|malicious|webcam|login credentials|\bdatabase|users?'? devices"
        r"|\b(script|program|code|software|tool)\b.*\b(steal|harvest|spy|spies|hijack|illegally)"
        r"|antivirus|computer (system|network)|(network|database|server|website)"
        r"s?\b.*\b(access|breach|infiltrat|compromis|disrupt|shut ?down)"
        r"|(access|breach|infiltrat|compromis|disrupt).*\b(network|database|server|website)"
    ),
}


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def prompt_hash(text: str) -> str:
    return hashlib.sha256(f"{SPLIT_SALT}\n{normalise(text)}".encode()).hexdigest()


def split_of(text: str) -> Literal["train", "dev"]:
    """`dev` for ≈30 % of prompts, chosen by a salted hash of the normalised text."""
    return "dev" if int(prompt_hash(text)[:8], 16) % 1000 < DEV_PER_MILLE else "train"


def file_sha256(path: Path) -> str:
    """sha256 of a prompt file, found like `load_prompts` finds it."""
    return files.file_sha256(resolve_path(Path(path)))


def external_data_dir() -> Path | None:
    from app.config import Settings

    return Settings().data_dir


def resolve_path(path: Path) -> Path:
    """`path` if it exists, else its file name in `DATA_DIR`, else in the external data dir."""
    if path.exists():
        return path
    external = external_data_dir()
    for folder in (DATA_DIR, external):
        if folder is not None and (folder / path.name).is_file():
            return folder / path.name
    hint = "" if external else " (set SAFEPATCH_DATA_DIR to the folder of non-vendored sets)"
    raise FileNotFoundError(f"prompt file {path} not found{hint}")


@dataclass(frozen=True)
class PromptSource:
    path: Path
    column: str | None = None
    split: Split = "train"
    match: str | None = None
    exclude: str | None = None
    where: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    limit: int | None = None
    kind: Kind | None = None
    name: str | None = None

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        parts = [self.path.stem, self.split]
        parts += [f"{c}={v}" for c, v in self.where]
        if self.match:
            parts.append(self.match)
        if self.exclude:
            parts.append(f"not-{self.exclude}")
        return ":".join(parts)

    def spec(self) -> str:
        """Round-trippable string form (for metadata and reproduce commands)."""
        query = [f"column={self.column}"] if self.column else []
        query.append(f"split={self.split}")
        query += [f"where={c}:{v}" for c, v in self.where]
        for key in ("match", "exclude", "limit", "kind", "name"):
            if getattr(self, key) is not None:
                query.append(f"{key}={getattr(self, key)}")
        return f"{self.path}?{'&'.join(query)}"


def parse_source(
    spec: str,
    *,
    column: str | None = None,
    split: Split = "train",
    kind: Kind | None = None,
    limit: int | None = None,
) -> PromptSource:
    """Parse `PATH[?key=value&...]`; keyword arguments are defaults the query can override."""
    path_part, _, query = spec.partition("?")
    params = parse_qs(query, keep_blank_values=False)
    unknown = set(params) - {
        "column",
        "split",
        "match",
        "exclude",
        "where",
        "limit",
        "kind",
        "name",
    }
    if unknown:
        raise ValueError(f"unknown prompt-source keys {sorted(unknown)} in {spec!r}")

    def one(key: str) -> str | None:
        values = params.get(key)
        return values[-1] if values else None

    where = []
    for item in params.get("where", []):
        col, sep, value = item.partition(":")
        if not sep:
            raise ValueError(f"where= needs COLUMN:VALUE, got {item!r}")
        where.append((col, value))
    split_value = one("split") or split
    if split_value not in ("train", "dev", "all"):
        raise ValueError(f"split must be train, dev or all, got {split_value!r}")
    kind_value = one("kind") or kind
    if kind_value not in (None, "harmful", "benign"):
        raise ValueError(f"kind must be harmful or benign, got {kind_value!r}")
    limit_value = one("limit")
    return PromptSource(
        path=Path(path_part),
        column=one("column") or column,
        split=split_value,  # type: ignore[arg-type]
        match=one("match"),
        exclude=one("exclude"),
        where=tuple(where),
        limit=int(limit_value) if limit_value else limit,
        kind=kind_value,  # type: ignore[arg-type]
        name=one("name"),
    )


def read_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV, a JSON list (of objects or strings) or JSONL file, values as strings."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            return [dict(row) for row in csv.DictReader(fh)]
    if suffix == ".jsonl":
        items = [
            json.loads(line)
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
    elif suffix == ".json":
        items = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(items, dict):  # {"data": [...]} and similar single-key wrappers
            lists = [v for v in items.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise ValueError(f"{path}: expected a JSON list of prompts")
            items = lists[0]
    else:
        raise ValueError(f"{path}: unsupported prompt file type {suffix!r} (csv, json, jsonl)")
    rows = []
    for item in items:
        if isinstance(item, str):
            rows.append({"prompt": item})
        elif isinstance(item, dict):
            rows.append({k: "" if v is None else str(v) for k, v in item.items()})
        else:
            raise ValueError(f"{path}: rows must be objects or strings")
    return rows


def pick_column(rows: list[dict[str, str]], column: str | None, path: Path) -> str:
    columns = list(rows[0]) if rows else []
    if column:
        if column not in columns:
            raise ValueError(f"{path}: no column {column!r} (has {columns})")
        return column
    for candidate in COLUMN_CANDIDATES:
        if candidate in columns:
            return candidate
    raise ValueError(f"{path}: no prompt column found among {columns}; pass column=")


def category_regex(value: str) -> re.Pattern[str]:
    return re.compile(CATEGORIES.get(value, value), re.IGNORECASE)


def load_prompts(source: PromptSource) -> list[str]:
    """The source's prompts: filtered, restricted to its split, de-duplicated, hash-ordered."""
    return [prompt for prompt, _ in load_labelled(source)]


def load_labelled(source: PromptSource) -> list[tuple[str, str]]:
    """`load_prompts` with each prompt's `category` column ("" where the file has none)."""
    path = resolve_path(source.path)
    rows = read_rows(path)
    column = pick_column(rows, source.column, path)
    allowed: dict[str, set[str]] = {}
    for col, value in source.where:  # one column: any of its values; columns: all
        allowed.setdefault(col, set()).add(value)
    rows = [row for row in rows if all(row.get(c) in vs for c, vs in allowed.items())]
    pairs = [
        (row[column].strip(), row.get("category") or "")
        for row in rows
        if row.get(column, "").strip()
    ]
    if source.match:
        pattern = category_regex(source.match)
        pairs = [p for p in pairs if pattern.search(p[0])]
    if source.exclude:
        pattern = category_regex(source.exclude)
        pairs = [p for p in pairs if not pattern.search(p[0])]
    if source.split != "all":
        pairs = [p for p in pairs if split_of(p[0]) == source.split]
    unique: dict[str, tuple[str, str]] = {}
    for pair in sorted(pairs, key=lambda p: prompt_hash(p[0])):
        unique.setdefault(normalise(pair[0]), pair)
    ordered = list(unique.values())
    return ordered[: source.limit] if source.limit is not None else ordered


def with_split(source: PromptSource, split: Split) -> PromptSource:
    return replace(source, split=split)
