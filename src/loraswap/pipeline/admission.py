"""Admission: the checks every inference request passes before it reaches vLLM, and what it
holds until it finishes.

:meth:`AdmissionControl.admit` applies the input checks and limits, resolves ``model`` (alias,
canary, ``name@version``) to the adapter version that serves it, checks the tenant may use it,
takes an adapter slot, loads the adapter just in time and rewrites ``model`` so vLLM serves
exactly that version. :meth:`AdmissionControl.finish` gives back the slot and the tenant's
in-flight count and queues the request's shadow, if it has one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..adapters.keys import AdapterKey
from ..config import Settings
from ..engine_runs import CAPTURE
from ..errors import ApiError
from ..routes import INFERENCE_ROUTES
from ..shadows.runner import ShadowJob, shadow_job
from ..tenants import Principal, current
from .inputs import check_input, check_token_limits

if TYPE_CHECKING:
    from ..adapters.resolver import AdapterResolver
    from ..shadows.runner import ShadowRunner
    from ..tenants import Tenancy


@dataclass
class Admission:
    """An admitted request: the name vLLM serves it under and the adapter version, if any."""

    model: Any
    key: AdapterKey | None = None
    principal: Principal | None = field(default=None, repr=False)
    limited: bool = False  # counted by the tenant limiter: release it at finish
    shadow: ShadowJob | None = field(default=None, repr=False)  # queued once this one answered


class AdmissionControl:
    """Who may run what, and the adapter slot and tenant limit each admitted request holds.

    ``registry`` is None with adapters off; ``shadows`` is set once the runner (which needs the
    pipeline) is built, and stays None with adapters off.
    """

    def __init__(
        self,
        settings: Settings,
        registry: AdapterResolver | None = None,
        tenancy: Tenancy | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.tenancy = tenancy
        self.shadows: ShadowRunner | None = None

    def check_access(self, principal: Principal, model: Any, key: AdapterKey | None) -> None:
        """A tenant uses only its adapters (and the base model if allowed); anything else is
        the same 404 as a model that does not exist, so nothing leaks."""
        if principal.tenant is None:
            return
        if key is not None:
            allowed = principal.may_use_adapter(key.name)
        else:
            allowed = model in (None, self.settings.served_model_name) and principal.may_use_base()
        if not allowed:
            raise ApiError(404, f"The model `{model}` does not exist.", param="model")

    def check_batch_budget(self, principal: Principal) -> None:
        tenant = principal.tenant
        cap = tenant.limits.batch_tokens_per_day if tenant is not None else None
        if cap is None or self.tenancy is None:
            return
        used = self.tenancy.usage.batch_tokens_today(tenant.name)
        if used >= cap:
            raise ApiError(
                429, f"tenant {tenant.name!r} used its {cap} batch tokens for today (UTC)",
                headers={"retry-after": "3600"},
            )  # fmt: skip

    async def admit(self, path: str, body: dict[str, Any], background: bool = False) -> Admission:
        """Check ``body`` for ``path``: limits, who may use its ``model``, the tenant's limits;
        resolve and load its adapter, rewrite its ``model``. Every admission is finished."""
        route = INFERENCE_ROUTES[path]
        check_input(route, body)
        check_token_limits(self.settings, route, body)
        principal = current()
        model = body.get("model")
        key = None
        if self.registry is not None and isinstance(model, str):
            key = self.registry.resolve(model)
        self.check_access(principal, model, key)
        if background:
            self.check_batch_budget(principal)
        shadow = None
        if key is not None:
            if not background:
                shadow = self.shadow_of(route.path, body, model, key, principal)
            try:
                await self.registry.slots.acquire(key, background)
            except ApiError:
                self.registry.record_request(key, ok=False)
                raise
        try:
            if key is not None:
                try:
                    await self.registry.ensure_loaded(key)
                except ApiError:
                    self.registry.record_request(key, ok=False)
                    raise
                body["model"] = model = str(key)
            limited = False
            if not background and self.tenancy is not None:
                limited = await self.tenancy.limiter.acquire(principal)
        except BaseException:
            if key is not None:
                self.registry.slots.release(key)
            raise
        if shadow is not None:
            CAPTURE.set(shadow.primary_run)  # the engine fills in the primary's answer
        if not background and self.shadows is not None:
            self.shadows.yield_to_client()  # shadows use idle capacity only
        return Admission(model, key, principal, limited, shadow)

    def shadow_of(
        self, path: str, body: dict[str, Any], model: str, key: AdapterKey, principal: Principal
    ) -> ShadowJob | None:
        """The shadow job of a request to an alias with a shadow version (sampled)."""
        if self.shadows is None:
            return None
        shadow_key = self.registry.shadow_of(model)
        if shadow_key is None:
            return None
        return shadow_job(path, body, key, shadow_key, principal)

    def finish(self, admission: Admission, ok: bool) -> None:
        """Give back what :meth:`admit` took; queue the shadow of a request that succeeded."""
        if admission.shadow is not None and ok and self.shadows is not None:
            self.shadows.submit(admission.shadow)
        if admission.key is not None and self.registry is not None:
            self.registry.slots.release(admission.key)
            self.registry.record_request(admission.key, ok)
        if admission.limited and self.tenancy is not None:
            self.tenancy.limiter.release_soon(admission.principal)  # in a task if it must wait
