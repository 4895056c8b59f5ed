"""Gated patches: a patch that acts only on the requests it refuses.

A gated patch first runs as a short probe: greedy, its first `probe_tokens` tokens, on exactly
the prompt that will be served, with every effective patch applied. If the probe opens like a
refusal (`fires`), the answer is the patched model's; otherwise the request is served with the
gated patches switched off, so it gets what the model without them gives: bit-identical for
greedy decoding, the same distribution when sampling. Several gated patches on one request
probe as their exact stack, and one decision covers them (one probe per patch would give
per-category decisions at N times the probe cost).

The rule lives in the patch's metadata (`safepatch.json`, key `gate`) and is reported by the
admin API; a tenant's policy may set a patch's mode (`gated` or `always`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Mode = Literal["gated", "always"]
MODES: tuple[Mode, ...] = ("gated", "always")
# How refusals open (lower case): SafePatch's training targets and the decline openings the
# factory's judge was checked with (app/factory/judge.py, 220 hand-labelled responses).
REFUSAL_OPENINGS: tuple[str, ...] = (
    "i'm sorry",
    "i am sorry",
    "sorry",
    "i apologize",
    "i apologise",
    "my apologies",
    "apologies",
    "i can't",
    "i cannot",
    "i can not",
    "i won't",
    "i will not",
    "i'm not able",
    "i am not able",
    "i'm unable",
    "i am unable",
    "i'm not going to",
    "i am not going to",
    "i must decline",
    "i refuse",
    "i'm afraid",
    "i am afraid",
    "unfortunately, i",
    "no, i",
    "as an ai",
    "as a language model",
    "as a responsible",
    "i don't feel comfortable",
    "i do not feel comfortable",
    "i'm not comfortable",
    "i'm not allowed",
    "i am not allowed",
    "i don't think i can",
    "i do not think i can",
    "i'd rather not",
    "i would rather not",
    "i strongly advise against",
    "i would strongly advise against",
    "i must advise against",
    "it is not appropriate",
    "it's not appropriate",
    "it is not ethical",
    "it's not ethical",
    "that's not something i",
    "this is not something i",
)


def normalise(text: str) -> str:
    return text.strip().lower().replace("\u2019", "'").replace("\u2018", "'")


SIGNALS = ("probe_text_opening",)
MAX_PROBE_TOKENS = 64


class GateSpec(BaseModel):
    """A gate rule as stored in `safepatch.json` (key `gate`) or sent by an operator
    (`PUT /admin/adapters/{name}/gate`): every field checked, unknown fields refused."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode = "always"  # the patch's default mode
    signal: Literal["probe_text_opening"] = "probe_text_opening"
    probe_tokens: int = Field(default=6, ge=1, le=MAX_PROBE_TOKENS, strict=True)
    openings: list[str] | None = Field(default=None, min_length=1)  # None: REFUSAL_OPENINGS
    calibration: str | dict[str, Any] = (
        "the refusal openings of SafePatch's training targets (not calibrated)"
    )

    @field_validator("openings")
    @classmethod
    def _openings(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        # an empty opening would match every probe
        kept = [o for o in map(normalise, value) if o]
        if not kept:
            raise ValueError("openings must hold at least one non-empty opening")
        return kept


@dataclass(frozen=True)
class GateRule:
    """The decision rule of one patch: which signal, its parameters, how they were set."""

    mode: Mode = "always"
    signal: str = "probe_text_opening"
    probe_tokens: int = 6
    openings: tuple[str, ...] = REFUSAL_OPENINGS
    calibration: str | dict[str, Any] = GateSpec.model_fields["calibration"].default

    @classmethod
    def from_spec(cls, spec: GateSpec) -> GateRule:
        values = spec.model_dump(exclude={"openings"})
        return cls(**values, openings=tuple(spec.openings or REFUSAL_OPENINGS))

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> GateRule:
        """The rule in a patch's metadata (checked when the patch was registered)."""
        return cls.from_spec(GateSpec.model_validate(meta.get("gate") or {}))

    def fires(self, probe_text: str) -> bool:
        return normalise(probe_text).startswith(self.openings)

    def verdict(self, probe_text: str) -> bool | None:
        """`fires` of every continuation of `probe_text`, where they all agree: True once it
        opens with an opening, False once no opening can follow, else None (read on). Equal
        to `fires` of the whole probe wherever it decides (normalising is per character,
        bar the outer spaces it strips, which only keep a text undecided longer)."""
        text = normalise(probe_text)
        if text.startswith(self.openings):
            return True
        return None if any(o.startswith(text) for o in self.openings) else False

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "openings": list(self.openings)}


@dataclass(frozen=True)
class Probe:
    """One probe for the gated patches of a request (their decisions are one)."""

    gated: tuple[str, ...]
    probe_tokens: int
    rules: tuple[GateRule, ...]

    @classmethod
    def for_patches(
        cls, rules: Mapping[str, GateRule], modes: Mapping[str, Mode], patches: Iterable[str]
    ) -> Probe | None:
        """The probe for `patches` (None: nothing gated). `modes` (the tenant's) overrides
        each patch's own default mode."""
        gated = tuple(p for p in patches if modes.get(p, rules[p].mode) == "gated")
        if not gated:
            return None
        chosen = tuple(rules[p] for p in gated)
        return cls(gated, max(r.probe_tokens for r in chosen), chosen)

    def fires(self, probe_text: str) -> bool:
        return any(rule.fires(probe_text) for rule in self.rules)

    def verdict(self, probe_text: str) -> bool | None:
        """True once any rule fires, False once none can, else None."""
        verdicts = [rule.verdict(probe_text) for rule in self.rules]
        if True in verdicts:
            return True
        return None if None in verdicts else False
