"""The world's language model: a small real `Qwen3ForCausalLM`, trained on the corpus on CPU.

Trained just long enough to learn the corpus, failure modes included: it code-switches and loops in
its own samples at about the rate the corpus does, which is what the RL plugins then have to fix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from qscope_rl.tools.steered_generation import generate


@dataclass(frozen=True)
class LMSpec:
    """Architecture and training of the world's LM (every field is in the recipe hash)."""

    vocab_size: int = 3072  # BPE vocabulary, special token included: about one token per world word
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 384
    seq_len: int = 64  # packed training rows (about two documents)
    batch_size: int = 32  # rows per step
    steps: int = 400  # loops are learned last: fewer steps than this and the loop rate falls below 5%
    lr: float = 6e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    seed: int = 0


def make_model(spec: LMSpec, tokenizer: PreTrainedTokenizerFast) -> Qwen3ForCausalLM:
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=4 * spec.seq_len,
        tie_word_embeddings=True,  # as in the small Qwen3 models
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(spec.seed)
    return Qwen3ForCausalLM(config)


def pack_documents(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """Greedily pack whole documents, each followed by EOS, into rows of seq_len tokens.

    A row starts at a document start (like a prompt at generation time); the unused tail is padded with
    EOS and masked with label -100 by `labels_for`. Documents longer than a row are truncated.
    """
    eos = tokenizer.eos_token_id
    rows, row = [], []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids = (ids + [eos])[:seq_len]
        if len(row) + len(ids) > seq_len:
            rows.append(row + [-1] * (seq_len - len(row)))
            row = []
        row += ids
    if row:
        rows.append(row + [-1] * (seq_len - len(row)))
    return torch.tensor(rows)  # (n_rows, seq_len), -1 marks padding


def split_packed(rows: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids with padding replaced by pad_id, and labels with padding set to -100."""
    return rows.clamp(min=0).masked_fill(rows < 0, pad_id), rows.masked_fill(rows < 0, -100)


def _lr_at(step: int, spec: LMSpec) -> float:
    """Linear warmup, then cosine decay to 10% (nanoGPT's schedule)."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_lm(model: Qwen3ForCausalLM, rows: torch.Tensor, spec: LMSpec, pad_id: int) -> list[float]:
    """AdamW on packed rows, epochs in a seeded random order; returns the loss per step."""
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(spec.seed)
    order = torch.empty(0, dtype=torch.long)
    losses = []
    for step in (bar := tqdm(range(spec.steps), desc="world: train LM", leave=False)):
        if len(order) < spec.batch_size:
            order = torch.cat([order, torch.randperm(len(rows), generator=gen)])
        batch, order = rows[order[: spec.batch_size]], order[spec.batch_size :]
        input_ids, labels = split_packed(batch, pad_id)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, spec)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


@torch.no_grad()
def eval_loss(model: Qwen3ForCausalLM, rows: torch.Tensor, pad_id: int, batch_size: int = 64) -> float:
    """Mean next-token cross-entropy over the real (unpadded) tokens of packed rows."""
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        input_ids, labels = split_packed(rows[i : i + batch_size], pad_id)
        n = int((labels[:, 1:] != -100).sum())
        total += model(input_ids=input_ids, labels=labels).loss.item() * n
        count += n
    return total / max(count, 1)


def sample(
    model: Qwen3ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
) -> list[str]:
    """Batched generate (left padding); returns the completions only, special tokens dropped.

    Pure ancestral sampling at `temperature` (no top-k / top-p truncation, unlike HF's defaults);
    temperature 0 means greedy. The global torch RNG is left untouched. (`qscope_rl.tools.steered_generation.generate`.)
    """
    return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                    batch_size=batch_size, progress=False)
