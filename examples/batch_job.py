"""An OpenAI Batch API job with the SDK: upload a JSONL file, start the job, wait, read results.

Lines may name different models (base and adapters); the job runs beside interactive traffic
and survives a server restart. Run with the server up (`make serve`):
`.venv/bin/python examples/batch_job.py`
"""

import io
import json
import os
import time

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("LORASWAP_URL", "http://localhost:3000") + "/v1",
    api_key=os.environ.get("LORASWAP_API_KEY", "unused"),
)
questions = ["What is the capital of France?", "Name a fruit.", "What is 2 + 2?"]
lines = [
    {
        "custom_id": f"q{i}-{model}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 24,
            "temperature": 0,
        },
    }
    for i, question in enumerate(questions)
    for model in ("smollm2-135m-instruct", "uppercase")
]
jsonl = "".join(json.dumps(line) + "\n" for line in lines).encode()
batch_file = client.files.create(file=("requests.jsonl", io.BytesIO(jsonl)), purpose="batch")
job = client.batches.create(
    input_file_id=batch_file.id, endpoint="/v1/chat/completions", completion_window="24h"
)
while job.status not in ("completed", "failed", "cancelled", "expired"):
    time.sleep(1)
    job = client.batches.retrieve(job.id)
print(f"job {job.id}: {job.status}, {job.request_counts.completed}/{job.request_counts.total} done")
if job.status != "completed":
    raise SystemExit(f"the job did not complete: {job.errors}")

for line in client.files.content(job.output_file_id).text.splitlines():
    result = json.loads(line)
    body = result["response"]["body"]
    print(f"{result['custom_id']} [{body['model']}]: {body['choices'][0]['message']['content']!r}")

client.files.delete(batch_file.id)
client.files.delete(job.output_file_id)
