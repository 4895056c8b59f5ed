"""Who is asking (tenant key, or the anonymous dev principal) and which patches serve them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app.engine.types import LoraTarget
from app.exceptions import InvalidRequest, NotFoundError
from app.patches.records import PatchRecord
from app.patches.registry import PatchRegistry
from app.tenants.policy import TenantPolicy, Toggles, effective_patches, parse_toggles

PATCHES_HEADER = "X-SafePatch-Patches"
PATCHES_FIELD = "safety_patches"
STACK_SEPARATOR = "+"


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    policy: TenantPolicy


@dataclass(frozen=True)
class Resolved:
    """Who asks and which patches serve them (already checked against the tenant policy)."""

    tenant: str
    patches: list[str]
    lora: LoraTarget | None
    records: dict[str, PatchRecord] = field(default_factory=dict)  # each patch, read once


def model_patches(model: str, base_name: str, registry: PatchRegistry) -> dict[str, PatchRecord]:
    """The patches `model` names: none (the base), a patch, or a stack `a+b`; anything else is
    a 404."""
    if model == base_name:
        return {}
    found = {name: registry.find(name) for name in model.split(STACK_SEPARATOR)}
    if all(found.values()):
        return found  # type: ignore[return-value]
    raise NotFoundError(
        f"The model '{model}' does not exist", param="model", code="model_not_found"
    )


def body_toggles(value: Any) -> list[str]:
    """The `safety_patches` body field: a list of names (`-name` opts out), or absent."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequest(
            f"{PATCHES_FIELD} must be a list of patch names",
            param=PATCHES_FIELD,
            code="invalid_patch",
        )
    return value


async def resolve(
    principal: Principal,
    model: str,
    body_patches: list[str],
    header: str | None,
    base_name: str,
    registry: PatchRegistry,
) -> Resolved:
    records = model_patches(model, base_name, registry)
    toggles = parse_toggles([*body_patches, *(header or "").split(",")], param=PATCHES_FIELD)
    toggles = Toggles(toggles.opt_in | frozenset(records), toggles.opt_out)
    # an unknown patch is a 404 before any policy answer; each record is read once
    records |= {name: registry.get(name) for name in toggles.opt_in - set(records)}
    patches = effective_patches(principal.policy, toggles)
    records = {name: records.get(name) or registry.get(name) for name in patches}
    lora = await registry.lora_of(list(records.values()))
    return Resolved(principal.tenant_id, patches, lora, records)
