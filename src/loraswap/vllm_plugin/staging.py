"""Loading an adapter into the engine's host memory without taking a slot.

vLLM's ``add_lora`` reads an adapter and also activates it: it takes one of the engine's
``max_loras`` slots at once, evicting the least recently used adapter there (possibly one a
running request needs again at its next step). loraswap loads through :meth:`AdapterStaging.
loraswap_stage_adapter` instead, a method vLLM's ``--worker-extension-cls`` adds to its workers
and ``collective_rpc`` calls: the adapter is read, checked and kept in the host tier, and takes a
slot only in the step that first schedules one of its requests. That is what lets a request that
waits for a slot have its adapter loaded meanwhile (prefetch from the queue), without disturbing
the adapters in the slots.
"""

from __future__ import annotations

from typing import Any

QUALNAME = f"{__name__}.AdapterStaging"
METHOD = "loraswap_stage_adapter"
# The LoRARequest fields sent: collective_rpc's arguments reach the worker untyped (a msgspec
# struct arrives as a list), so the request travels as a dict and is rebuilt there.
FIELDS = ("lora_name", "lora_int_id", "lora_path", "base_model_name")


def rpc_args(lora_request: Any) -> tuple[dict[str, Any]]:
    return ({name: getattr(lora_request, name) for name in FIELDS},)


class AdapterStaging:
    """Mixed into vLLM's worker class by ``--worker-extension-cls``."""

    def loraswap_stage_adapter(self, fields: dict[str, Any]) -> bool:
        """vLLM's ``LRUCacheWorkerLoRAManager.add_adapter`` for an adapter not loaded yet, without
        its activation: True when the adapter is in host memory."""
        from vllm.lora.request import LoRARequest

        lora_request = LoRARequest(**{name: fields[name] for name in FIELDS if name in fields})
        worker_manager = self.model_runner.lora_manager  # type: ignore[attr-defined]
        models = worker_manager._adapter_manager
        if lora_request.lora_int_id in models._registered_adapters:
            return True
        lora = worker_manager._load_adapter(lora_request)
        if len(models) + 1 > models.capacity:
            models.remove_oldest_adapter()
        return bool(models.add_adapter(lora))
