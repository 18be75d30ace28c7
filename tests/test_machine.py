"""CPU capability detection and the dtype choice table, on fake capability sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loraswap.config import Settings
from loraswap.machine import CpuCaps, choose_dtype, read_cpu

AVX2 = "fpu sse sse2 avx avx2 fma f16c"
AVX512_BF16 = f"{AVX2} avx512f avx512bw avx512_vnni avx512_bf16"
AMX = f"{AVX512_BF16} avx512_fp16 amx_tile amx_bf16 amx_int8"


def caps(flags: str, arch: str = "x86_64") -> CpuCaps:
    return CpuCaps(model="test", arch=arch, cores=2, flags=frozenset(flags.split()))


@pytest.mark.parametrize(
    ("flags", "arch", "kind", "dtype"),
    [
        (AVX2, "x86_64", "x86-avx2", "float32"),
        ("sse sse2 avx avx2 avx512f avx512bw", "x86_64", "x86-avx512", "float32"),
        (AVX512_BF16, "x86_64", "x86-avx512-bf16", "bfloat16"),
        (AMX, "x86_64", "x86-amx-bf16", "bfloat16"),
        ("fp asimd sve bf16", "aarch64", "arm-bf16", "bfloat16"),
        ("fp asimd", "aarch64", "arm", "float32"),
    ],
)
def test_choice_table(flags, arch, kind, dtype):
    cpu = caps(flags, arch)
    assert cpu.kind == kind
    choice = choose_dtype(cpu, "auto", batch_invariant=False)
    assert (choice.value, choice.source) == (dtype, "auto")
    assert kind in choice.reason
    exact = choose_dtype(cpu, "auto", batch_invariant=True)
    assert exact.value == "float32" and "batch" in exact.reason


def test_no_native_bf16_never_gets_bf16():
    for flags in (AVX2, "sse sse2", "avx512f avx512bw avx512vl"):
        assert choose_dtype(caps(flags), "auto", batch_invariant=False).value == "float32"


def test_explicit_setting_wins_and_gpu_keeps_vllm_auto():
    pinned = choose_dtype(caps(AVX2), "bfloat16")
    assert pinned.value == "bfloat16" and "not batch-invariant" in pinned.reason
    assert choose_dtype(caps(AMX), "float32").source == "setting"
    assert choose_dtype(None, "auto").value == "auto"


def test_read_cpu_parses_proc_cpuinfo(tmp_path: Path):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: " + AVX2 + "\n\n"
        "processor\t: 1\nmodel name\t: AMD EPYC 7B13\nflags\t\t: " + AVX2 + "\n"
    )
    cpu = read_cpu(info)
    assert cpu.model == "AMD EPYC 7B13" and "avx2" in cpu.flags and cpu.cores >= 1
    print_ = cpu.fingerprint()
    assert print_["native_bf16"] is False and "avx2" in print_["flags"]


def test_read_cpu_on_this_machine_is_consistent():
    cpu = read_cpu()
    assert cpu.kind and cpu.fingerprint()["kind"] == cpu.kind


def test_info_says_where_each_setting_came_from(tmp_path: Path, monkeypatch):
    """``loraswap info --json``: env beats ``.env`` beats default, secrets redacted, the base
    model and registered adapters listed, JSON-serialisable as printed."""
    import json
    import subprocess
    import sys

    (tmp_path / ".env").write_text("LORASWAP_MAX_LORAS=4\nLORASWAP_API_KEYS=secret-key\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASWAP_")}
    env["LORASWAP_MAX_NUM_SEQS"] = "8"
    out = subprocess.run(
        [sys.executable, "-m", "loraswap", "info", "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    doc = json.loads(out)
    settings = doc["settings"]
    assert settings["max_num_seqs"] == {"value": 8, "source": "env"}
    assert settings["max_loras"] == {"value": 4, "source": ".env"}
    assert settings["max_cpu_loras"]["source"] == "default"
    assert settings["api_keys"] == {"value": "<1 set>", "source": ".env"}
    assert "secret-key" not in out
    assert doc["base_model"]["served_as"] == "smollm2-135m-instruct"
    assert doc["adapters"] == []  # no registry in this directory
    engine = doc["engine"]
    assert engine["tool_call_parser"]["value"] == "hermes"
    assert engine["chat_template"]["value"].endswith("chatml_tools.jinja")


def test_tool_parser_follows_the_chat_template():
    from loraswap.chat_templates import CHATML_TOOLS, chat_template_choice, tool_parser_choice

    default = Settings()
    assert chat_template_choice(default)[0] == str(CHATML_TOOLS)
    assert tool_parser_choice(default)[0] == "hermes"
    other = Settings(base_model="Qwen/Qwen2.5-0.5B-Instruct", served_model_name="qwen")
    assert chat_template_choice(other)[0] == "" and tool_parser_choice(other)[0] == ""
    chosen = Settings(base_model="meta-llama/Llama-3.2-1B-Instruct", tool_call_parser="llama3_json")
    assert tool_parser_choice(chosen)[0] == "llama3_json"
    assert tool_parser_choice(Settings(tool_call_parser="none"))[0] == ""
    assert chat_template_choice(Settings(chat_template="model"))[0] == ""
    quantized = Settings(base_model="smollm2-135m-instruct-w8a8")
    assert tool_parser_choice(quantized)[0] == "hermes"


def test_compiled_lora_engine_needs_a_cxx_compiler(monkeypatch):
    """torch.compile builds CPU kernels with a C++ compiler: without one the engine runs eager
    (a slim container), and the choice says why."""
    import shutil

    from loraswap import machine
    from loraswap.config import Settings

    settings = Settings(_env_file=None)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/g++" if name == "g++" else None)
    assert machine.compile_choice(settings).value is True
    monkeypatch.setattr(shutil, "which", lambda name: None)
    choice = machine.compile_choice(settings)
    assert choice.value is False and "C++ compiler" in choice.reason
    off = machine.compile_choice(Settings(_env_file=None, compile_lora=False))
    assert off.value is False and off.source == "setting"
    assert machine.engine_choices(settings, cpu_build=True)["compile_lora"].value is False


def test_row_kernel_choice_needs_float32_and_a_c_compiler(monkeypatch: pytest.MonkeyPatch):
    """The C row kernel runs for float32 with a C compiler; then the slots are sized without
    the torch ops' copies."""
    import shutil

    from loraswap import machine
    from loraswap.config import Settings

    settings = Settings(_env_file=None)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/gcc" if name == "gcc" else None)
    assert machine.row_kernel_choice(settings, "float32").value is True
    bf16 = machine.row_kernel_choice(settings, "bfloat16")
    assert bf16.value is False and "float32" in bf16.reason
    off = machine.row_kernel_choice(Settings(_env_file=None, lora_row_kernel=False), "float32")
    assert off.value is False and off.source == "setting"
    monkeypatch.setattr(shutil, "which", lambda name: None)
    choice = machine.row_kernel_choice(settings, "float32")
    assert choice.value is False and "C compiler" in choice.reason


def test_loraswap_info_imports_neither_vllm_nor_torch():
    """`loraswap info` answers in seconds: importing vLLM (and with it torch) costs ~15 s."""
    import subprocess
    import sys

    probe = "\n".join([
        "import contextlib, io, sys",
        "from loraswap.cli import main",
        "with contextlib.redirect_stdout(io.StringIO()):",
        "    main(['info'])",
        "print(sorted(m for m in ('vllm', 'torch', 'transformers') if m in sys.modules))",
    ])  # fmt: skip
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_a_shared_compile_cache_has_a_directory_per_cpu_kind(tmp_path: Path, monkeypatch):
    """Replicas on one CPU kind share compiled kernels; another kind (or the same kind with
    other instruction-set flags) never loads them, whatever VLLM_CACHE_ROOT was inherited."""
    from loraswap import engine

    monkeypatch.setenv("VLLM_CACHE_ROOT", "/inherited")
    engine.use_compile_cache(Settings(_env_file=None))
    assert os.environ["VLLM_CACHE_ROOT"] == "/inherited"  # unset: vLLM's as it was
    engine.use_compile_cache(Settings(_env_file=None, compile_cache_dir=tmp_path))
    here = Path(os.environ["VLLM_CACHE_ROOT"])
    assert here.parent == tmp_path and here.name.startswith(read_cpu().kind + "-")
    families = set()
    for flags in ({"avx2"}, {"avx2", "avx512f"}, {"avx2", "avx512f", "avx512_bf16"},
                  {"avx2", "avx512f", "avx512_vnni"}):  # fmt: skip
        caps = CpuCaps(arch="x86_64", flags=frozenset(flags), model="test", cores=2)
        monkeypatch.setattr(engine, "read_cpu", lambda caps=caps: caps)
        families.add(engine.compile_cache_family())
    assert len(families) == 4, families  # same kind, other flags: another directory
