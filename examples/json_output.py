"""Structured output: answers that are valid JSON for a schema (vLLM's structured outputs).

Two ways with the OpenAI SDK: a `response_format` JSON schema, and the SDK's `parse` helper
with a pydantic model. The shipped `json` adapter is trained to answer in JSON; the schema
constraint makes the shape exact for any model.

Run with the server up (`make serve`): `.venv/bin/python examples/json_output.py`
"""

import json
import os

from openai import OpenAI
from pydantic import BaseModel

client = OpenAI(
    base_url=os.environ.get("LORASWAP_URL", "http://localhost:3000") + "/v1",
    api_key=os.environ.get("LORASWAP_API_KEY", "unused"),
)
schema = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
reply = client.chat.completions.create(
    model="smollm2-135m-instruct",
    messages=[{"role": "user", "content": "Describe a person as JSON with name and age."}],
    response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    max_tokens=64,
    temperature=0,
)
print("json_schema:", json.loads(reply.choices[0].message.content))


class City(BaseModel):
    name: str
    country: str


parsed = client.chat.completions.parse(
    model="json",  # the shipped adapter that answers in JSON
    messages=[{"role": "user", "content": "Name a large city and its country."}],
    response_format=City,
    max_tokens=64,
    temperature=0,
)
print("parse:", parsed.choices[0].message.parsed)
