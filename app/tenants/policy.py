"""Per-tenant patch policy and the per-request effective patch set.

    effective = mandatory ∪ (default − opted_out) ∪ (opted_in ∩ allowed)

where allowed = mandatory ∪ default ∪ optional. Asking for anything else, or opting out of a
mandatory patch, is refused (PolicyViolation, a 403) — never silently changed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from app.exceptions import InvalidToggles, PolicyViolation
from app.patches.gate import Mode


class TenantPolicy(BaseModel):
    mandatory: list[str] = Field(default_factory=list)
    default: list[str] = Field(default_factory=list)
    optional: list[str] = Field(default_factory=list)
    allow_base: bool = False
    # per patch: "gated" (acts only where its probe refuses) or "always"; unset: the patch's
    # own default (its metadata)
    modes: dict[str, Mode] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _disjoint(self) -> TenantPolicy:
        seen: dict[str, str] = {}
        for tier in ("mandatory", "default", "optional"):
            for name in getattr(self, tier):
                if name in seen:
                    raise ValueError(f"patch '{name}' is both {seen[name]} and {tier}")
                seen[name] = tier
        return self

    @field_validator("modes")
    @classmethod
    def _named(cls, modes: dict[str, Mode], info: ValidationInfo) -> dict[str, Mode]:
        named = {
            n for tier in ("mandatory", "default", "optional") for n in info.data.get(tier, [])
        }
        unnamed = sorted(set(modes) - named)
        if unnamed:
            raise ValueError(f"modes name patches the policy does not: {', '.join(unnamed)}")
        return modes

    def allowed(self) -> set[str]:
        return {*self.mandatory, *self.default, *self.optional}


@dataclass(frozen=True)
class Toggles:
    opt_in: frozenset[str]
    opt_out: frozenset[str]


def parse_toggles(items: Iterable[str], param: str) -> Toggles:
    """`["cyber", "-general"]` -> opt in to cyber, opt out of general."""
    opt_in, opt_out = set(), set()
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        name = item[1:] if item.startswith("-") else item.removeprefix("+")
        if not name:
            raise InvalidToggles(f"empty patch name in {param}", param=param, code="invalid_patch")
        (opt_out if item.startswith("-") else opt_in).add(name)
    both = opt_in & opt_out
    if both:
        raise InvalidToggles(
            f"patches both requested and opted out: {', '.join(sorted(both))}",
            param=param,
            code="conflicting_toggles",
        )
    return Toggles(frozenset(opt_in), frozenset(opt_out))


def effective_patches(policy: TenantPolicy, toggles: Toggles) -> list[str]:
    dropped_mandatory = toggles.opt_out & set(policy.mandatory)
    if dropped_mandatory:
        raise PolicyViolation(
            f"patches {', '.join(sorted(dropped_mandatory))} are mandatory for this tenant "
            "and cannot be turned off",
            param="safety_patches",
            code="patch_mandatory",
        )
    forbidden = toggles.opt_in - policy.allowed()
    if forbidden:
        raise PolicyViolation(
            f"patches {', '.join(sorted(forbidden))} are not allowed for this tenant",
            param="safety_patches",
            code="patch_forbidden",
        )
    chosen = {*policy.mandatory, *(set(policy.default) - toggles.opt_out), *toggles.opt_in}
    if not chosen and not policy.allow_base:
        raise PolicyViolation(
            "this tenant may not use the base model without a safety patch",
            param="model",
            code="base_model_forbidden",
        )
    return sorted(chosen)
