"""Each request of a mixed batch gets exactly its solo output, after every engine slot was used.

Here on an fp32 server; test_adapters.py runs the same check on the default server (dtype
`auto`: bf16 where the CPU has native bf16), where loraswap's LoRA ops compute every row in the
model's dtype whatever the batch holds. Without loraswap's LoRA index fix
(LORASWAP_PATCH_LORA_OPS=0) this test fails: base requests come back with an adapter's output.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import httpx
import pytest
from openai import AsyncOpenAI

from tests.conftest import BASE_MODEL, SHIPPED, server_env
from tests.server import Server

PROMPTS = ["Name a fruit.", "What is 2 plus 2?", "Say hello.", "Name a colour."]


def register_copies(url: str, root: Path, prefix: str) -> list[str]:
    """Six distinct adapters (copies of the shipped two): more than max_loras=4 slots."""
    names = []
    for i in range(3):
        for kind in ("uppercase", "json"):
            name = f"{prefix}-{kind}-{i}"
            path = shutil.copytree(SHIPPED / kind, root / name, dirs_exist_ok=True)
            resp = httpx.post(f"{url}/admin/adapters", json={"name": name, "source": str(path)},
                              timeout=120)  # fmt: skip
            assert resp.status_code == 201, resp.text
            names.append(name)
    return names


def mixed_jobs(adapters: list[str]) -> list[tuple[str, str]]:
    """Every adapter with every prompt, and the base model with each prompt twice."""
    base = [(BASE_MODEL, p) for p in PROMPTS] * 2
    return base + [(a, p) for a in adapters for p in PROMPTS]


async def _gather(url: str, jobs: list[tuple[str, str]]) -> list[str]:
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)
    replies = await asyncio.gather(
        *(
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}],
                temperature=0, max_tokens=24,
            )
            for model, prompt in jobs
        )
    )  # fmt: skip
    await client.close()
    return [r.choices[0].message.content for r in replies]


def run_together(url: str, jobs: list[tuple[str, str]]) -> list[str]:
    return asyncio.run(_gather(url, jobs))


@pytest.fixture(scope="module")
def fp32_server(tmp_path_factory, adapter_root, s3):
    state = tmp_path_factory.mktemp("fp32")
    env = server_env(adapter_root, state, s3, LORASWAP_DTYPE="float32", LORASWAP_MAX_LORAS="4")
    srv = Server(state / "serve.log", env=env).start()
    yield srv
    assert not srv.stop(), "processes left after SIGTERM"


def mixed_vs_solo(url: str, adapter_root: Path, prefix: str) -> tuple[list, int]:
    """Greedy outputs of base and adapter requests alone, then in mixed batches (twice), after
    more distinct adapters than slots were used: the (job, mixed, solo) triples that differ."""
    jobs = mixed_jobs(register_copies(url, adapter_root, prefix=prefix))
    solo = {job: run_together(url, [job])[0] for job in dict.fromkeys(jobs)}  # one at a time
    wrong = []
    for _ in range(2):
        got = run_together(url, jobs)
        wrong += [(job, out, solo[job]) for job, out in zip(jobs, got, strict=True)
                  if out != solo[job]]  # fmt: skip
    return wrong, 2 * len(jobs)


def test_mixed_batch_matches_solo_outputs_after_all_slots_were_used(fp32_server, adapter_root):
    wrong, total = mixed_vs_solo(fp32_server.url, adapter_root, prefix="iso")
    assert not wrong, f"{len(wrong)} of {total} differ from solo: {wrong[:3]}"
