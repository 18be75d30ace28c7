from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from loraswap.adapters import sizing
from loraswap.cli import settings_table
from loraswap.config import Settings
from loraswap.engine import engine_cli_args, parse_engine_args


def test_defaults_serve_the_cpu_demo(monkeypatch):
    for key in list(os.environ):
        if key.startswith("LORASWAP_"):
            monkeypatch.delenv(key)
    s = Settings(_env_file=None)
    assert s.base_model == s.served_model_name == "smollm2-135m-instruct"
    assert s.dtype == "auto" and s.enable_lora


def test_auto_dtype_reaches_vllm_as_this_machines_choice():
    from loraswap.machine import choose_dtype, read_cpu

    args = parse_engine_args(Settings(_env_file=None), "/models/x")
    assert args.dtype == choose_dtype(read_cpu(), "auto").value == "float32"  # batch-invariant
    fast = parse_engine_args(Settings(_env_file=None, batch_invariant=False), "/models/x")
    assert fast.dtype == choose_dtype(read_cpu(), "auto", batch_invariant=False).value
    pinned = parse_engine_args(Settings(_env_file=None, dtype="float32"), "/models/x")
    assert pinned.dtype == "float32"


def test_env_prefix_and_types(monkeypatch):
    monkeypatch.setenv("LORASWAP_MAX_MODEL_LEN", "1024")
    monkeypatch.setenv("LORASWAP_ENABLE_LORA", "false")
    monkeypatch.setenv("LORASWAP_ADAPTER_ROOTS", '["/srv/a", "b"]')
    s = Settings(_env_file=None)
    assert s.max_model_len == 1024 and not s.enable_lora
    assert s.adapter_roots == [Path("/srv/a"), Path("b")]


@pytest.mark.parametrize(
    "env",
    [
        {"LORASWAP_MAX_MODEL_LEN": "0"},
        {"LORASWAP_DTYPE": "int3"},
        {"LORASWAP_GPU_MEMORY_UTILIZATION": "1.5"},
        {"LORASWAP_MAX_LORAS": "8", "LORASWAP_MAX_CPU_LORAS": "2"},
        {"LORASWAP_CPU_THREADS_BIND": " "},
    ],
)
def test_bad_values_are_rejected(monkeypatch, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError):
        Settings(_env_file=None)


def test_all_binds_every_allowed_core():
    s = Settings(_env_file=None, cpu_threads_bind="all")
    assert s.omp_threads_bind().split(",") == [str(c) for c in sorted(os.sched_getaffinity(0))]
    assert Settings(_env_file=None, cpu_threads_bind="0-3").omp_threads_bind() == "0-3"
    assert Settings(_env_file=None, tensor_parallel_size=2).omp_threads_bind() == "auto"


def test_settings_reach_vllm_through_its_own_parser():
    s = Settings(_env_file=None, max_loras=2, max_lora_rank=8, vllm_args="--enable-prefix-caching")
    args = parse_engine_args(s, "/models/x")
    assert args.model == "/models/x"
    assert args.served_model_name == ["smollm2-135m-instruct"]
    assert args.enable_lora and args.max_loras == 2 and args.max_lora_rank == 8
    assert args.max_cpu_loras == sizing.HOST_COUNT_CAP and args.enable_prefix_caching
    assert "--enable-lora" not in engine_cli_args(Settings(_env_file=None, enable_lora=False), "m")


def test_bad_vllm_args_fail_clearly():
    with pytest.raises(SystemExit):
        parse_engine_args(Settings(_env_file=None, vllm_args="--no-such-flag"), "/m")


def test_readme_configuration_table_is_in_step():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert settings_table() in readme, "run `make docs`"
    from loraswap.routes import markdown_table

    assert markdown_table() in readme, "run `make docs`"


def test_repeated_errors_are_rate_limited_in_the_log():
    import logging

    from loraswap.log_setup import RepeatFilter

    repeats = RepeatFilter(window_s=60)

    def record(msg: str, level: int = logging.ERROR) -> logging.LogRecord:
        return logging.LogRecord("loraswap.x", level, __file__, 1, msg, None, None)

    passed = [repeats.filter(record("engine failed")) for _ in range(50)]
    assert passed.count(True) == 1
    assert repeats.filter(record("another failure"))
    assert all(repeats.filter(record("info", logging.INFO)) for _ in range(3))
    repeats.seen[("loraswap.x", "engine failed")] = (-1e9, 49)
    later = record("engine failed")
    assert repeats.filter(later) and "49 more" in later.getMessage()


def test_repeated_tracebacks_are_logged_once_per_window():
    import logging
    import sys

    from loraswap.log_setup import RepeatedTracebacks

    def failure(message: str) -> logging.LogRecord:
        try:
            raise AssertionError(message)
        except AssertionError:
            info = sys.exc_info()
        message = "Exception in ASGI application"
        return logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, message, None, info)

    quiet = RepeatedTracebacks(window_s=60)
    assert quiet.filter(failure("a"))  # the first one keeps its traceback
    assert not any(quiet.filter(failure("a")) for _ in range(50))
    assert quiet.filter(failure("b"))  # a different failure is news
    plain = logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, "x", None, None)
    assert quiet.filter(plain)
