"""Validation errors said for a technician: ``[section] key: problem`` with what is allowed.

pydantic locates an error by a path through the models (``('seals', 1, 'gpio', 'line')``);
`describe` walks that path through the models and the raw TOML together, so the message names
the section as the file has it (``[seals #2 (rear_door)] line``).
"""

from __future__ import annotations

from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError

from agent.config.schema import TOPIC_SAFE, Config
from agent.model.settings import NAME


def errors_of(e: ValidationError) -> list[dict[str, Any]]:
    try:
        return [dict(err) for err in e.errors()]
    except Exception:  # noqa: BLE001 - an input pydantic cannot render (deeply nested): its own text
        return [{"loc": (), "type": "value_error", "msg": str(e)[:500]}]


def describe(err: dict[str, Any], raw: dict[str, Any]) -> str:
    """One validation error as ``[section] key: problem`` with what is allowed."""
    try:
        return _describe_one(err, raw)
    except Exception:  # noqa: BLE001 - never lose the problem for want of a nice way to say it
        where = ".".join(str(part) for part in err.get("loc", ())) or "(top level)"
        return f"{where}: {str(err.get('msg', 'invalid'))[:300]}"


def _describe_one(err: dict[str, Any], raw: dict[str, Any]) -> str:
    where, model, key = _locate(list(err["loc"]), raw)
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{where}: unknown key; " + _allowed(model)
    if kind == "missing":
        return f"{where}: required {'key' if key else 'section'} is missing"
    if kind == "union_tag_invalid" or kind == "union_tag_not_found":
        return f"{where}: driver must be one of {err.get('ctx', {}).get('expected_tags', '?')}"
    msg = err["msg"].removeprefix("Value error, ")
    given = err.get("input")
    if kind == "string_pattern_mismatch":
        pattern = err.get("ctx", {}).get("pattern")
        if pattern in (TOPIC_SAFE, NAME):
            msg = "must be letters, digits, '.', '_' or '-' (no spaces, '/', '+' or '#')"
        else:
            msg = f"does not have the expected form ({pattern})"
    if not isinstance(given, (dict, list)):
        shown = repr(given)
        msg += f" (got {shown if len(shown) <= 80 else shown[:60] + '…'})"
    return f"{where}: {msg}"


def _locate(loc: list[Any], raw: Any) -> tuple[str, type[BaseModel] | None, str | None]:
    """Walk an error location through the models and the raw TOML together.

    Returns where it is for a technician (``[mqtt.tls]``, ``[seals #2 (rear_door)] line``,
    ``[can.signals.engine_speed] deadband``), the model there, and the key if it is one.
    """
    labels: list[str] = []
    model: type[BaseModel] | None = Config
    node: Any = raw
    i = 0
    while i < len(loc):
        part = loc[i]
        field = model.model_fields.get(part) if model is not None and isinstance(part, str) else None
        if field is None:
            key = str(part)
            return (f"[{'.'.join(labels)}] {key}" if labels else key), model, key
        node = node.get(part) if isinstance(node, dict) else None
        annotation = field.annotation
        origin = get_origin(annotation)
        i += 1
        if origin is list and i < len(loc) and isinstance(loc[i], int):
            index = loc[i]
            item = node[index] if isinstance(node, list) and index < len(node) else None
            name = item.get("name") if isinstance(item, dict) else None
            labels.append(f"{part} #{index + 1}" + (f" ({name})" if name else ""))
            i += 1
            members = _section_types(get_args(annotation)[0])
            if len(members) > 1 and i < len(loc) and isinstance(loc[i], str) and loc[i] not in members[0].model_fields:
                i += 1  # the discriminator's tag, e.g. 'gpio'
                tag = item.get("driver") if isinstance(item, dict) else None
                model = next((m for m in members if _tag(m) == tag), members[0])
            else:
                model = members[0] if members else None
            node = item
        elif origin is dict and i < len(loc):  # [can.signals.NAME]: the next part is a key
            labels.append(f"{part}.{loc[i]}")
            node = node.get(loc[i]) if isinstance(node, dict) else None
            i += 1
            model = _section_type(get_args(annotation)[1])
        else:
            sub = _section_type(annotation)
            if sub is None:
                return (f"[{'.'.join(labels)}] {part}" if labels else part), model, part
            labels.append(part)
            model = sub
    return f"[{'.'.join(labels)}]" if labels else "(top level)", model, None


def _tag(model: type[BaseModel]) -> Any:
    field = model.model_fields.get("driver")
    args = get_args(field.annotation) if field else ()
    return args[0] if args else None


def _section_type(annotation: Any) -> type[BaseModel] | None:
    found = _section_types(annotation)
    return found[0] if found else None


def _section_types(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for arg in get_args(annotation):
        out += _section_types(arg)
    return out


def _allowed(model: type[BaseModel] | None) -> str:
    if model is None:
        return "no keys are allowed here"
    return "allowed: " + ", ".join(model.model_fields)
