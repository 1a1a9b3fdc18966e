"""Tiny random models of every family the hooks support, for table-driven tests; a tiny random SAE and texts."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 64
HIDDEN = 32


def _common(**extra):
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **extra)


def _qwen3_5_text(**extra):
    return dict(_common(head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                        linear_num_value_heads=4, linear_conv_kernel_dim=2,
                        layer_types=["linear_attention", "full_attention", "linear_attention"]), **extra)


def _moe():
    return dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)


FAMILIES = {
    "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**_common(head_dim=8))),
    "qwen3_moe": lambda: tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**_common(head_dim=8), **_moe())),
    "qwen3_5": lambda: tf.Qwen3_5ForCausalLM(tf.Qwen3_5TextConfig(**_qwen3_5_text())),
    "qwen3_5_moe": lambda: tf.Qwen3_5MoeForCausalLM(
        tf.Qwen3_5MoeTextConfig(**_qwen3_5_text(**_moe(), shared_expert_intermediate_size=16))),
    "qwen3_5_multimodal": lambda: tf.Qwen3_5ForConditionalGeneration(tf.Qwen3_5Config(
        text_config=_qwen3_5_text(),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=HIDDEN,
                           patch_size=4, temporal_patch_size=1, spatial_merge_size=1))),
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_common())),
    "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**_common(head_dim=8))),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=3, n_head=4,
                                                     n_positions=128)),
}


def tiny_model(family: str = "qwen3", seed: int = 0):
    torch.manual_seed(seed)
    return FAMILIES[family]().eval()


D_SAE, K, LAYER = 80, 6, 1
EN = ["hello there world", "the cat sat on the mat", "a b c d e", "quick brown fox"]
ZH = ["你好世界", "猫坐在垫子上", "今天天气很好"]


def random_sae(seed: int = 0):
    """A random TopK SAE (d_in HIDDEN, D_SAE features, k K) on layer LAYER."""
    from qscope_rl import SparseAutoencoder

    g = torch.Generator().manual_seed(seed)
    weights = {"W_enc": torch.randn(D_SAE, HIDDEN, generator=g), "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
               "W_dec": torch.randn(HIDDEN, D_SAE, generator=g), "b_dec": torch.zeros(HIDDEN)}
    return SparseAutoencoder.from_weights(weights, architecture="topk", k=K, layer=LAYER, source="random")
