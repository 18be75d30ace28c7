"""Tool calling with the OpenAI SDK: the model asks for a function, we run it, it answers.

The default model gets loraswap's tool-aware chat template and vLLM's `hermes` parser, so
`tools` work out of the box. With `tool_choice` "required" or a named function the arguments
are constrained to the function's JSON schema; with "auto" (the default) a 135M model often
answers in plain text instead of calling.

Run with the server up (`make serve`): `.venv/bin/python examples/tools.py`
"""

import json
import os

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("LORASWAP_URL", "http://localhost:3000") + "/v1",
    api_key=os.environ.get("LORASWAP_API_KEY", "unused"),
)
MODEL = "smollm2-135m-instruct"
tools = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    }
]


def get_weather(city: str, unit: str = "celsius") -> str:
    return json.dumps({"city": city, "temperature": 18, "unit": unit, "sky": "sunny"})


messages = [{"role": "user", "content": "What is the weather in Paris?"}]
reply = client.chat.completions.create(
    model=MODEL, messages=messages, tools=tools, tool_choice="required", max_tokens=64
)
message = reply.choices[0].message
messages.append(message.model_dump(exclude_none=True))
for call in message.tool_calls:
    arguments = json.loads(call.function.arguments)
    print(f"call: {call.function.name}({arguments})")
    result = get_weather(**arguments)
    messages.append({"role": "tool", "tool_call_id": call.id, "content": result})

final = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=48)
print("answer:", final.choices[0].message.content)

# A named function, streamed: the arguments arrive in pieces.
stream = client.chat.completions.create(
    model=MODEL,
    messages=[{"role": "user", "content": "Weather in Oslo, in fahrenheit?"}],
    tools=tools,
    tool_choice={"type": "function", "function": {"name": "get_weather"}},
    max_tokens=64,
    stream=True,
)
arguments = ""
for chunk in stream:
    for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
        arguments += call.function.arguments or ""
print("streamed call arguments:", json.loads(arguments))
