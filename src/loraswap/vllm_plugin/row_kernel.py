"""A C kernel for float32 LoRA layers: each row's delta from its own slot, at the adapter's rank.

The torch ops of :mod:`.lora_kernels` run GEMMs over zero-padded copies of the stacked weights
(every adapter at the largest rank, every slice whether targeted or not, rows padded to blocks
of four for exactness). A decode step's LoRA work is memory-bound: with 16 different adapters in
a step those copies read ~3.6x the bytes the adapters hold. ``lora_rows.c`` reads vLLM's stacked
tensors in place, only the rank and slices each adapter has, with a fixed summation order per
row, so a row's result is bitwise the same alone or in any batch without padding. Built once per
process with the machine's C compiler (~0.3 s); without one, or with
``LORASWAP_LORA_ROW_KERNEL=0``, the torch ops run.
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraswap import machine

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(f"vllm.{__name__}")

ENV_VAR = "LORASWAP_LORA_ROW_KERNEL"
SOURCE = Path(__file__).with_name("lora_rows.c")
# -ffp-contract=off: no fused multiply-adds the compiler might use in one loop and not another.
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")

_LIBRARY: list[Any] = []  # [the loaded function or None], once per process


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def build(directory: Path, compiler: str) -> Path:
    """Compile ``lora_rows.c`` into ``directory``; raises CalledProcessError with the compiler's
    output on failure."""
    target = directory / "lora_rows.so"
    subprocess.run(
        [compiler, *FLAGS, "-o", str(target), str(SOURCE)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return target


def kernel() -> Any | None:
    """The kernel's C function, built and loaded on first use; None when turned off or when it
    cannot be built here (logged once)."""
    if not _LIBRARY:
        _LIBRARY.append(_load() if enabled() else None)
    return _LIBRARY[0]


def _load() -> Any | None:
    compiler = machine.c_compiler()
    if compiler is None:
        logger.warning("loraswap: no C compiler (gcc) for the LoRA row kernel: torch ops run")
        return None
    try:
        import torch  # noqa: F401  (its OpenMP runtime is the one the kernel binds to)

        with tempfile.TemporaryDirectory(prefix="loraswap-kernel-") as directory:
            library = ctypes.CDLL(str(build(Path(directory), compiler)))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        logger.warning("loraswap: LoRA row kernel not built (%s): torch ops run", detail)
        return None
    function = library.loraswap_lora_rows
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [size, size, pointer, size, pointer, size, pointer, size, size,
                         pointer, pointer, pointer, size, pointer, pointer,
                         ctypes.c_float, ctypes.c_int]  # fmt: skip
    function.restype = None
    logger.info("loraswap: LoRA row kernel built with %s", compiler)
    return function


class Layout:
    """One layer's stacked tensors as the kernel reads them: the pointer arrays and sizes, made
    once per layer (the stacked tensors are written in place, never moved)."""

    def __init__(self, a_stack: tuple, b_stack: tuple) -> None:
        n = len(a_stack)
        a0 = a_stack[0]
        self.n_slots, self.max_rank, self.n_in = a0.shape[0], a0.shape[-2], a0.shape[-1]
        self.n_slices = n
        self.a = (ctypes.c_void_p * n)(*(t.data_ptr() for t in a_stack))
        self.b = (ctypes.c_void_p * n)(*(t.data_ptr() for t in b_stack))
        outs = [t.shape[-2] for t in b_stack]
        self.outs = (ctypes.c_int64 * n)(*outs)
        self.offs = (ctypes.c_int64 * n)(*(sum(outs[:i]) for i in range(n)))
        self.total = sum(outs)

    @staticmethod
    def fits(a_stack: tuple, b_stack: tuple) -> bool:
        """float32, contiguous, the shapes vLLM stacks ([slots, 1, rank, in], [slots, 1, out,
        rank]), every slice at the same rank and input size."""
        import torch

        a0 = a_stack[0]
        return all(
            t.dtype == torch.float32 and t.is_contiguous() and t.dim() == 4 and t.shape[1] == 1
            for t in (*a_stack, *b_stack)
        ) and all(
            a.shape[0] == a0.shape[0] and a.shape[-2:] == a0.shape[-2:] for a in a_stack
        ) and all(
            b.shape[0] == a0.shape[0] and b.shape[-1] == a0.shape[-2] for b in b_stack
        )  # fmt: skip


def ranks_of(a_stack: tuple, b_stack: tuple, slots: slice | int = slice(None)) -> torch.Tensor:
    """Per slot and slice, how many leading rank positions hold both a non-zero lora_a row and
    a non-zero lora_b column ([slots, slices], int32). Positions past it add exact zeros, so
    the kernel skips them: vLLM pads smaller ranks with zeros to the largest, and a slice the
    adapter does not target is all zeros (rank 0). Made outside inference mode (the forward
    pass runs in it), so activation can update a slot's row in place."""
    import torch

    with torch.inference_mode(False):
        columns = []
        for a, b in zip(a_stack, b_stack, strict=True):
            both = a[slots, 0].ne(0).any(dim=-1) & b[slots, 0].ne(0).any(dim=-2)  # [slots?, rank]
            positions = torch.arange(1, both.shape[-1] + 1, dtype=torch.int32)
            columns.append((both.to(torch.int32) * positions).amax(dim=-1))
        return torch.stack(columns, dim=-1).to(torch.int32).contiguous()


def run(
    function: Any,
    layout: Layout,
    ranks: torch.Tensor,
    out: torch.Tensor,
    rows: torch.Tensor,
    scale: float,
    indices: torch.Tensor,
) -> bool:
    """Add every row's LoRA delta into ``out`` (``rows``' adapters by slot in ``indices``).
    False when the tensors do not have the kernel's layout (the caller runs the torch ops)."""
    import torch

    if (
        rows.dtype != torch.float32
        or out.dtype != torch.float32
        or rows.stride(-1) != 1
        or out.stride(-1) != 1
        or rows.shape[-1] != layout.n_in
        or out.shape[-1] < layout.total
    ):
        return False
    if indices.dtype != torch.int64 or not indices.is_contiguous():
        indices = indices.to(torch.int64).contiguous()
    function(rows.shape[0], layout.n_in, rows.data_ptr(), rows.stride(0), out.data_ptr(),
             out.stride(0), indices.data_ptr(), layout.n_slots, layout.n_slices, layout.a,
             layout.b, ranks.data_ptr(), layout.max_rank, layout.offs, layout.outs, scale,
             torch.get_num_threads())  # fmt: skip
    return True
