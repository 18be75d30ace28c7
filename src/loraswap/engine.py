"""vLLM engine lifecycle: settings → vLLM's own CLI arguments → one ``AsyncLLM`` per worker."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shlex
from argparse import Namespace
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING

from . import engine_fork, vllm_compat
from .config import Settings
from .machine import Choice, engine_choices, read_cpu
from .vllm_plugin import guard as vllm_plugin_guard
from .vllm_plugin import staging

if TYPE_CHECKING:
    from vllm.engine.protocol import EngineClient

    from .startup import StartPhases

logger = logging.getLogger(__name__)


def is_cpu_build() -> bool:
    return vllm_compat.current_platform.is_cpu()


def resolved(settings: Settings, model_path: str | None = None) -> Settings:
    """``settings`` with its ``auto`` engine values chosen for this machine (and for the base
    model at ``model_path``: adapter memory is sized from its shapes)."""
    return with_choices(settings, engine_choices(settings, is_cpu_build(), model_path))


def with_choices(settings: Settings, choices: dict[str, Choice]) -> Settings:
    fields = type(settings).model_fields
    return settings.model_copy(update={k: c.value for k, c in choices.items() if k in fields})


def engine_cli_args(settings: Settings, model_path: str) -> list[str]:
    """The ``vllm serve`` command line equivalent to ``settings`` (``auto`` resolved)."""
    settings = resolved(settings, model_path)
    args = [
        "--model", model_path,
        "--served-model-name", settings.served_model_name,
        "--dtype", settings.dtype,
        "--max-model-len", str(settings.max_model_len),
        "--max-num-seqs", str(settings.max_num_seqs),
        "--tensor-parallel-size", str(settings.tensor_parallel_size),
        "--gpu-memory-utilization", str(settings.gpu_memory_utilization),
    ]  # fmt: skip
    if settings.trust_remote_code:
        args.append("--trust-remote-code")
    if settings.enforce_eager:
        args.append("--enforce-eager")
    if settings.chat_template:
        args += ["--chat-template", settings.chat_template]
    if settings.tool_call_parser:
        args += [
            "--enable-auto-tool-choice",
            "--tool-call-parser", settings.tool_call_parser,
            "--tool-strict-level", settings.tool_strict_level,
        ]  # fmt: skip
    if settings.log_requests:
        args.append("--enable-log-requests")
    if settings.enable_lora:
        args += [
            "--enable-lora",
            "--max-loras", str(settings.max_loras),
            "--max-lora-rank", str(settings.max_lora_rank),
            "--max-cpu-loras", str(settings.max_cpu_loras),
        ]  # fmt: skip
    return args + shlex.split(settings.vllm_args)


def parse_engine_args(settings: Settings, model_path: str) -> Namespace:
    """Parse with vLLM's own parser so every ``vllm serve`` flag and check applies."""
    parser = vllm_compat.make_arg_parser(vllm_compat.FlexibleArgumentParser(prog="loraswap-engine"))
    # first, so that a --worker-extension-cls in LORASWAP_VLLM_ARGS (in either spelling) wins
    staged = ["--worker-extension-cls", staging.QUALNAME] if settings.enable_lora else []
    args = parser.parse_args(staged + engine_cli_args(settings, model_path))
    vllm_compat.validate_parsed_serve_args(args)
    return args


@asynccontextmanager
async def engine_client(args: Namespace) -> AsyncIterator[EngineClient]:
    """vLLM's ``build_async_engine_client``, with its two blocking steps (the engine config,
    and AsyncLLM's start, which waits for the engine process) in a thread: built on the event
    loop they held it for seconds, and health probes went unanswered while an engine started
    or restarted. The output handler AsyncLLM starts when built on a loop starts here."""
    engine_args = vllm_compat.AsyncEngineArgs.from_cli_args(args)
    usage = vllm_compat.UsageContext.OPENAI_API_SERVER
    config = await asyncio.to_thread(engine_args.create_engine_config, usage_context=usage)
    engine_fork.process_started.clear()
    starting = asyncio.ensure_future(
        asyncio.to_thread(
            vllm_compat.AsyncLLM.from_vllm_config,
            vllm_config=config,
            usage_context=usage,
            enable_log_requests=engine_args.enable_log_requests,
            aggregate_engine_logging=engine_args.aggregate_engine_logging,
            disable_log_stats=engine_args.disable_log_stats,
        )
    )
    await import_serving_layer_beside(starting)
    engine = await starting
    try:
        engine._run_output_handler()
        await engine.reset_mm_cache()
        yield engine
    finally:
        await asyncio.to_thread(engine.shutdown, timeout=config.shutdown_timeout)


async def import_serving_layer_beside(starting: asyncio.Future) -> None:
    """vLLM's serving layer imported while the engine process loads the model, rather than
    after it is ready (0.6 s less to ready). Only once the engine process has started: until
    then AsyncLLM's thread imports too, and two threads importing the same modules can meet
    on Python's import locks. An engine started otherwise (a GPU build) skips this."""
    while not starting.done() and not engine_fork.process_started.is_set():
        await asyncio.sleep(0.05)
    if not starting.done():
        await asyncio.to_thread(vllm_compat.import_serving_layer)


def use_compile_cache(settings: Settings) -> None:
    """Point vLLM's cache at this CPU's family in ``compile_cache_dir`` (when set), before the
    fork server or any engine process reads it; it wins over an inherited ``VLLM_CACHE_ROOT``."""
    if settings.compile_cache_dir is not None:
        family = settings.compile_cache_dir / compile_cache_family()
        os.environ["VLLM_CACHE_ROOT"] = str(family)


def start_fork_server(settings: Settings) -> None:
    """The engine's warm fork server (:mod:`.engine_fork`), with the compile cache chosen: call
    it as early as the process can, since the server's imports (torch's and vLLM's, ~9 s on 2
    cores) run beside this process's own. Once per process; later calls do nothing."""
    use_compile_cache(settings)
    if settings.warm_engine_start:
        engine_fork.start_server(settings.cpu_engine_env())


def compile_cache_family() -> str:
    """This CPU's kind and a hash of its instruction-set flags: compiled kernels fit exactly
    the CPUs with the same flags."""
    caps = read_cpu()
    flags = ",".join(caps.fingerprint()["flags"])
    return f"{caps.kind}-{hashlib.sha256(flags.encode()).hexdigest()[:8]}"


def export_cpu_env(settings: Settings) -> None:
    """vLLM's CPU backend reads these from the environment of the engine processes."""
    if is_cpu_build():
        for name, value in settings.cpu_engine_env().items():
            os.environ.setdefault(name, value)


class Engine:
    """Starts and stops the vLLM engine; answers whether it is healthy."""

    def __init__(self, settings: Settings, model_path: str) -> None:
        self.settings = settings
        self.model_path = model_path
        self.args: Namespace | None = None
        self.choices: dict[str, Choice] = {}
        self.resolved = settings  # with the ``auto`` values chosen, once started
        self.client: EngineClient | None = None
        self._stack = AsyncExitStack()

    async def start(self, phases: StartPhases | None = None) -> EngineClient:
        start_fork_server(self.settings)
        vllm_plugin_guard.mark_api_process()
        is_cpu_build()  # imports vLLM, on the event loop's thread: once per process
        await asyncio.to_thread(self._configure)  # probes keep answering (engine restarts)
        if phases is not None:
            phases.mark("vLLM import and engine choices")
        logger.info("starting vLLM engine for %s", self.model_path)
        engine_fork.install()
        self.client = await self._stack.enter_async_context(engine_client(self.args))
        started = engine_fork.started()
        if started is not None:
            self.choices["engine_process"] = Choice(started[0], "auto", started[1])
        if phases is not None:
            phases.mark("engine (process, weights, warm-up)")
        return self.client

    def _configure(self) -> None:
        """This machine's choices for the ``auto`` settings and vLLM's arguments from them."""
        export_cpu_env(self.settings)
        vllm_compat.check_version()
        self.choices = engine_choices(self.settings, is_cpu_build(), self.model_path)
        for name, choice in self.choices.items():
            logger.info("engine %s = %s (%s)", name, choice.value, choice.reason)
        self.resolved = with_choices(self.settings, self.choices)
        self.args = parse_engine_args(self.resolved, self.model_path)

    async def stop(self) -> None:
        """Shut the engine processes down; safe to call twice."""
        client, self.client = self.client, None
        if client is not None:
            logger.info("stopping vLLM engine")
        await self._stack.aclose()

    @property
    def dead(self) -> bool:
        """True once a started engine has failed (its processes died or it raised)."""
        return self.client is not None and self.client.errored

    async def is_healthy(self) -> bool:
        client = self.client
        if client is None or client.errored:
            return False
        try:
            await client.check_health()
        except Exception as exc:
            logger.warning("engine health check failed: %r", exc)
            return False
        return True
