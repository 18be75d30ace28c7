"""Adapter sources and registry persistence, without the engine."""

from __future__ import annotations

import os

import pytest

from loraswap.adapters.catalog import AdapterRecord, AliasRecord, CatalogState, CatalogStore
from loraswap.adapters.sources import materialize
from loraswap.adapters.validation import AdapterInvalid
from tests.adapter_factory import write_adapter


def test_hub_source_goes_through_snapshot_download(tmp_path, base_shapes, monkeypatch):
    """Real up to the download call; the stand-in answers from disk (no hub here)."""
    import huggingface_hub

    source = write_adapter(tmp_path / "src", base_shapes)
    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        for file in source.iterdir():
            os.link(file, os.path.join(kwargs["local_dir"], file.name))
        return kwargs["local_dir"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    cache = tmp_path / "cache"
    got = materialize("hf://acme/lora-x@v2", name="x", version="v1", roots=[], cache_dir=cache)
    assert got.kind == "hf" and got.path.parent == cache / "x"
    assert got.path.name.startswith("v1-"), "cached by name, version and source"
    assert (got.path / "adapter_model.safetensors").is_file()
    assert calls[0]["repo_id"] == "acme/lora-x" and calls[0]["revision"] == "v2"
    assert "adapter_config.json" in calls[0]["allow_patterns"]
    materialize("hf://acme/lora-x@v2", name="x", version="v1", roots=[], cache_dir=cache)
    assert len(calls) == 1, "a cached download is reused"


def test_failed_download_leaves_nothing_behind(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(**kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(AdapterInvalid, match="cannot fetch adapter"):
        materialize("hf://acme/x", name="x", version="v1", roots=[], cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def sample_state(revision: int) -> CatalogState:
    record = AdapterRecord(name="a", alias=AliasRecord(version="v1"))
    return CatalogState(revision=revision, adapters={"a": record})


def test_local_store_round_trip_and_atomic_write(tmp_path, monkeypatch):
    store = CatalogStore(str(tmp_path / "state" / "registry.json"))
    assert store.load().revision == 0
    store.save(sample_state(1))
    assert store.load() == sample_state(1)

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.save(sample_state(2))
    monkeypatch.undo()
    assert store.load() == sample_state(1), "a failed write keeps the previous state"
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["registry.json"]


def test_s3_store_round_trip(s3):
    store = CatalogStore(f"s3://{s3['bucket']}/unit/registry.json", s3["options"])
    assert store.load().revision == 0
    store.save(sample_state(3))
    assert store.load() == sample_state(3)
