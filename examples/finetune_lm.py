#!/usr/bin/env python
"""Fine-tune a small causal language model privately: LoRA under transformers.Trainer, DP-SGD.

A tiny Llama-architecture model is built from a config (random weights, nothing downloaded) over
the characters of ``examples/data/public_domain.txt`` (public-domain texts shipped with the
repository). Only its LoRA adapters (``peft``) are trained, with ``DPTrainer``
(``opacus.integrations.transformers``): Poisson-sampled logical batches split into
``gradient_accumulation_steps`` micro-batches, per-example clipping (hooks or ghost), Gaussian
noise once per logical batch, epsilon logged with the loss. The Trainer's progress bar shows the
steps; every ``--log-every`` steps the loss and epsilon are printed.

Needs ``pip install "opacus[transformers]"``. About a minute on two CPU cores with the defaults;
``--quick`` runs a few steps (the test suite does).
"""

import argparse
import math
import os
import sys

import torch

try:
    import peft
    import transformers
except ImportError:
    sys.exit('finetune_lm.py needs transformers and peft: pip install "opacus[transformers]"')

from opacus.integrations.transformers import DPTrainer, PrivacyArguments

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TEXT = os.path.join(HERE, "data", "public_domain.txt")


class CharTokenizer:
    """Characters to ids (0 pads): the vocabulary is the text's own characters."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.index = {c: i + 1 for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str):
        return [self.index[c] for c in text if c in self.index]

    def decode(self, ids) -> str:
        return "".join(self.chars[i - 1] for i in ids if 0 < i <= len(self.chars))


def windows(ids, length: int, stride: int):
    """Overlapping windows of ``length`` tokens: the training examples."""
    return [{"input_ids": ids[s : s + length]} for s in range(0, len(ids) - length + 1, stride)]


def collate(features):
    ids = torch.tensor([f["input_ids"] for f in features])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def build_model(vocab_size: int, seq_len: int, hidden: int, layers: int):
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=seq_len,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config)


class PrintLossAndEpsilon(transformers.TrainerCallback):
    """Prints the logged loss and epsilon (the progress bar shows the steps)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            print(
                f"step {state.global_step:4d}  loss {logs['loss']:.4f}  "
                f"epsilon {logs['epsilon']:.3f} (delta {logs['delta']:g})",
                flush=True,
            )


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--text", default=DEFAULT_TEXT, help="training text (UTF-8)")
    p.add_argument("--seq-len", type=int, default=48)
    p.add_argument("--stride", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16, help="micro-batch size (expected)")
    p.add_argument("--accumulation", type=int, default=2, help="micro-batches per DP step")
    p.add_argument("--steps", type=int, default=60, help="DP steps (logical batches)")
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--sigma", type=float, default=0.8, help="noise multiplier")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="per-example clip bound")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--mode", choices=["hooks", "ghost"], default="hooks")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default=None, help="checkpoints (default: a temp folder)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quick", action="store_true", help="a few tiny steps (tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.hidden, args.layers, args.log_every = 4, 32, 1, 2
        args.batch_size, args.seq_len = 8, 32
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    transformers.set_seed(args.seed)
    text = open(args.text, encoding="utf8").read()
    tokenizer = CharTokenizer(text)
    data = windows(tokenizer.encode(text), args.seq_len, args.stride)
    model = build_model(tokenizer.vocab_size, args.seq_len, args.hidden, args.layers)
    lora = peft.LoraConfig(
        r=args.lora_rank,
        lora_alpha=2 * args.lora_rank,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["lm_head"],  # the output layer is small here: train it fully
    )
    model = peft.get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"{len(data)} training windows; trainable parameters {trainable} of {total}")

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        training_args = transformers.TrainingArguments(
            output_dir=args.output_dir or tmp,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.accumulation,
            max_steps=args.steps,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            max_grad_norm=0,  # DPTrainer clips per example; the Trainer must not clip the batch
            logging_steps=args.log_every,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=args.seed,
            disable_tqdm=args.no_progress,
        )
        privacy = PrivacyArguments(
            noise_multiplier=args.sigma,
            per_sample_max_grad_norm=args.max_grad_norm,
            target_delta=args.delta,
            grad_sample_mode=args.mode,
            accountant="prv",
        )
        trainer = DPTrainer(
            model=model,
            args=training_args,
            train_dataset=data,
            data_collator=collate,
            privacy_args=privacy,
            callbacks=[PrintLossAndEpsilon()],
        )
        result = trainer.train()
    epsilon = trainer.get_epsilon()
    model.eval()
    with torch.no_grad():
        prompt = torch.tensor([tokenizer.encode("We hold ")])
        for _ in range(24):
            logits = model(input_ids=prompt).logits[0, -1]
            prompt = torch.cat([prompt, logits.argmax().view(1, 1)], dim=1)
    print("sample:", repr(tokenizer.decode(prompt[0].tolist())))
    loss = result.training_loss
    print(
        f"RESULT: steps {result.global_step} loss {loss:.4f} epsilon {epsilon:.4f} "
        f"delta {args.delta:g} sigma {args.sigma} perplexity {math.exp(loss):.2f}"
    )
    return result, epsilon


if __name__ == "__main__":
    main()
