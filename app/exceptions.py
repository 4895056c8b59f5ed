"""Domain exceptions: what went wrong, in the domain's words, with no HTTP in them.

Domain code (app.patches, app.tenants, app.db) raises these; `app.errors` maps each `kind` once
to an HTTP status and the OpenAI error body. `message` is for people, `code` for machines,
`param` names the culprit (a field, file, module or tensor key) when there is one. A subclass
sets its kind and default code in its header: `class PatchNotFound(NotFoundError,
code="patch_not_found")`.
"""

from __future__ import annotations

from typing import Any, ClassVar


class DomainError(Exception):
    kind: ClassVar[str] = "invalid"  # a key of app.errors.KINDS
    code: str | None = None

    def __init_subclass__(
        cls, *, kind: str | None = None, code: str | None = None, **kwargs: Any
    ) -> None:
        super().__init_subclass__(**kwargs)
        cls.kind = kind or cls.kind
        cls.code = code or cls.code

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


# --- one class per kind: what the caller can do about it -----------------------------------
class InvalidRequest(DomainError, kind="invalid"):
    """The request cannot be served as asked (a 400): fix it and send it again."""


class Unprocessable(DomainError, kind="unprocessable"):
    """Well-formed, but its content is refused (a 422)."""


class NotAuthenticated(DomainError, kind="unauthorized", code="invalid_api_key"):
    """No valid credentials (a 401)."""


class NotAllowed(DomainError, kind="forbidden", code="forbidden"):
    """Valid credentials, but this caller may not do this (a 403)."""


class NotFoundError(DomainError, kind="not_found", code="not_found"):
    """No such thing (a 404)."""


class AlreadyExists(DomainError, kind="conflict", code="conflict"):
    """The name is taken (a 409)."""


class ServiceUnavailable(DomainError, kind="unavailable", code="not_ready"):
    """Nothing is wrong with the request; retry later (a 503)."""


class StorageFailure(DomainError, kind="storage", code="storage_error"):
    """The server could not write (or read) its own files; nothing was changed (a 500)."""


class StorageFull(StorageFailure, kind="storage_full", code="insufficient_storage"):
    """As StorageFailure, for a full disk or quota (a 507)."""


# --- named domain errors --------------------------------------------------------------------
class PatchNotFound(NotFoundError, code="patch_not_found"):
    """No active safety patch of that name (or it was deleted meanwhile)."""


class TenantNotFound(NotFoundError, code="tenant_not_found"):
    pass


class KeyNotFound(NotFoundError, code="key_not_found"):
    pass


class InvalidApiKey(NotAuthenticated):
    """An unknown or revoked tenant API key."""


class PolicyViolation(NotAllowed):
    """The tenant's patch policy refuses the request (a mandatory patch opted out, ...)."""


class InvalidMetadata(Unprocessable, code="invalid_metadata"):
    """A `safepatch.json` that does not parse or whose fields are invalid."""


class InvalidToggles(InvalidRequest):
    """A malformed per-request patch list (an empty name, a patch both asked for and refused)."""


class RankTooLarge(InvalidRequest, code="stacked_rank_too_large"):
    """A stack of patches needs a LoRA rank above the engine's max_lora_rank."""


class Unstackable(InvalidRequest, code="unstackable_patches"):
    """Patches whose updates cannot be summed exactly into one LoRA."""


class PatchUnavailable(ServiceUnavailable, code="patch_unavailable"):
    """A registered patch whose files cannot be served (damaged or missing)."""


class EngineRefused(ServiceUnavailable, code="engine_error"):
    """The engine refused a LoRA operation (pin, unpin)."""


class DatabaseUnavailable(ServiceUnavailable, code="database_unavailable"):
    """The database cannot be reached: writes are refused, reads come from the snapshot."""
