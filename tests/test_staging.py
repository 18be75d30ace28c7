"""Loading an adapter into the engine's host memory without taking a slot (the worker extension
loraswap's engine runs with): what it asks of vLLM's LoRA managers, and that the engine is
started with it."""

from __future__ import annotations

from types import SimpleNamespace

from vllm.lora.request import LoRARequest

from loraswap.vllm_plugin.staging import QUALNAME, AdapterStaging, rpc_args


class Models(dict):
    """vLLM's LRUCacheLoRAModelManager as staging uses it: registered adapters, a capacity."""

    capacity = 2

    def __init__(self) -> None:
        super().__init__()
        self._registered_adapters = self
        self.activated: list[int] = []

    def add_adapter(self, lora) -> bool:
        self[lora.id] = lora
        return True

    def remove_oldest_adapter(self) -> bool:
        del self[next(iter(self))]
        return True

    def activate_adapter(self, lora_id: int) -> bool:
        self.activated.append(lora_id)
        return True


def worker() -> tuple[AdapterStaging, Models, list[int]]:
    models, reads = Models(), []

    def load(request):
        assert isinstance(request, LoRARequest)  # rebuilt from the fields sent
        reads.append(request.lora_int_id)
        return SimpleNamespace(id=request.lora_int_id)

    staging = AdapterStaging()
    staging.model_runner = SimpleNamespace(
        lora_manager=SimpleNamespace(_adapter_manager=models, _load_adapter=load)
    )
    return staging, models, reads


def test_stage_reads_an_adapter_once_and_never_takes_a_slot():
    staging, models, reads = worker()
    for lora_id in (1, 1, 2, 3):
        request = LoRARequest(f"a{lora_id}", lora_id, f"/adapters/a{lora_id}")
        assert staging.loraswap_stage_adapter(*rpc_args(request))
    assert reads == [1, 2, 3]
    assert list(models) == [2, 3]  # vLLM's host cache capacity: the oldest left
    assert models.activated == []


def test_the_engine_runs_with_the_staging_extension(tmp_path):
    from loraswap.config import Settings
    from loraswap.engine import parse_engine_args

    model = tmp_path / "model"
    model.mkdir()
    args = parse_engine_args(Settings(max_loras=4, max_cpu_loras=8), str(model))
    assert args.worker_extension_cls == QUALNAME
    own = Settings(max_loras=4, max_cpu_loras=8, vllm_args="--worker-extension-cls my.Ext")
    assert parse_engine_args(own, str(model)).worker_extension_cls == "my.Ext"
    own = Settings(max_loras=4, max_cpu_loras=8, vllm_args="--worker-extension-cls=my.Ext")
    assert parse_engine_args(own, str(model)).worker_extension_cls == "my.Ext"
    assert not parse_engine_args(Settings(enable_lora=False), str(model)).worker_extension_cls
