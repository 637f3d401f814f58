from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from service.store.orm import REGISTRY_NAME_PATTERN

RegistryName = Annotated[str, Field(pattern=REGISTRY_NAME_PATTERN, description="a letter, then up to 63 letters, "
                                    "digits and _.- ; never @ or /, so `name@version` and `name@alias` parse")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RegisteredModelCreate(_Body):
    name: RegistryName
    description: str | None = Field(None, max_length=2000)


class VersionCreate(_Body):
    model_id: str = Field(min_length=1, max_length=36, description="the model (a succeeded run's id)")


class AliasSet(_Body):
    version: int = Field(ge=1, description="the version the alias points at from now on")


class VersionPublic(BaseModel):
    version: int
    model_id: str
    created_at: datetime
    created_by: str


class AliasPublic(BaseModel):
    alias: str
    version: int
    updated_at: datetime
    updated_by: str


class AliasEventPublic(BaseModel):
    alias: str
    version: int | None = Field(description="the version it moved to; null: removed")
    at: datetime
    by: str


class RegisteredModelPublic(BaseModel):
    name: str
    description: str | None
    created_at: datetime
    created_by: str
    latest_version: int | None = Field(description="what the bare name serves")
    versions: list[VersionPublic]
    aliases: list[AliasPublic]
    alias_history: list[AliasEventPublic] = Field(description="every move of an alias, newest first")


class RegisteredModelsPublic(BaseModel):
    data: list[RegisteredModelPublic]
    count: int
