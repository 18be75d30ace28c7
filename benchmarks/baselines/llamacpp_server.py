"""llama-cpp-python's own OpenAI server (``python -m llama_cpp.server``), bench-only.

Started unchanged except for one thing: its request-id middleware answers 400 to an
``x-request-id`` that is not a UUID, and vLLM's load generator sends ``bench-<uuid>-<n>``.
The check is turned off; nothing else differs from ``python -m llama_cpp.server ARGS``.
"""

from __future__ import annotations

import runpy

from starlette_context.plugins.base import PluginUUIDBase

PluginUUIDBase.validate_uuid = lambda self, value: None

if __name__ == "__main__":
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
