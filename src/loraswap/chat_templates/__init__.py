"""Chat templates shipped with loraswap, and the tool-call parser that reads what they ask for.

SmolLM2's own template has no tool section, so vLLM cannot offer OpenAI tool calling with it.
``chatml_tools.jinja`` is that template (identical output without tools) plus Hermes-style
``<tools>`` / ``<tool_call>`` / ``<tool_response>`` blocks, which vLLM's ``hermes`` parser reads.
"""

from __future__ import annotations

from pathlib import Path

from ..config import DEFAULT_MODEL_NAME, Settings

HERE = Path(__file__).resolve().parent
CHATML_TOOLS = HERE / "chatml_tools.jinja"


def serves_default_model(settings: Settings) -> bool:
    """The shipped SmolLM2 import (any of its variants, such as the W8A8 one)."""
    name = settings.base_model.split(":", 1)[0]
    return name.startswith(DEFAULT_MODEL_NAME)


def chat_template_choice(settings: Settings) -> tuple[str, str, str]:
    """(value, source, reason) for ``--chat-template``; ``""`` keeps the model's own."""
    requested = settings.chat_template
    if requested == "auto":
        if serves_default_model(settings):
            return str(CHATML_TOOLS), "auto", "default model: its template plus Hermes tool blocks"
        return "", "auto", "the model's own chat template"
    if requested == "model":
        return "", "setting", "the model's own chat template (LORASWAP_CHAT_TEMPLATE=model)"
    return requested, "setting", "set by LORASWAP_CHAT_TEMPLATE"


def tool_parser_choice(settings: Settings) -> tuple[str, str, str]:
    """(value, source, reason) for ``--tool-call-parser``; ``""`` leaves tool calling off."""
    requested = settings.tool_call_parser
    if requested == "auto":
        template, _, _ = chat_template_choice(settings)
        if template == str(CHATML_TOOLS):
            return "hermes", "auto", "matches the shipped tool template's <tool_call> blocks"
        return "", "auto", "unknown for this model: set LORASWAP_TOOL_CALL_PARSER to enable tools"
    if requested == "none":
        return "", "setting", "tool calling off (LORASWAP_TOOL_CALL_PARSER=none)"
    return requested, "setting", "set by LORASWAP_TOOL_CALL_PARSER"
