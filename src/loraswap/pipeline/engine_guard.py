"""The engine side of the pipeline: one wrapper around ``EngineClient.generate``.

Every route reaches the engine through ``generate``, so this one wrapper covers them all, and it
sees the exact token counts: it refuses over-long prompts (vLLM's own validation error, which
its serving layer answers with a 400), times each run, keeps a captured request's answer and
counts each finished run for its model, its tenant's usage and token budget.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from .. import metrics, vllm_compat
from ..config import Settings
from ..engine_runs import CAPTURE, SOURCE, EngineRun
from ..tenants import current

if TYPE_CHECKING:
    from vllm.engine.protocol import EngineClient

    from ..tenants import Tenancy


def guard_engine(client: EngineClient, settings: Settings, tenancy: Tenancy | None) -> None:
    """Wrap ``client.generate`` once: refuse over-long prompts, count tokens."""
    client.generate = guarded_generate(
        client.generate,
        settings.max_prompt_tokens,
        functools.partial(record_run, settings=settings, tenancy=tenancy),
    )


def record_run(run: EngineRun, settings: Settings, tenancy: Tenancy | None) -> None:
    """The engine finished a request (in the request's context): count its tokens and time
    for its model, its tenant's usage and token-per-minute budget (shadow runs are the
    operator's evaluation, not the tenant's traffic: usage only)."""
    prompt, completion = run.prompt_tokens, run.completion_tokens
    model = run.lora_name or settings.served_model_name
    if run.lora_name is not None:
        metrics.record_tokens(run.lora_name, prompt, completion)
    source = SOURCE.get()
    if source != "shadow":
        metrics.TRAFFIC.record(model, run)
    if tenancy is not None:
        principal = current()
        tenancy.usage.record(principal.name, model, prompt, completion, source)
        if source != "shadow":
            tenancy.limiter.add_tokens_soon(principal, prompt + completion)


def guarded_generate(
    generate: Callable[..., AsyncIterator[Any]],
    max_prompt_tokens: int | None,
    on_done: Callable[[EngineRun], None],
) -> Callable[..., AsyncIterator[Any]]:
    """``EngineClient.generate`` with the prompt-length limit, token counts and timings
    (``lora_name`` None for the base model), and the answer's text when captured."""

    async def guarded(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        prompt = args[0] if args else kwargs.get("prompt")
        ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
        if max_prompt_tokens is not None and ids is not None and len(ids) > max_prompt_tokens:
            raise vllm_compat.VLLMValidationError(
                f"the prompt has {len(ids)} tokens; this server accepts at most "
                f"{max_prompt_tokens} (LORASWAP_MAX_PROMPT_TOKENS)",
                parameter="input_tokens",
                value=len(ids),
            )
        lora = kwargs.get("lora_request")
        params = kwargs.get("sampling_params", args[1] if len(args) > 1 else None)
        kind = getattr(params, "output_kind", None)
        delta = kind == vllm_compat.RequestOutputKind.DELTA
        streamed = kind != vllm_compat.RequestOutputKind.FINAL_ONLY  # else no first-token time
        captured = CAPTURE.get()
        run = captured if captured is not None else EngineRun()
        run.lora_name = lora.lora_name if lora is not None else None
        start = time.perf_counter()
        text = ""
        try:
            async for output in generate(*args, **kwargs):
                if output.prompt_token_ids is not None:
                    run.prompt_tokens = len(output.prompt_token_ids)
                produced = sum(len(o.token_ids) for o in output.outputs)
                if run.ttft_s is None and produced and streamed:
                    run.ttft_s = time.perf_counter() - start
                run.completion_tokens = run.completion_tokens + produced if delta else produced
                if captured is not None:
                    first = next((o for o in output.outputs if o.index == 0), None)
                    if first is not None:
                        text = text + first.text if delta else first.text
                yield output
            run.latency_s = time.perf_counter() - start
        finally:
            if captured is not None:
                run.text = text
            on_done(run)

    return guarded
