"""The command form, generated from the command specs' JSON schemas.

Each kind's pydantic model (:data:`broker.protocol.command_specs.SPEC_MODELS`) says
its fields, their types, bounds, enums and descriptions; this module turns that
into form fields (number inputs with their bounds, selects for enums, text, and a
JSON text area for maps and nested objects), and turns a submitted form back into
a spec: an empty field is a field not given, a value is converted to the field's
type, and then the model itself validates it, so the console accepts exactly what
``POST /v1/edges/{edge}/commands`` accepts. Every problem is reported on its field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from pydantic import ValidationError

from broker.protocol.command_specs import SPEC_MODELS
from cloud_ingest import strict_json

__all__ = ["DESTRUCTIVE", "FormField", "ParsedForm", "destructive_reason", "form_fields",
           "parse_form"]

DESTRUCTIVE: Final = ("deployment.scale", "deployment.set_image")
"""Kinds that may take a service down: scaling to zero, a new image. The form asks
for a confirmation before they are sent."""


@dataclass(frozen=True, slots=True)
class FormField:
    """One input of the command form."""

    name: str
    label: str
    widget: str  # "number" | "integer" | "select" | "text" | "json"
    required: bool
    description: str = ""
    options: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None


@dataclass(slots=True)
class ParsedForm:
    """A submitted form: its values as typed, the spec (when valid), errors per field."""

    kind: str
    values: dict[str, str]
    spec: dict[str, Any] | None = None
    errors: dict[str, str] = field(default_factory=dict)


def _plain(prop: Mapping[str, Any]) -> tuple[Mapping[str, Any], bool]:
    """``anyOf: [X, null]`` -> (X, nullable)."""
    options = prop.get("anyOf")
    if options:
        rest = [o for o in options if o.get("type") != "null"]
        if len(rest) == 1:
            return {**rest[0], **{k: v for k, v in prop.items() if k != "anyOf"}}, True
        return {"type": "object", **{k: v for k, v in prop.items() if k != "anyOf"}}, True
    return prop, False


def form_fields(kind: str) -> list[FormField]:
    """The inputs of ``kind``'s form, in the model's field order.

    Raises:
        KeyError: unknown kind.
    """
    schema = SPEC_MODELS[kind].model_json_schema()
    required = set(schema.get("required", ()))
    out = []
    for name, raw in schema.get("properties", {}).items():
        prop, _ = _plain(raw)
        kind_of = prop.get("type")
        widget = "json"
        if "enum" in prop or "const" in prop:
            widget = "select"
        elif kind_of == "integer":
            widget = "integer"
        elif kind_of == "number":
            widget = "number"
        elif kind_of == "string":
            widget = "text"
        options = tuple(str(o) for o in prop.get("enum", ())) or (
            (str(prop["const"]),) if "const" in prop else ())
        out.append(FormField(
            name=name, label=name.replace("_", " "), widget=widget,
            required=name in required,
            description=str(raw.get("description") or prop.get("description") or ""),
            options=options,
            minimum=prop.get("minimum", prop.get("exclusiveMinimum")),
            maximum=prop.get("maximum", prop.get("exclusiveMaximum")),
        ))
    return out


def parse_form(kind: str, form: Mapping[str, str]) -> ParsedForm:
    """The spec a submitted form describes (fields are named ``spec.<field>``).

    Returns:
        A :class:`ParsedForm` with ``spec`` set when the model accepted it, else with
        one error per offending field (``""`` for problems of the whole spec).
    """
    parsed = ParsedForm(kind=kind, values={})
    if kind not in SPEC_MODELS:
        parsed.errors[""] = f"unknown command kind {kind!r}"
        return parsed
    spec: dict[str, Any] = {}
    for f in form_fields(kind):
        text = str(form.get(f"spec.{f.name}", "")).strip()
        parsed.values[f.name] = text
        if not text:
            if f.required:
                parsed.errors[f.name] = "required"
            continue
        try:
            spec[f.name] = _convert(f, text)
        except ValueError as exc:
            parsed.errors[f.name] = str(exc)
    if parsed.errors:
        return parsed
    try:
        model = SPEC_MODELS[kind].model_validate(spec)
    except ValidationError as exc:
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ())]
            where = loc[0] if loc else ""
            detail = ".".join(loc[1:])
            message = f"{detail}: {err['msg']}" if detail else str(err["msg"])
            parsed.errors[where] = (f"{parsed.errors[where]}; {message}"
                                    if where in parsed.errors else message)
        return parsed
    parsed.spec = model.model_dump(mode="json", exclude_unset=True)
    return parsed


def _convert(f: FormField, text: str) -> Any:
    if f.widget == "integer":
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number") from None
    if f.widget == "number":
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
        if not math.isfinite(value):  # float() takes "nan" and "inf"; JSON has neither
            raise ValueError(f"{text!r} is not a finite number")
        return value
    if f.widget == "json":
        try:
            return strict_json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON: {exc.msg} (line {exc.lineno}, column "
                             f"{exc.colno})") from None
        except RecursionError:  # a textarea of 200,000 brackets was a 500
            raise ValueError("not valid JSON: nested too deeply") from None
    return text


def destructive_reason(kind: str, spec: Mapping[str, Any]) -> str | None:
    """Why this command needs a confirmation, or None if it does not."""
    target = f"{spec.get('namespace')}/{spec.get('name')}"
    if kind == "deployment.scale" and spec.get("replicas") == 0:
        return f"This scales {target} to zero replicas: the service stops."
    if kind == "deployment.set_image":
        return (f"This rolls every pod of {target} (container {spec.get('container')}) to "
                f"the image {spec.get('image')}.")
    if kind == "bridge.configure":
        return _data_dropping_reason(spec)
    return None


_SHORT_TTL_S: Final = 3600.0
"""A record TTL below this (an hour) deletes unshipped records through any real outage."""


def _data_dropping_reason(spec: Mapping[str, Any]) -> str | None:
    """Why a ``bridge.configure`` may make the edge delete records it has not shipped
    (a policy that drops the oldest at the cap, or a short TTL), or None."""
    policies = [("streams without their own policy", spec.get("default_policy"))]
    streams = spec.get("streams")
    if isinstance(streams, Mapping):
        policies += [(f"stream {name}", policy) for name, policy in streams.items()]
    for where, policy in policies:
        if not isinstance(policy, Mapping):
            continue
        ttl = policy.get("ttl_s")
        if isinstance(ttl, int | float) and ttl < _SHORT_TTL_S:
            return (f"For {where}, records older than {ttl:g} s are deleted at the edge, "
                    "shipped or not: an outage longer than that loses them.")
        if policy.get("overflow") == "drop_oldest":
            return (f"For {where}, the edge deletes its oldest records when its buffer is "
                    "full, shipped or not, instead of pushing back on the producers.")
    return None
