"""The operator API's request and response bodies (what ``/docs`` shows)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from broker.protocol import command_specs as specs
from broker.protocol.command_status import CommandStatus
from broker.protocol.commands import IDEMPOTENCY_KEY_MAX

__all__ = [
    "AuditOut",
    "BridgeConfigureRequest",
    "CommandAccepted",
    "CommandEventOut",
    "CommandOut",
    "CommandRequest",
    "ConfigMapPatchRequest",
    "EdgeOut",
    "ErrorOut",
    "OperatorOut",
    "RestartRequest",
    "ScaleRequest",
    "SetEnvRequest",
    "SetImageRequest",
]


class _CommandRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    ttl_seconds: float | None = Field(
        None, gt=0, description="Seconds the command stays valid (default from settings)."
    )
    idempotency_key: str | None = Field(
        None, min_length=1, max_length=IDEMPOTENCY_KEY_MAX,
        description="Retries with the same key return the same command (also a header).",
    )


class ScaleRequest(_CommandRequest):
    kind: Literal["deployment.scale"]
    spec: specs.DeploymentScale


class SetEnvRequest(_CommandRequest):
    kind: Literal["deployment.set_env"]
    spec: specs.DeploymentSetEnv


class SetImageRequest(_CommandRequest):
    kind: Literal["deployment.set_image"]
    spec: specs.DeploymentSetImage


class RestartRequest(_CommandRequest):
    kind: Literal["deployment.restart"]
    spec: specs.DeploymentRestart


class ConfigMapPatchRequest(_CommandRequest):
    kind: Literal["configmap.patch"]
    spec: specs.ConfigMapPatch


class BridgeConfigureRequest(_CommandRequest):
    kind: Literal["bridge.configure"]
    spec: specs.BridgeConfigure


CommandRequest = Annotated[
    ScaleRequest | SetEnvRequest | SetImageRequest | RestartRequest | ConfigMapPatchRequest
    | BridgeConfigureRequest,
    Field(discriminator="kind"),
]


class CommandAccepted(BaseModel):
    id: str
    edge: str
    kind: str
    status: str
    issued_at: datetime
    expires_at: datetime
    duplicate: bool = Field(description="True when this answers a repeated idempotency key.")


class CommandEventOut(BaseModel):
    status: str
    code: str
    reason: str
    result: dict[str, Any] | None
    edge: str = Field(description="The edge that reported it.")
    reported_at: datetime = Field(description="Edge clock.")
    received_at: datetime
    effective: bool = Field(description="Whether it changed the command's status.")


class CommandOut(BaseModel):
    id: str
    edge: str
    kind: str
    spec: dict[str, Any]
    issuer: str
    status: CommandStatus
    code: str | None
    reason: str | None
    result: dict[str, Any] | None
    idempotency_key: str | None
    issued_at: datetime
    expires_at: datetime
    published_at: datetime | None
    delivered_at: datetime | None
    finished_at: datetime | None
    finished_by: str | None
    history: list[CommandEventOut] | None = None


class EdgeOut(BaseModel):
    edge: str
    version: str
    last_seen: datetime
    seconds_since_seen: float
    online: bool
    buffer_records: int
    buffer_bytes: int
    unshipped_records: int
    oldest_unshipped_age_s: float
    disk_bytes: int
    dropped: dict[str, Any]


class ErrorOut(BaseModel):
    """Every refusal: a stable code and a sentence (some carry more fields)."""

    error: str = Field(description="Stable machine-readable code, e.g. unknown_edge.")
    message: str = Field(description="What was wrong, for people.")


class AuditOut(BaseModel):
    id: int
    at: datetime
    operator: str = Field(description="Operator name; 'cli:<user>@<host>' for the CLI.")
    action: str = Field(description="command.issue, operator.add, or 'METHOD /path'.")
    target: str
    client: str = Field(description="Peer address (host:port) the request came from.")
    status: int | None = Field(description="HTTP status answered; null from the CLI.")
    detail: dict[str, Any]


class OperatorOut(BaseModel):
    name: str
    scopes: list[str]
    token_prefix: str
    created_at: datetime
    created_by: str
    revoked_at: datetime | None
    last_used_at: datetime | None
