"""Chat with the base model and an adapter through the official OpenAI SDK, plain and streamed.

Run with the server up (`make serve`): `.venv/bin/python examples/chat.py`
"""

import os

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("LORASWAP_URL", "http://localhost:3000") + "/v1",
    api_key=os.environ.get("LORASWAP_API_KEY", "unused"),
)

for model in ("smollm2-135m-instruct", "uppercase"):  # the base model, then a shipped adapter
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=32,
        temperature=0,
    )
    print(f"{reply.model}: {reply.choices[0].message.content}")

print("streamed: ", end="")
stream = client.chat.completions.create(
    model="smollm2-135m-instruct",
    messages=[{"role": "user", "content": "Tell me a two-sentence story."}],
    max_tokens=64,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
    elif chunk.usage:
        print(f"\n({chunk.usage.completion_tokens} tokens)")
