"""Adapter validation without the engine: each broken adapter gets a message naming the fault."""

from __future__ import annotations

import pytest

from loraswap.adapters.validation import AdapterInvalid, check_name, inside_roots, validate_adapter
from tests.adapter_factory import write_adapter, write_broken_adapters


@pytest.fixture(scope="module")
def broken(tmp_path_factory, base_shapes):
    root = tmp_path_factory.mktemp("root")
    outside = tmp_path_factory.mktemp("outside")
    return root, write_broken_adapters(root, base_shapes, outside)


def test_a_valid_adapter_passes(tmp_path, base_shapes):
    info = validate_adapter(write_adapter(tmp_path / "ok", base_shapes), base_shapes, 16)
    assert info.rank == 8 and info.target_modules == ["q_proj", "v_proj"]
    assert info.tensors == 2 * 2 * 30 and info.size_bytes > 0


@pytest.mark.parametrize(
    "case, message",
    [
        ("over_rank", "exceeds this server's max_lora_rank 16"),
        ("mismatched", "made for a different base model"),
        ("bad_target", "['foo_proj'] do not exist in the base model"),
        ("corrupt", "unreadable"),
        ("no_config", "adapter_config.json is missing"),
        ("not_lora", "only LORA is supported"),
    ],
)
def test_broken_adapters_are_named(broken, base_shapes, case, message):
    _, made = broken
    with pytest.raises(AdapterInvalid, match=None) as err:
        validate_adapter(made[case], base_shapes, 16)
    assert message in str(err.value)


def test_paths_must_stay_inside_the_roots(broken):
    root, made = broken
    assert inside_roots(made["over_rank"], [root]) == made["over_rank"].resolve()
    with pytest.raises(AdapterInvalid, match="outside the adapter roots"):
        inside_roots(made["outside"], [root])
    with pytest.raises(AdapterInvalid, match="outside the adapter roots"):
        inside_roots(root / ".." / made["outside"].parent.name / "elsewhere", [root])
    with pytest.raises(AdapterInvalid, match="outside the adapter roots"):
        inside_roots(made["symlink_escape"], [root])
    with pytest.raises(AdapterInvalid, match="does not exist"):
        inside_roots(root / "nope", [root])


def test_a_symlinked_file_escaping_the_root_is_caught(tmp_path, base_shapes, broken):
    _, made = broken
    adapter = write_adapter(tmp_path / "root" / "sneaky", base_shapes)
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.safetensors").symlink_to(
        made["outside"] / "adapter_model.safetensors"
    )
    with pytest.raises(AdapterInvalid, match="links outside"):
        inside_roots(adapter, [tmp_path / "root"])


@pytest.mark.parametrize("name", ["", "a b", "../x", "x@y", "-lead", "x" * 65, "é"])
def test_bad_names(name):
    with pytest.raises(AdapterInvalid):
        check_name(name)
