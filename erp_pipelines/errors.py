"""The error taxonomy every connector maps its failures to.

Each error can carry the tenant it concerns, so a message always names the client and the fix.
Messages never contain credentials: build them from names and numbers only. As a second line of
defence, connectors `register_secret` every credential they hold or receive (tokens, session
tokens), and every `ErpError` message is passed through `redact`: an ERP that echoes a token back
in an error body cannot carry it into a log, an event or the warehouse.
"""

from __future__ import annotations

import threading

REDACTED = "[redacted]"
_MIN_SECRET = 8  # shorter strings would redact ordinary words
_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secret(*values: str | None) -> None:
    """Remember credential values of this process, so `redact` hides them wherever they appear."""
    with _secrets_lock:
        _secrets.update(v for v in values if v and len(v) >= _MIN_SECRET)


def redact(text: str) -> str:
    """`text` with every registered secret replaced by [redacted]."""
    if not _secrets or not text:
        return text
    with _secrets_lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


RETRY_RUN = "run it again later"  # a failure outside any tenant (the client list)
RETRY_PARTITION = "retry the partition later"  # the same failure on a tenant's path


class ErpError(Exception):
    """Base class. `tenant` is a short label such as 'Fjordkraft Regnskap AS (orgnr 912345679)'."""

    retryable = False

    def __init__(self, message: str, *, erp: str | None = None, tenant: str | None = None, fix: str | None = None):
        self.erp = erp
        self.tenant = tenant
        self.fix = fix
        self.detail = redact(message)
        super().__init__(self._compose())

    def _compose(self) -> str:
        parts = []
        if self.erp:
            parts.append(f"[{self.erp}]")
        if self.tenant:
            parts.append(f"{self.tenant}:")
        parts.append(self.detail)
        text = " ".join(parts)
        if self.fix:
            text += f" Fix: {self.fix}"
        return redact(text)

    def for_tenant(self, tenant: str) -> ErpError:
        """The same error, labelled with the tenant it happened for."""
        if self.tenant:
            return self
        clone = self.__class__.__new__(self.__class__)
        clone.__dict__.update(self.__dict__)
        clone.tenant = tenant
        if clone.fix and clone.fix.endswith(RETRY_RUN):  # e.g. a tenant's token request: its partition is what to retry
            clone.fix = clone.fix.removesuffix(RETRY_RUN) + RETRY_PARTITION
        Exception.__init__(clone, clone._compose())
        return clone


class ConfigError(ErpError):
    """Configuration is missing or malformed; the message names the variable."""


class AuthError(ErpError):
    """The integration's own credential is rejected or expired."""


class ClientAccessError(ErpError):
    """This tenant has not granted (or has withdrawn) access; the message says what to tick where."""


class RateLimited(ErpError):
    """Throttled. `retry_after`: seconds to pause the credential before the next attempt."""

    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs) -> None:
        self.retry_after = retry_after
        super().__init__(message, **kwargs)


class QuotaExhausted(RateLimited):
    """The credential's allowance is spent until `resume_at` (an ISO time): its run stops cleanly."""

    retryable = False

    def __init__(self, message: str, *, resume_at: str | None = None, **kwargs) -> None:
        self.resume_at = resume_at
        super().__init__(message, **kwargs)


class UpstreamError(ErpError):
    """5xx, timeouts and dropped connections that outlasted the retries."""

    retryable = True


class BadResponse(ErpError):
    """The payload does not match the contract (malformed JSON, missing required fields)."""


class TenantMismatch(ErpError):
    """The ERP answered for another company than the partition's tenant; nothing is stored."""


class InvalidTenantId(ErpError):
    """An organisation number (or personal number) that fails validation."""
