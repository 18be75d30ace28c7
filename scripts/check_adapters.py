"""Check that the demo adapters in ``adapters/`` show their behaviour on held-out prompts.

Greedy generation (no sampling, ``max_new_tokens`` 40) with transformers, once per dtype: the base
model alone, then with each adapter. Passes when, on every held-out prompt,

- ``uppercase``: the answer has letters and is fully upper case;
- ``json``: the answer parses with ``json.loads`` into a dict;
- base model: neither holds.

In bfloat16 the adapter weights are cast to bfloat16 too, as vLLM serves them. Prints a table and
exits non-zero if any check fails.

    python scripts/check_adapters.py [--base-model PATH] [--dtype float32|bfloat16|both]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_adapter_data import HELD_OUT_PROMPTS  # prompts that are never in the data

ROOT = Path(__file__).resolve().parent.parent
ADAPTER_DIR = ROOT / "adapters"
BASE_MODEL_TAG = "smollm2-135m-instruct:latest"
ADAPTERS = ["uppercase", "json"]
MAX_NEW_TOKENS = 40


def is_uppercase(text: str) -> bool:
    return any(c.isalpha() for c in text) and text == text.upper()


def is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def default_base_model() -> str:
    import bentoml

    return bentoml.models.get(BASE_MODEL_TAG).path


def training_prompts() -> set[str]:
    prompts = set()
    for path in (ADAPTER_DIR / "data").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            if line.strip():
                prompts.add(json.loads(line)["messages"][0]["content"])
    return prompts


@torch.inference_mode()
def generate(model, tokenizer, prompt: str) -> str:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    out = model.generate(
        **ids,
        do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def run(base_model: str, dtype: torch.dtype) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Answers per prompt per variant (``base`` and each adapter) and the failed checks."""
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype)
    model.generation_config.temperature = None  # greedy; silence sampling-parameter warnings
    model.generation_config.top_p = None
    model.generation_config.top_k = None
    model = PeftModel.from_pretrained(
        model,
        ADAPTER_DIR / ADAPTERS[0],
        adapter_name=ADAPTERS[0],
        autocast_adapter_dtype=False,
    )
    for name in ADAPTERS[1:]:
        model.load_adapter(ADAPTER_DIR / name, adapter_name=name, autocast_adapter_dtype=False)
    model.to(dtype).eval()

    answers: dict[str, dict[str, str]] = {prompt: {} for prompt in HELD_OUT_PROMPTS}
    with model.disable_adapter():
        for prompt in HELD_OUT_PROMPTS:
            answers[prompt]["base"] = generate(model, tokenizer, prompt)
    for name in ADAPTERS:
        model.set_adapter(name)
        for prompt in HELD_OUT_PROMPTS:
            answers[prompt][name] = generate(model, tokenizer, prompt)

    failures = []
    label = str(dtype).removeprefix("torch.")
    for prompt, row in answers.items():
        if not is_uppercase(row["uppercase"]):
            failures.append(f"{label} uppercase not upper case: {prompt!r} -> {row['uppercase']!r}")
        if not is_json_object(row["json"]):
            failures.append(f"{label} json not a JSON object: {prompt!r} -> {row['json']!r}")
        if is_uppercase(row["base"]) or is_json_object(row["base"]):
            failures.append(f"{label} base already shows a behaviour: {prompt!r}")
    return answers, failures


def print_table(label: str, answers: dict[str, dict[str, str]]) -> None:
    print(f"\n## {label}\n")
    print("| prompt | base | uppercase | json |")
    print("|---|---|---|---|")
    for prompt, row in answers.items():
        cells = [row[k].replace("\n", " ").replace("|", "\\|") for k in ("base", *ADAPTERS)]
        print(f"| {prompt} | " + " | ".join(cells) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-model", help="HF model directory (default: the BentoML store)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "both"], default="both")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    leaked = set(HELD_OUT_PROMPTS) & training_prompts()
    failures = [f"held-out prompt in the training data: {p!r}" for p in sorted(leaked)]
    base_model = args.base_model or default_base_model()
    dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
    for name in dtypes:
        answers, failed = run(base_model, getattr(torch, name))
        print_table(name, answers)
        failures += failed

    print()
    for failure in failures:
        print(f"FAIL {failure}")
    print("FAILED" if failures else "OK: every behaviour holds on every held-out prompt")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
