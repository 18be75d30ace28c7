"""Adapters at run time: register two versions, alias, canary, call them by `model`, clean up.

The management API is plain HTTP (`/admin/adapters`, admin key when keys are configured); the
`loraswap adapters ...` CLI wraps the same calls. Requests pick an adapter with the OpenAI
`model` field: `name` (its alias, or its canary at the canary's weight) or `name@version`.

Run with the server up (`make serve`): `.venv/bin/python examples/adapters.py`
"""

import collections
import os

import httpx
from openai import OpenAI

URL = os.environ.get("LORASWAP_URL", "http://localhost:3000")
KEY = os.environ.get("LORASWAP_ADMIN_API_KEY") or os.environ.get("LORASWAP_API_KEY", "unused")
admin = httpx.Client(base_url=URL, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
client = OpenAI(base_url=f"{URL}/v1", api_key=KEY)
NAME = "example-persona"


def check(response: httpx.Response) -> dict:
    response.raise_for_status()
    return response.json()


def ask(model: str) -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=16
    )
    return reply.model


# Two versions from directories inside the adapter roots (`adapters/` by default); each register
# validates the PEFT files against the base model first, and points the alias at the new version.
check(admin.post("/admin/adapters", json={"name": NAME, "source": "adapters/uppercase"}))
check(admin.post("/admin/adapters", json={"name": NAME, "source": "adapters/json"}))
print(
    "registered:", [v["version"] for v in check(admin.get(f"/admin/adapters/{NAME}"))["versions"]]
)
print(f"{NAME} ->", ask(NAME), f"| {NAME}@v1 ->", ask(f"{NAME}@v1"))

# Roll back to v1 and send half of the alias's traffic to v2 as a canary.
alias = {"version": "v1", "canary_version": "v2", "canary_weight": 0.5}
check(admin.put(f"/admin/adapters/{NAME}/alias", json=alias))
served = collections.Counter(ask(NAME) for _ in range(12))
print("with a 50 % canary:", dict(served))

listed = [m.id for m in client.models.list().data]
print("in /v1/models:", [m for m in listed if m.startswith(NAME)])

check(admin.delete(f"/admin/adapters/{NAME}"))  # leave the server as we found it
print("deleted", NAME)
