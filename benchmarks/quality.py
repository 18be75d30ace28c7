"""What a change of weights (quantization) costs in quality, measured through the server.

Two figures per served model: perplexity on a fixed English passage (vLLM's ``prompt_logprobs``
on ``/v1/completions``) and the greedy answers to a fixed set of chat prompts, compared
exactly against the bf16 model's answers by the report.
"""

from __future__ import annotations

import math

import httpx

PASSAGE = (
    "The river starts high in the mountains, where snow melts in the spring and runs down "
    "through narrow valleys. Farmers along its banks have used the water for centuries to grow "
    "wheat, barley and vegetables. In the summer the river is slow and warm, and children swim "
    "in the shallow pools near the old stone bridge. In the autumn heavy rain can make it rise "
    "quickly, and the town keeps sandbags ready near the market square. A small museum beside "
    "the bridge tells the story of the great flood of the last century, when the water reached "
    "the windows of the church. Today engineers measure the level of the river every hour, and "
    "the data is shared with the villages downstream so that everyone has time to prepare. "
    "Walkers follow a path along the river from the bridge to the lake, a journey of about "
    "three hours, and many stop at the mill to buy bread and honey."
)
PROMPTS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "What is 12 plus 7?",
    "Write one sentence about the sea.",
    "Which animal says moo?",
    "What do bees make?",
    "Give me a synonym for happy.",
    "How many days are in a week?",
    "What is the opposite of cold?",
    "Name a planet in our solar system.",
    "What language is spoken in Spain?",
    "Finish the sentence: The early bird",
    "What is water made of?",
    "Name a fruit that is yellow.",
    "What is the largest ocean?",
    "Say hello in French.",
]


def measure(url: str, model: str, max_tokens: int = 32) -> dict:
    with httpx.Client(base_url=url, timeout=300) as client:
        body = {
            "model": model,
            "prompt": PASSAGE,
            "max_tokens": 1,
            "prompt_logprobs": 0,
            "temperature": 0,
        }
        response = client.post("/v1/completions", json=body)
        response.raise_for_status()
        entries = response.json()["choices"][0]["prompt_logprobs"][1:]  # first token has none
        logprobs = [_own(entry) for entry in entries]
        answers = []
        for prompt in PROMPTS:
            chat = {
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
            reply = client.post("/v1/chat/completions", json=chat)
            reply.raise_for_status()
            answers.append(reply.json()["choices"][0]["message"]["content"])
    return {
        "perplexity": math.exp(-sum(logprobs) / len(logprobs)),
        "passage_tokens": len(logprobs) + 1,
        "answers": answers,
    }


def _own(entry: dict) -> float:
    """The prompt token's own logprob (with ``prompt_logprobs: 0`` it is the only entry)."""
    return next(iter(entry.values()))["logprob"]
