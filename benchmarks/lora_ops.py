"""The LoRA ops alone: upstream vLLM's torch ops against loraswap's, per decode step.

    python benchmarks/lora_ops.py [--tokens 32] [--slots 8] [--layers 30]

One "step" calls the ops the way vLLM's CPU punica wrapper does for one Llama layer of
SmolLM2-135M (shrink + expand for q/k/v, o, gate/up, down; rank 16, bf16 model, fp32 shrink
buffer), times ``--layers``. Upstream ops get indices clamped at 0 (they read -1 as the last slot).
"""

from __future__ import annotations

import argparse
import time

import torch
import vllm.lora.ops.torch_ops.lora_ops as upstream

from loraswap.vllm_plugin import lora_kernels

HIDDEN, INTERMEDIATE, KV, RANK = 576, 1536, 192, 16
MODULES = [(HIDDEN, [HIDDEN, KV, KV]), (HIDDEN, [HIDDEN]), (HIDDEN, [INTERMEDIATE] * 2),
           (INTERMEDIATE, [HIDDEN])]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--upstream", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    n, s, dt = args.tokens, args.slots, getattr(torch, args.dtype)
    a = [[torch.randn(s, 1, RANK, i, dtype=dt) * 0.01 for _ in outs] for i, outs in MODULES]
    b = [[torch.randn(s, 1, o, RANK, dtype=dt) * 0.01 for o in outs] for _, outs in MODULES]
    x = [torch.randn(n, i, dtype=dt) for i, _ in MODULES]
    y = [torch.zeros(n, sum(outs), dtype=dt) for _, outs in MODULES]

    def layer(ops, idx: torch.Tensor) -> None:
        for (_, outs), la, lb, xi, yi in zip(MODULES, a, b, x, y, strict=True):
            buffers = [torch.zeros(n, RANK) for _ in outs]
            for k in range(len(outs)):
                ops.bgmv_shrink(xi, la[k], buffers[k], idx, 1.0)
            offset = 0
            for k, out in enumerate(outs):
                ops.bgmv_expand_slice(buffers[k], lb[k], yi, idx, offset, out, True)
                offset += out

    def ms_per_step(ops, idx: torch.Tensor) -> float:
        layer(ops, idx)
        start = time.perf_counter()
        for _ in range(args.repeat):
            layer(ops, idx)
        return (time.perf_counter() - start) / args.repeat * args.layers * 1000

    cases = {
        "no row has an adapter": torch.full((n,), -1),
        "one adapter for every row": torch.full((n,), 1),
        "base + 3 adapters": torch.tensor([-1, 0, 1, 2]).repeat(n)[:n],
        f"base + {args.slots} adapters": torch.arange(-1, args.slots).repeat(n)[:n],
        f"{min(n, args.slots)} distinct adapters, no base": torch.arange(n) % args.slots,
    }
    print(f"| {n} tokens, {args.slots} slots, {args.dtype} | upstream ms/step | loraswap ms/step |")
    print("| --- | ---: | ---: |")
    for name, idx in cases.items():
        before = ms_per_step(upstream, idx.clamp_min(0)) if args.upstream else float("nan")
        after = ms_per_step(lora_kernels, idx)
        print(f"| {name} | {before:.1f} | {after:.1f} |")


if __name__ == "__main__":
    main()
