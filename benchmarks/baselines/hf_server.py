"""The hand-rolled baseline: what users write first (FastAPI + transformers ``generate`` + peft).

One model in memory, adapters attached with peft, one ``generate`` at a time under a lock
(transformers' ``generate`` is not safe to run concurrently on one model), tokens streamed with
a token streamer. It speaks just enough of ``/v1/completions`` for ``vllm bench serve``.
Bench-only: not part of loraswap.

    python benchmarks/baselines/hf_server.py --model DIR --adapter name=DIR ... --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import threading
import time
import uuid

import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer


class TokenStreamer(BaseStreamer):
    """One text piece per generated token (TextIteratorStreamer waits for word boundaries,
    which random-token benchmark text may never have)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.queue, self.prompt_seen = tokenizer, queue.Queue(), False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        self.queue.put(self.tokenizer.decode(value.reshape(-1), skip_special_tokens=True))

    def end(self) -> None:
        self.queue.put(None)

    def __iter__(self):
        while (piece := self.queue.get()) is not None:
            yield piece


class CompletionRequest(BaseModel):
    model: str
    prompt: str
    max_tokens: int = 16
    temperature: float = 0.0
    stream: bool = False
    ignore_eos: bool = False


def build_app(model_dir: str, adapters: dict[str, str], served_name: str, dtype: str) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    if adapters:
        from peft import PeftModel

        (first, path), *rest = adapters.items()
        model = PeftModel.from_pretrained(model, path, adapter_name=first)
        for name, path in rest:
            model.load_adapter(path, adapter_name=name)
    model.eval()
    lock = threading.Lock()
    app = FastAPI()

    def generate(req: CompletionRequest, streamer: TokenStreamer) -> None:
        inputs = tokenizer(req.prompt, return_tensors="pt")
        kwargs = dict(max_new_tokens=req.max_tokens, streamer=streamer, do_sample=False)
        if req.ignore_eos:
            kwargs["min_new_tokens"] = req.max_tokens
        with lock, torch.inference_mode():
            if adapters and req.model in adapters:
                model.set_adapter(req.model)
                model.generate(**inputs, **kwargs)
            elif adapters:
                with model.disable_adapter():
                    model.generate(**inputs, **kwargs)
            else:
                model.generate(**inputs, **kwargs)

    @app.get("/health")
    def health() -> dict:
        return {"ok": True}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        if req.model != served_name and req.model not in adapters:
            raise HTTPException(404, f"unknown model {req.model}")
        streamer = TokenStreamer(tokenizer)
        thread = threading.Thread(target=generate, args=(req, streamer), daemon=True)
        thread.start()
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        async def pieces():
            it = iter(streamer)
            while (piece := await asyncio.to_thread(next, it, None)) is not None:
                yield piece

        def chunk(**body) -> str:
            return "data: " + json.dumps({"id": rid, "created": created, **body}) + "\n\n"

        if not req.stream:
            text = "".join([p async for p in pieces()])
            return {"id": rid, "object": "text_completion", "choices": [{"text": text}]}

        async def events():
            async for piece in pieces():
                yield chunk(object="text_completion", choices=[{"index": 0, "text": piece}])
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--adapter", action="append", default=[], help="name=dir")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    adapters = dict(a.split("=", 1) for a in args.adapter)
    app = build_app(args.model, adapters, args.served_model_name, args.dtype)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
