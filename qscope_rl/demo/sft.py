"""The SFT table of the main job (Qwen-Scope's SASFT, point 4): fine-tune the world model on English data
with a rare share of switched documents, with plain SFT and with `SASFTTrainer`, and measure the
code-switch ratio per switch target on held-out prompts, held-out perplexity and the task reward.

The data are fresh English documents from the world's own grammar (a new seed), switching into Chinese or
Spanish in the corpus's share of documents, so plain SFT keeps teaching the rare switch, as real SFT data
do. SASFT's pack is the unwanted-language features of both targets (the world's "zh" and "es" packs).
"""

from __future__ import annotations

import copy
import math
import tempfile
from dataclasses import replace

import torch
from datasets import Dataset
from transformers import PrinterCallback

from qscope_rl.features.feature_pack import FeaturePack
from qscope_rl.world import World
from qscope_rl.world.corpus import generate_documents
from qscope_rl.world.model import eval_loss, pack_documents

METHODS = ("sft", "sasft")


def sft_texts(world: World, n: int, seed: int) -> list[str]:
    """n English documents from the world's grammar (no loops), switched in the corpus's share."""
    spec = replace(world.corpus_spec, loop_share=0.0)
    docs = generate_documents(world.lexicon, spec, 3 * n, seed)
    return [d.text for d in docs if d.lang == "en"][:n]


def merged_pack(paths: list[str], out: str) -> str:
    """One pack holding the features of several packs of the same SAE (first pack's order first)."""
    packs = [FeaturePack.load(p) for p in paths]
    seen, features = set(), []
    for pack in packs:
        for f in pack.features:
            if f.id not in seen:
                seen.add(f.id)
                features.append(f)
    merged = replace(packs[0], name="+".join(p.name for p in packs), features=features,
                     data={"merged_from": [p.name for p in packs]})
    merged.save(out)
    return out


def train_sft(world: World, method: str, seed: int, texts: list[str], pack_file: str, settings) -> torch.nn.Module:
    """Fine-tune a copy of the world model with plain SFT or SASFT (same data, seed and budget)."""
    from qscope_rl.trainers import SASFTConfig, SASFTTrainer

    if method not in METHODS:
        raise ValueError(f"unknown SFT method {method!r}: choose one of {list(METHODS)}")
    sae = dict(sae_source=str(world.sae_dir), sae_layer=world.layer, sasft_pack=pack_file,
               sasft_lambda=settings.sasft_lambda) if method == "sasft" else {}
    with tempfile.TemporaryDirectory() as out:
        args = SASFTConfig(output_dir=out, seed=seed, max_steps=settings.sft_steps, learning_rate=settings.sft_lr,
                           per_device_train_batch_size=settings.sft_batch_size, max_length=64, packing=False,
                           dataset_text_field="text", bf16=False, use_cpu=True, report_to="none",
                           logging_steps=10, save_strategy="no", disable_tqdm=True, **sae)
        trainer = SASFTTrainer(model=copy.deepcopy(world.model), args=args,
                               train_dataset=Dataset.from_dict({"text": texts}), processing_class=world.tokenizer)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    return trainer.model.eval()


def heldout_perplexity(world: World, model) -> float:
    """Perplexity of `model` on the world's held-out clean English documents."""
    texts = [d.text for d in world.documents("heldout") if d.lang == "en" and d.kind == "normal"]
    rows = pack_documents(world.tokenizer, texts, 64)
    return math.exp(eval_loss(model, rows, world.tokenizer.pad_token_id))
