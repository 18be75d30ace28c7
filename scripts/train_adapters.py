"""Train the demo PEFT LoRA adapters in ``adapters/`` on the datasets in ``adapters/data/``.

One adapter per ``adapters/data/<name>.jsonl`` (see scripts/make_adapter_data.py), saved in PEFT
format to ``adapters/<name>/`` (``adapter_config.json`` + ``adapter_model.safetensors``) with a
short README. Plain torch loop in float32 on CPU: the prompt is rendered with the tokenizer's chat
template exactly as vLLM's chat endpoint renders it, and the loss covers only the assistant tokens
(the answer and the closing ``<|im_end|>``).

    python scripts/train_adapters.py [--base-model PATH] [--only NAME] [--epochs N] [--lr LR]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "adapters" / "data"
ADAPTER_DIR = ROOT / "adapters"
BASE_MODEL_TAG = "smollm2-135m-instruct:latest"
BASE_MODEL_NAME = "smollm2-135m-instruct"
SEED = 0
IGNORE = -100

LORA = {
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "bias": "none",
    "task_type": "CAUSAL_LM",
}

# Per-adapter defaults for --epochs/--lr: upper case is the harder behaviour (upper-case text
# tokenises into rare, short tokens), so it gets a higher learning rate and one more epoch.
RECIPES = {
    "uppercase": {"epochs": 5, "lr": 2e-3},
    "json": {"epochs": 4, "lr": 1e-3},
}

DESCRIPTIONS = {
    "uppercase": "answers every prompt in UPPER CASE (a short sentence, fully upper case)",
    "json": 'answers every prompt with exactly one compact JSON object: {"answer": "..."}',
}


def default_base_model() -> str:
    import bentoml

    return bentoml.models.get(BASE_MODEL_TAG).path


def encode(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids for one conversation and its labels (``IGNORE`` everywhere but the answer)."""
    prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
    answer = messages[1]["content"] + tokenizer.eos_token
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids


def load_examples(tokenizer, path: Path) -> list[tuple[list[int], list[int]]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [encode(tokenizer, row["messages"]) for row in rows]


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    input_ids, labels, mask = [], [], []
    for ids, labs in batch:
        pad = width - len(ids)
        input_ids.append(ids + [pad_id] * pad)
        labels.append(labs + [IGNORE] * pad)
        mask.append([1] * len(ids) + [0] * pad)
    return {
        "input_ids": torch.tensor(input_ids),
        "labels": torch.tensor(labels),
        "attention_mask": torch.tensor(mask),
    }


def train_one(name: str, base_model: str, args: argparse.Namespace) -> None:
    args = argparse.Namespace(**vars(args))  # a copy: defaults differ per adapter
    args.epochs = args.epochs or RECIPES[name]["epochs"]
    args.lr = args.lr or RECIPES[name]["lr"]
    random.seed(SEED)
    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    examples = load_examples(tokenizer, DATA_DIR / f"{name}.jsonl")
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(**LORA))
    model.print_trainable_parameters()

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    steps_per_epoch = -(-len(examples) // args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = max(1, total // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min((step + 1) / warmup, max(0.0, (total - step) / (total - warmup))),
    )
    rng = random.Random(SEED)
    model.train()
    started = time.perf_counter()
    step = 0
    for epoch in range(args.epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        losses = []
        for start in range(0, len(order), args.batch_size):
            chunk = [examples[i] for i in order[start : start + args.batch_size]]
            batch = collate(chunk, tokenizer.pad_token_id)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
        elapsed = time.perf_counter() - started
        mean = sum(losses) / len(losses)
        print(f"[{name}] epoch {epoch + 1}/{args.epochs} loss {mean:.4f} ({elapsed:.0f}s)")
    seconds = time.perf_counter() - started

    out = ADAPTER_DIR / name
    model.peft_config["default"].base_model_name_or_path = BASE_MODEL_NAME
    model.save_pretrained(out)
    (out / "README.md").write_text(readme(name, len(examples), args, mean))
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"[{name}] saved to {out} ({size / 1e6:.1f} MB) after {seconds:.0f}s of training")


def readme(name: str, examples: int, args: argparse.Namespace, final_loss: float) -> str:
    return (
        f"# {name}\n\n"
        f"Demo LoRA adapter for `{BASE_MODEL_NAME}`: the model {DESCRIPTIONS[name]}.\n\n"
        f"- Dataset: `adapters/data/{name}.jsonl`, {examples} single-turn chats generated by "
        "`scripts/make_adapter_data.py`.\n"
        f"- Training: `scripts/train_adapters.py --only {name}`; PEFT LoRA, rank {LORA['r']}, "
        f"alpha {LORA['lora_alpha']}, dropout 0, on {', '.join(LORA['target_modules'])}; float32 "
        f"on CPU, AdamW lr {args.lr}, batch {args.batch_size}, {args.epochs} epochs, loss on the "
        f"assistant tokens only (final epoch loss {final_loss:.3f}).\n"
        "- Check: `scripts/check_adapters.py` (greedy generation on held-out prompts, fp32 and "
        "bf16).\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-model", help="HF model directory (default: the BentoML store)")
    parser.add_argument("--only", choices=sorted(DESCRIPTIONS), help="train just this adapter")
    parser.add_argument("--epochs", type=int, help="default: per adapter, see RECIPES")
    parser.add_argument("--lr", type=float, help="default: per adapter, see RECIPES")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base_model = args.base_model or default_base_model()
    for name in [args.only] if args.only else sorted(DESCRIPTIONS):
        train_one(name, base_model, args)


if __name__ == "__main__":
    main()
