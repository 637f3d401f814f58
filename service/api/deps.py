"""Request dependencies: settings, one database session per request (one unit of work), list pages."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request
from sqlalchemy.orm import Session

from service.store.db import session_scope
from service.store.settings import Settings


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """Commits when the endpoint returns, rolls back when it raises; used with scope="function", so
    the commit happens before the response is sent and a client that reads right after sees the write."""
    with session_scope(request.app.state.settings.database_url) as session:
        yield session


@dataclass(frozen=True)
class Page:
    """Which slice of a list: the query parameters every list endpoint takes."""

    limit: int
    offset: int


def get_page(limit: Annotated[int, Query(ge=1, le=500, description="items per page")] = 50,
             offset: Annotated[int, Query(ge=0, le=2**63 - 1, description="items to skip")] = 0) -> Page:
    return Page(limit, offset)


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
PageDep = Annotated[Page, Depends(get_page)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
