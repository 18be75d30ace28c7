"""What this machine is (CPU kind and capabilities, or a GPU) and the engine settings that suit
it, chosen from figures measured on each kind (docs/benchmarks.md, FACTS per CPU kind).

``auto`` settings resolve here, once at start; every choice carries the reason it was made, so
the start log, ``loraswap info`` and ``GET /info`` can say why.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapters import sizing
from .choice import Choice

if TYPE_CHECKING:
    from .config import Settings

# Flags that mean the CPU multiplies bf16 natively (otherwise torch emulates it in fp32).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
ARM_BF16_FLAGS = ("bf16",)  # aarch64 `Features`


@dataclass(frozen=True)
class CpuCaps:
    model: str
    arch: str
    cores: int
    flags: frozenset[str] = field(default_factory=frozenset)

    @property
    def is_arm(self) -> bool:
        return self.arch in ("aarch64", "arm64")

    @property
    def native_bf16(self) -> bool:
        wanted = ARM_BF16_FLAGS if self.is_arm else NATIVE_BF16_FLAGS
        return any(f in self.flags for f in wanted)

    @property
    def kind(self) -> str:
        """A short name for the CPU kind, as benchmarks and notes record it."""
        if self.is_arm:
            return "arm-bf16" if self.native_bf16 else "arm"
        if "amx_bf16" in self.flags:
            return "x86-amx-bf16"
        if "avx512_bf16" in self.flags:
            return "x86-avx512-bf16"
        if "avx512f" in self.flags:
            return "x86-avx512"
        if "avx2" in self.flags:
            return "x86-avx2"
        return "x86" if self.arch in ("x86_64", "amd64") else self.arch

    def fingerprint(self) -> dict[str, Any]:
        shown = sorted(
            f for f in self.flags
            if f.startswith(("avx", "amx")) or f in ("bf16", "fma", "f16c", "asimd", "sve")
        )  # fmt: skip
        return {"kind": self.kind, "model": self.model, "arch": self.arch, "cores": self.cores,
                "flags": shown, "native_bf16": self.native_bf16}  # fmt: skip


def read_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuCaps:
    """This machine's CPU from ``/proc/cpuinfo`` (the first processor's entry)."""
    model, flags = platform.processor() or "unknown", frozenset()
    try:
        text = cpuinfo.read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and model in ("unknown", "", "x86_64"):
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return CpuCaps(model=model, arch=platform.machine().lower(), cores=cores or 1, flags=flags)


# vLLM's CPU kernels in bf16 are not batch-invariant: greedy outputs change with what shares
# the batch (measured with LoRA off: 12 of 32 base-only requests). In fp32 they held exactly.
BF16_NOT_INVARIANT = "vLLM's CPU bf16 kernels change outputs with batch composition"


def choose_dtype(caps: CpuCaps | None, requested: str, batch_invariant: bool = True) -> Choice:
    """The engine dtype. ``caps`` is None on a GPU build (vLLM's own ``auto`` applies there).

    ``batch_invariant`` (exact outputs whatever shares the batch) wins over speed: it means
    fp32 on CPU. Without it, bf16 where the CPU multiplies bf16 natively.
    """
    if requested != "auto":
        reason = "set by LORASWAP_DTYPE"
        if caps is not None and requested != "float32" and batch_invariant:
            reason += f"; not batch-invariant: {BF16_NOT_INVARIANT}"
        return Choice(requested, "setting", reason)
    if caps is None:
        return Choice("auto", "auto", "GPU: vLLM picks the checkpoint's dtype")
    if batch_invariant:
        forgone = (
            "; bf16 would give ~1.7-1.9x throughput on this CPU, set "
            "LORASWAP_BATCH_INVARIANT=false to take it"
            if caps.native_bf16
            else "; bf16 would be emulated here (measured 0.35x fp32 on AVX2) anyway"
        )
        return Choice(
            "float32", "auto",
            f"{caps.kind}: exact batch invariance (LORASWAP_BATCH_INVARIANT): "
            f"{BF16_NOT_INVARIANT}{forgone}",
        )  # fmt: skip
    if caps.native_bf16:
        return Choice(
            "bfloat16", "auto",
            f"{caps.kind}: native bf16 matmuls; measured 1.7-1.9x fp32 throughput at 16-32 "
            "streams on AVX512-BF16 and AMX machines",
        )  # fmt: skip
    if caps.is_arm:
        return Choice("float32", "auto", f"{caps.kind}: no native bf16; float32 (not measured)")
    return Choice(
        "float32", "auto",
        f"{caps.kind}: no native bf16, so torch emulates it; measured bf16 at 0.35x fp32 "
        "throughput at 16 streams on an AVX2 machine",
    )  # fmt: skip


def _on_path(variable: str, *names: str) -> str | None:
    """The program named by environment variable ``variable``, else the first of ``names``
    on PATH."""
    import shutil

    for name in (os.environ.get(variable), *names):
        if name and shutil.which(name):
            return name
    return None


def cxx_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend builds its kernels with, if any."""
    return _on_path("CXX", "g++", "c++", "clang++")


def compile_choice(settings: Settings) -> Choice:
    """torch.compile for a LoRA engine on CPU: on unless turned off, eager, or no C++ compiler."""
    if not settings.compile_lora:
        return Choice(False, "setting", "LORASWAP_COMPILE_LORA=false")
    if settings.enforce_eager:
        return Choice(False, "setting", "enforce_eager")
    compiler = cxx_compiler()
    if compiler is None:
        return Choice(False, "auto", "no C++ compiler (g++) here for torch.compile's CPU kernels")
    return Choice(True, "auto", f"compiled with LoRA on (1.2-1.35x tok/s measured; {compiler})")


def c_compiler() -> str | None:
    """The C compiler the LoRA row kernel is built with, if any."""
    return _on_path("CC", "gcc", "cc", "clang")


def row_kernel_choice(settings: Settings, dtype: str) -> Choice:
    """The C row kernel for float32 LoRA layers: on unless turned off, another dtype, or no C
    compiler."""
    if not settings.lora_row_kernel:
        return Choice(False, "setting", "LORASWAP_LORA_ROW_KERNEL=false")
    if dtype != "float32":
        return Choice(False, "auto", f"written for float32; {dtype} runs the torch ops")
    compiler = c_compiler()
    if compiler is None:
        return Choice(False, "auto", "no C compiler (gcc) here: the torch ops run")
    return Choice(
        True, "auto",
        f"built at start with {compiler}: each row reads only its adapter's rank and modules "
        "(Zipf traffic over 1,000 adapters at 16 streams: 1.1x tok/s, measured on "
        "x86-avx512-bf16)",
    )  # fmt: skip


def engine_choices(
    settings: Settings, cpu_build: bool, model_path: str | None = None
) -> dict[str, Choice]:
    """Every engine setting that ``auto`` resolves on this machine, with why. Adapter memory
    is sized from the base model's shapes when ``model_path`` holds its weights."""
    from .adapters.validation import BaseModelShapes
    from .chat_templates import chat_template_choice, tool_parser_choice

    caps = read_cpu() if cpu_build else None
    dtype = choose_dtype(caps, settings.dtype, settings.batch_invariant)
    shapes = None
    if model_path and settings.enable_lora:
        try:
            shapes = BaseModelShapes.from_checkpoint(model_path)
        except (OSError, ValueError):
            shapes = None
    kernel = row_kernel_choice(settings, str(dtype.value)) if cpu_build else None
    # the torch ops keep zero-padded copies of every slot; the row kernel reads vLLM's own
    copies = cpu_build and not (kernel is not None and kernel.value)
    lora = (
        sizing.choices(settings, shapes, str(dtype.value), cpu_ops=copies)
        if settings.enable_lora
        else {}
    )
    compiled = {}
    if cpu_build and settings.enable_lora:
        compiled = {"compile_lora": compile_choice(settings), "lora_row_kernel": kernel}
    return {
        "dtype": dtype,
        **lora,
        **compiled,
        "chat_template": Choice(*chat_template_choice(settings)),
        "tool_call_parser": Choice(*tool_parser_choice(settings)),
    }


def describe(cpu_build: bool) -> dict[str, Any]:
    """The machine, as ``loraswap info`` and ``GET /info`` show it."""
    if cpu_build:
        return {"device": "cpu", "cpu": read_cpu().fingerprint()}
    return {"device": "gpu", "cpu": read_cpu().fingerprint()}
