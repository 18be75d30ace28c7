"""Request bodies before admission: inputs vLLM mishandles, refused or repaired, and the bound
on output tokens. Pure functions of the body, so every entry applies the same ones."""

from __future__ import annotations

from typing import Any

import pydantic

from ..config import Settings
from ..errors import ApiError
from ..routes import Route

TEXT_PARTS = frozenset({"input_text", "output_text"})


def check_input(route: Route, body: dict[str, Any]) -> None:
    """Inputs vLLM 0.32 answers with a 500 instead of a 400 (found by fuzzing): refused, or
    rewritten into the form vLLM handles."""
    constraints = body.get("structured_outputs")
    if constraints is not None and not isinstance(constraints, dict):
        # vLLM's before-validator calls .get on it: an AttributeError, so a 500
        raise ApiError(400, "structured_outputs must be an object", param="structured_outputs")
    if route.path != "/v1/responses" or not isinstance(body.get("input"), list):
        return
    for i, item in enumerate(body["input"]):
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message" and not item.get("content"):
            raise ApiError(400, f"input[{i}] is a message without content", param="input")
        # Items echoed back in their output form (with id/status) are parsed by vLLM 0.32 into
        # typed objects its chat parser then fails on (500s: an assert, a missing attribute).
        # Those fields mean nothing for generation: drop them, so vLLM reads the item as the
        # input form it handles.
        if item.get("type") in ("message", "function_call_output"):
            item.pop("id", None)
            item.pop("status", None)
        # A function_call_output's list output: text parts only (others hit the same assert).
        # A string output always works.
        output = item.get("output") if item.get("type") == "function_call_output" else None
        if isinstance(output, list) and any(
            not isinstance(p, dict) or p.get("type") not in TEXT_PARTS for p in output
        ):
            raise ApiError(
                400, f"input[{i}].output: a function_call_output's output is a string "
                "or a list of input_text parts", param="input",
            )  # fmt: skip
        content = item.get("content")
        for j, part in enumerate(content if isinstance(content, list) else []):
            if isinstance(part, dict) and part.get("type") == "refusal":
                # vLLM reads an echoed refusal as text it lacks (a 500): it is text
                content[j] = {"type": "output_text", "text": str(part.get("refusal", ""))}
            if isinstance(part, dict) and part.get("type") == "input_file":
                raise ApiError(
                    400, f"input[{i}].content[{j}]: input_file parts are not supported",
                    param="input",
                )  # fmt: skip


def check_token_limits(settings: Settings, route: Route, body: dict[str, Any]) -> None:
    """The hard output limit, and the default bound when the client asks for none."""
    if route.token_fields and all(body.get(f) is None for f in route.token_fields):
        default = settings.default_max_tokens
        if default is not None:
            body[route.token_fields[0]] = default
    limit = settings.max_tokens_limit
    if limit is None:
        return
    for name in route.token_fields:
        asked = body.get(name)
        if isinstance(asked, int) and not isinstance(asked, bool) and asked > limit:
            raise ApiError(
                400, f"{name} is {asked}; this server allows at most {limit}", param=name
            )


def validation_message(exc: pydantic.ValidationError) -> str:
    """A body that fails vLLM's (or our) request model, as one 400 message."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()
    )
