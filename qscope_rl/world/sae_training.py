"""A TopK SAE on the world LM's residual stream, trained with EleutherAI sparsify, saved as Qwen-Scope.

sparsify's `Trainer` does the training (TopK, AuxK dead-latent loss, unit-norm decoder, Signum +
schedule-free); we then convert its `SparseCoder` to the Qwen-Scope native layout:

- sparsify encodes `topk(relu((x - b_dec) @ W_enc.T + b_enc))`; Qwen-Scope has no `b_dec`
  subtraction, so the encoder bias is folded: `b_enc_qs = b_enc - W_enc @ b_dec`;
- sparsify keeps `W_dec` as (d_sae, d_in); Qwen-Scope stores (d_model, d_sae);
- sparsify applies ReLU before top-k, Qwen-Scope after: the reconstructions agree (when fewer than k
  pre-activations are positive, the extra picks are zeros either way), which `parity_error` checks.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Qwen3ForCausalLM

from .model import split_packed


@dataclass(frozen=True)
class SAESpec:
    """The SAE and its training (every field is in the recipe hash)."""

    expansion_factor: int = 8  # d_sae = expansion_factor * d_model
    k: int = 32
    layer: int | None = None  # decoder layer whose output is read; None: the middle layer
    seq_len: int = 64  # packed rows fed to sparsify (one row = one sequence)
    batch_size: int = 32  # sequences per step
    epochs: int = 2  # passes over the training rows (shuffled per epoch)
    auxk_alpha: float = 1 / 32  # Gao et al. 2024, as in Qwen-Scope
    dead_feature_threshold: int = 10_000  # tokens without firing before AuxK revives a latent
    seed: int = 0


def sae_folder_name(name: str, d_sae: int, k: int) -> str:
    """Qwen-Scope repo naming, e.g. SAE-Res-Qwen3-8B-Base-W64K-L0_50."""
    width = f"{d_sae // 1024}K" if d_sae % 1024 == 0 else str(d_sae)
    return f"SAE-Res-{name}-W{width}-L0_{k}"


def train_sae(model: Qwen3ForCausalLM, rows: torch.Tensor, spec: SAESpec, layer: int, eos_id: int):
    """Train with sparsify on packed token rows; returns sparsify's SparseCoder (averaged weights)."""
    from datasets import Dataset

    # sparsify prints its progress to stdout (even on import); keep stdout clean for `--json` users
    with contextlib.redirect_stdout(sys.stderr), tempfile.TemporaryDirectory() as tmp:
        from sparsify import SaeConfig, SparseCoder, TrainConfig, Trainer

        gen = torch.Generator().manual_seed(spec.seed)
        input_ids, _ = split_packed(rows, eos_id)
        # sparsify's DataLoader does not shuffle; we hand it the epochs pre-shuffled
        order = torch.cat([torch.randperm(len(rows), generator=gen) for _ in range(spec.epochs)])
        dataset = Dataset.from_dict({"input_ids": input_ids[order].tolist()}).with_format("torch")
        cfg = TrainConfig(
            SaeConfig(expansion_factor=spec.expansion_factor, k=spec.k),
            batch_size=spec.batch_size,
            layers=[layer],  # hooks model.model.layers[layer]: its output is hidden_states[layer + 1]
            auxk_alpha=spec.auxk_alpha,
            dead_feature_threshold=spec.dead_feature_threshold,
            exclude_tokens=[eos_id],  # separators and padding
            init_seeds=[spec.seed],
            save_every=10**9,  # only the final save, which holds the schedule-free averaged weights
            log_to_wandb=False,
            save_dir=tmp,
            run_name="world",
        )
        Trainer(cfg, dataset, model).fit()
        torch.set_float32_matmul_precision("highest")  # fit() switches it to "high"; undo the side effect
        return SparseCoder.load_from_disk(Path(tmp, "world", f"layers.{layer}"))


def to_qwen_scope(sae) -> dict[str, torch.Tensor]:
    """Convert a sparsify SparseCoder to the Qwen-Scope state dict (folding b_dec into b_enc)."""
    W_enc = sae.encoder.weight.detach().float()  # (d_sae, d_in)
    b_dec = sae.b_dec.detach().float()  # (d_in,)
    return {
        "W_enc": W_enc.clone().contiguous(),
        "W_dec": sae.W_dec.detach().float().T.contiguous(),  # (d_in, d_sae)
        "b_enc": (sae.encoder.bias.detach().float() - W_enc @ b_dec).contiguous(),  # (d_sae,)
        "b_dec": b_dec.clone().contiguous(),
    }


def encode(x: torch.Tensor, sd: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    """Qwen-Scope encoding: pre = x @ W_enc.T + b_enc, keep the top k, ReLU. (N, d_in) -> (N, d_sae)."""
    pre_acts = x @ sd["W_enc"].T + sd["b_enc"]
    top = pre_acts.topk(k, dim=-1)
    return torch.zeros_like(pre_acts).scatter_(-1, top.indices, top.values.relu())


def decode(acts: torch.Tensor, sd: dict[str, torch.Tensor]) -> torch.Tensor:
    return acts @ sd["W_dec"].T + sd["b_dec"]


@torch.no_grad()
def parity_error(sae, sd: dict[str, torch.Tensor], x: torch.Tensor) -> float:
    """Max abs difference between sparsify's reconstruction and the converted Qwen-Scope one."""
    ours = decode(encode(x, sd, sae.cfg.k), sd)
    return (sae(x).sae_out.float() - ours).abs().max().item()


@torch.no_grad()
def residual_activations(model: Qwen3ForCausalLM, rows: torch.Tensor, layer: int, eos_id: int):
    """Residual stream at the output of decoder layer `layer` for every non-EOS token. (N, d_model)"""
    acts = []
    for i in range(0, len(rows), 64):
        input_ids, _ = split_packed(rows[i : i + 64], eos_id)
        hidden = model(input_ids=input_ids, output_hidden_states=True).hidden_states[layer + 1]
        acts.append(hidden[input_ids != eos_id])
    return torch.cat(acts)


@torch.no_grad()
def evaluate_sae(sd: dict[str, torch.Tensor], x: torch.Tensor, k: int) -> dict[str, float]:
    """FVU (fraction of variance unexplained) and the share of latents that never fire on x."""
    acts = encode(x, sd, k)
    fvu = (x - decode(acts, sd)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    fired = (acts > 0).any(0)
    return {"sae_fvu": fvu.item(), "sae_dead_fraction": 1 - fired.float().mean().item()}


def save_qwen_scope(sd: dict[str, torch.Tensor], folder: Path, layer: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"layer{layer}.sae.pt"
    torch.save(sd, path)
    return path
