"""A TopK SAE on the world LM's residual stream: EleutherAI sparsify's `SparseCoder`, saved as Qwen-Scope.

The layer-L activations are collected once (one no-grad forward, `residual_activations`) and the
`SparseCoder` is trained on them in a short loop (`train_sae`) rather than with sparsify's `Trainer`,
which re-runs the LM for every batch: on CPU that bought only ~200 steps and left many latents dead.
What we keep from sparsify / Gao et al. 2024: TopK, `b_dec` initialised to the data mean, unit-norm
decoder rows with the parallel gradient removed, and the AuxK loss (alpha 1/32, as in Qwen-Scope) on
latents that have not fired for `dead_feature_threshold` tokens. Differences: Adam with warmup and
linear decay to zero (not Signum + schedule-free), a few epochs over a small cached set of tokens, latents
initialised at random training tokens' directions, and dead latents resampled at each epoch's end (Bricken
et al. 2023): on a world of a few thousand word types, AuxK alone left a third of 4,096 latents dead.

The trained `SparseCoder` is converted to the Qwen-Scope native layout:

- sparsify encodes `topk(relu((x - b_dec) @ W_enc.T + b_enc))`; Qwen-Scope has no `b_dec`
  subtraction, so the encoder bias is folded: `b_enc_qs = b_enc - W_enc @ b_dec`;
- sparsify keeps `W_dec` as (d_sae, d_in); Qwen-Scope stores (d_model, d_sae);
- sparsify applies ReLU before top-k, Qwen-Scope after: the reconstructions agree (when fewer than k
  pre-activations are positive, the extra picks are zeros either way), which `parity_error` checks.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import Qwen3ForCausalLM

from .model import split_packed


@dataclass(frozen=True)
class SAESpec:
    """The SAE and its training (every field is in the recipe hash)."""

    expansion_factor: int = 32  # d_sae = expansion_factor * d_model (4096 on the default world)
    k: int = 32
    layer: int | None = None  # decoder layer whose output is read; None: the middle layer
    seq_len: int = 64  # packed rows whose non-EOS tokens give the training activations
    batch_size: int = 1024  # tokens per step
    epochs: int = 3  # passes over the cached training activations (shuffled per epoch); dead latents fall with more
    lr: float = 2e-3  # Adam; warmup, then linear decay to zero
    warmup_steps: int = 50
    auxk_alpha: float = 1 / 32  # Gao et al. 2024, as in Qwen-Scope
    dead_feature_threshold: int = 10_000  # tokens without firing before AuxK revives a latent
    # Bricken et al. 2023: at the end of each epoch but the last, latents that did not fire in it are
    # re-initialised towards the inputs the SAE reconstructs worst. On a small world (a few thousand word
    # types, a quarter-million tokens) AuxK alone left 31-43% of 4,096 latents dead.
    resample_dead: bool = True
    # latents start at the directions of random training tokens (encoder = decoder, as sparsify's init): with
    # resampling, the design run on world seed 0 left 0.0% dead at FVU 0.03 (random init + AuxK: 43% dead)
    data_init: bool = True
    seed: int = 0


def sae_folder_name(name: str, d_sae: int, k: int) -> str:
    """Qwen-Scope repo naming, e.g. SAE-Res-Qwen3-8B-Base-W64K-L0_50."""
    width = f"{d_sae // 1024}K" if d_sae % 1024 == 0 else str(d_sae)
    return f"SAE-Res-{name}-W{width}-L0_{k}"


def train_sae(x: torch.Tensor, spec: SAESpec):
    """Train a sparsify SparseCoder on cached activations x (N, d_in); returns it in eval mode."""
    # sparsify prints to stdout on import; keep stdout clean for `--json` users
    with contextlib.redirect_stdout(sys.stderr):
        from sparsify import SaeConfig, SparseCoder

    torch.manual_seed(spec.seed)
    sae = SparseCoder(x.shape[1], SaeConfig(expansion_factor=spec.expansion_factor, k=spec.k))
    sae.b_dec.data = x.mean(0)  # centres the pre-activations at init, as sparsify's Trainer does
    if spec.data_init:
        picks = torch.randperm(len(x), generator=torch.Generator().manual_seed(spec.seed))[: sae.num_latents]
        directions = torch.nn.functional.normalize(x[picks] - sae.b_dec.data, dim=1)
        sae.W_dec.data[: len(picks)] = directions
        sae.encoder.weight.data[: len(picks)] = directions * sae.encoder.weight.data.norm(dim=1).mean()
    opt = torch.optim.Adam(sae.parameters(), lr=spec.lr)
    gen = torch.Generator().manual_seed(spec.seed)
    steps_per_epoch = len(x) // spec.batch_size  # drop the ragged last batch
    total = spec.epochs * steps_per_epoch
    tokens_since_fired = torch.zeros(sae.num_latents, dtype=torch.long)
    fired_this_epoch = torch.zeros(sae.num_latents, dtype=torch.bool)
    bar = tqdm(total=total, desc="world: train SAE", leave=False)
    for step in range(total):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(x), generator=gen)
        idx = order[(step % steps_per_epoch) * spec.batch_size :][: spec.batch_size]
        for group in opt.param_groups:
            group["lr"] = spec.lr * min((step + 1) / spec.warmup_steps, (total - step) / (total - spec.warmup_steps))
        dead_mask = tokens_since_fired > spec.dead_feature_threshold
        out = sae(x[idx], dead_mask=dead_mask)
        (out.fvu + spec.auxk_alpha * out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()
        fired = out.latent_indices[out.latent_acts > 0]
        tokens_since_fired += spec.batch_size
        tokens_since_fired[fired] = 0
        fired_this_epoch[fired] = True
        if (step + 1) % steps_per_epoch == 0:  # an epoch ends
            if spec.resample_dead and step + 1 < total:
                resample_dead_latents(sae, opt, x, ~fired_this_epoch, gen)
            fired_this_epoch.zero_()
        bar.update()
        if step % 100 == 0:
            bar.set_postfix(fvu=f"{out.fvu.item():.3f}", dead=int(dead_mask.sum()))
    bar.close()
    return sae.eval()


@torch.no_grad()
def resample_dead_latents(sae, opt: torch.optim.Optimizer, x: torch.Tensor, dead: torch.Tensor,
                          gen: torch.Generator, n_candidates: int = 16_384) -> int:
    """Point each dead latent at an input the SAE reconstructs badly (drawn with probability proportional to
    its squared error, Bricken et al. 2023): decoder row = that input's unit error direction, encoder row =
    the same direction at 0.2x the mean alive encoder norm, bias 0, and its Adam state cleared. Returns the
    number resampled."""
    idx = dead.nonzero().squeeze(1)
    if len(idx) == 0:
        return 0
    pool = x[torch.randperm(len(x), generator=gen)[:n_candidates]]
    err = pool - sae(pool).sae_out
    weights = err.pow(2).sum(1)
    picks = torch.multinomial(weights / weights.sum(), len(idx), replacement=len(idx) > len(pool), generator=gen)
    directions = torch.nn.functional.normalize(err[picks], dim=1)
    alive_norm = sae.encoder.weight[~dead].norm(dim=1).mean() if (~dead).any() else torch.tensor(1.0)
    sae.W_dec.data[idx] = directions
    sae.encoder.weight.data[idx] = directions * 0.2 * alive_norm
    sae.encoder.bias.data[idx] = 0.0
    for param in (sae.W_dec, sae.encoder.weight, sae.encoder.bias):
        for buf in opt.state.get(param, {}).values():
            if torch.is_tensor(buf) and buf.dim() > 0:
                buf[idx] = 0.0
    return len(idx)


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
def evaluate_sae(sd: dict[str, torch.Tensor], x: torch.Tensor, k: int, chunk_size: int = 8192) -> dict[str, float]:
    """FVU (fraction of variance unexplained) and the share of latents that never fire on x.

    Chunked and sparse (top-k indices and values, never the dense (N, d_sae) codes): the same numbers as
    `decode(encode(x))` at a fraction of the memory."""
    fired = torch.zeros(sd["W_enc"].shape[0], dtype=torch.bool)
    dictionary = sd["W_dec"].T  # (d_sae, d_in)
    err = 0.0
    for chunk in x.split(chunk_size):
        top = (chunk @ sd["W_enc"].T + sd["b_enc"]).topk(k, dim=-1)
        values = top.values.relu()
        fired[top.indices[values > 0]] = True
        recon = torch.einsum("nk,nkd->nd", values, dictionary[top.indices]) + sd["b_dec"]
        err += (chunk - recon).pow(2).sum().item()
    fvu = err / (x - x.mean(0)).pow(2).sum().item()
    return {"sae_fvu": fvu, "sae_dead_fraction": 1 - fired.float().mean().item()}


def save_qwen_scope(sd: dict[str, torch.Tensor], folder: Path, layer: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"layer{layer}.sae.pt"
    torch.save(sd, path)
    return path
