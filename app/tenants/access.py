"""Who is asking (tenant key, or the anonymous dev principal) and which patches serve them."""

from __future__ import annotations

from dataclasses import dataclass

from app.errors import NotFound
from app.patches.registry import PatchRegistry
from app.serving.completions import Resolved
from app.tenants.policy import TenantPolicy, Toggles, effective_patches, parse_toggles

PATCHES_HEADER = "X-SafePatch-Patches"
STACK_SEPARATOR = "+"


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    policy: TenantPolicy


def model_patches(model: str, base_name: str, registry: PatchRegistry) -> list[str]:
    """`model` names the base, a patch, or a stack `a+b`; anything else is a 404."""
    if model == base_name:
        return []
    names = model.split(STACK_SEPARATOR)
    if all(registry.find(n) is not None for n in names):
        return names
    raise NotFound(f"The model '{model}' does not exist", param="model", code="model_not_found")


async def resolve(
    principal: Principal,
    model: str,
    body_patches: list[str] | None,
    header: str | None,
    base_name: str,
    registry: PatchRegistry,
) -> Resolved:
    from_model = model_patches(model, base_name, registry)
    toggles = parse_toggles(
        [*(body_patches or []), *(header or "").split(",")], param="safety_patches"
    )
    toggles = Toggles(toggles.opt_in | frozenset(from_model), toggles.opt_out)
    for name in toggles.opt_in:
        registry.get(name)  # unknown patch -> 404, before any policy answer
    patches = effective_patches(principal.policy, toggles)
    lora = await registry.lora_for(patches)
    return Resolved(tenant=principal.tenant_id, patches=patches, lora=lora)
