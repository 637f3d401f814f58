"""API-key authentication for /v1: the `X-API-Key` header must hold one of H2T_API_KEYS."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from service.store.errors import Unauthorized

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="one of the keys in H2T_API_KEYS")


def checked_key(request: Request, key: str | None) -> str:
    """The request's key if it is one of H2T_API_KEYS, else Unauthorized."""
    if not key:
        raise Unauthorized("missing X-API-Key header")
    given = key.encode()  # bytes: compare_digest refuses non-ASCII str, and a key may be any text
    if not any(hmac.compare_digest(given, k.encode()) for k in request.app.state.settings.api_keys):
        raise Unauthorized("invalid API key")
    return key


async def require_api_key(request: Request, key: Annotated[str | None, Security(api_key_header)]) -> str:
    return checked_key(request, key)


ApiKey = Annotated[str, Depends(require_api_key)]

# For the hot paths (predict, infer): the same check called inline, which spares the dependency solving a
# Depends costs per request; the route declares the scheme itself so the OpenAPI is unchanged.
KEY_SECURITY = {"security": [{"APIKeyHeader": []}]}


def require_key_inline(request: Request) -> str:
    return checked_key(request, request.headers.get("x-api-key"))


USER_HEADER = "X-H2T-User"  # optional: who is acting, recorded beside the key's fingerprint


def actor(request: Request, key: str) -> str:
    """Who made a change, as the registry records it: the API key's fingerprint (never the key), after the
    name a client gives in X-H2T-User: `alice (key 3f2a91c0)`."""
    fingerprint = f"key {hashlib.sha256(key.encode()).hexdigest()[:8]}"
    user = (request.headers.get(USER_HEADER) or "").strip()[:100]
    return f"{user} ({fingerprint})" if user else fingerprint
