"""Minimal reproduction: vLLM's torch LoRA ops apply the LAST adapter slot to index -1 rows.

In vLLM a per-token LoRA index of -1 means "no adapter" (base model). The pure-PyTorch ops in
vllm/lora/ops/torch_ops/lora_ops.py (used by the CPU punica wrapper) index the stacked weights
with it directly, and PyTorch reads -1 as the last slot.

Run: python repro_lora_index_bug.py   (no model, no engine, no vLLM plugins loaded)
Exit status 1 if the bug reproduces, 0 if index -1 rows get no adapter contribution.
"""

import sys

import torch
from vllm.lora.ops.torch_ops.lora_ops import bgmv_expand, bgmv_shrink

torch.manual_seed(0)
max_loras, hidden, rank, out_dim = 2, 8, 4, 6

# Stacked adapter weights in vLLM's layout; both slots hold an adapter (all slots in use).
lora_a = torch.randn(max_loras, 1, rank, hidden)
lora_b = torch.randn(max_loras, 1, out_dim, rank)

x = torch.randn(2, hidden)  # two tokens in one batch
indices = torch.tensor([0, -1])  # token 0 -> adapter in slot 0, token 1 -> base model

buffer = torch.zeros(2, rank)
bgmv_shrink(x, lora_a, buffer, indices, 1.0)
y = torch.zeros(2, out_dim)  # stands in for the base layer's output
bgmv_expand(buffer, lora_b, y, indices, add_inputs=True)

last_slot_delta = (x[1] @ lora_a[-1, 0].T) @ lora_b[-1, 0].T
torch.set_printoptions(precision=4, sci_mode=False)
print(f"vllm.lora.ops.torch_ops.lora_ops.bgmv_shrink is from: {bgmv_shrink.__module__}")
print("shrink output, token with index -1:", buffer[1])
print("expand delta,  token with index -1:", y[1])
print("expected for index -1 (no adapter):", torch.zeros(out_dim))
print("delta of the LAST slot for token 1: ", last_slot_delta)

if torch.count_nonzero(y[1]) or torch.count_nonzero(buffer[1]):
    same = torch.allclose(y[1], last_slot_delta, atol=1e-5)
    print(f"BUG: index -1 row got a LoRA delta (equals last slot's delta: {same})")
    sys.exit(1)
print("OK: index -1 row got no LoRA delta")
