"""Load test against a local loraswap (loopback only): `locust -H http://127.0.0.1:3000`.

Grows into the full traffic mix with the benchmark work; today one chat user.
"""

from __future__ import annotations

from locust import HttpUser, between, task

BASE_MODEL = "smollm2-135m-instruct"


class ChatUser(HttpUser):
    wait_time = between(0.5, 2)

    @task
    def chat(self) -> None:
        self.client.post(
            "/v1/chat/completions",
            json={
                "model": BASE_MODEL,
                "messages": [{"role": "user", "content": "Give me one fun fact about owls."}],
                "max_tokens": 64,
            },
            name="chat",
        )
