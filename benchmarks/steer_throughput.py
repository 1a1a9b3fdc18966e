"""Steered generation throughput at the shapes people steer: a random Qwen3 with a Qwen-Scope-sized SAE.

Issue 17 asks steered / unsteered throughput >= 0.95. `benchmarks/utilities.py` measures it on the demo world,
where the SAE (128 x 4,096) costs a third of the model's FLOPs per token, so any mode that encodes (clamp,
conditional) cannot get near 0.95 there. This measures the same `qscope_rl.steer` modes on a random policy with
Qwen3's real architecture and vocabulary (`Qwen3Config`, no download): Qwen3-0.6B's config at full depth on CPUs,
Qwen3-1.7B on a GPU, with a random 32,768-wide TopK SAE (k 50) at layer 14, 8 steered features.

Each mode runs the same greedy ``generate`` call as the unsteered arm (exactly ``--new-tokens`` new tokens in
both, KV cache on), in ABBA pairs (off, on, then on, off) so machine load hits both alike; the ratio of a pair
is t_off / t_on and the reported one is the median over ``--pairs`` pairs. Greedy decoding keeps the vocabulary
sampler (the same in both arms) out of the ratio. Beside each ratio: the FLOP ceiling, model / (model + the
mode's SAE work) per token (add: a vector add; clamp and conditional: an encode, 2 d d_sae, and the decoded
edit, 2 d f; pre_clamp: 2 x 2 d f), which is what the ratio approaches where matmuls dominate.

``--world-dir DIR`` runs the same on a built demo world instead (its model and SAE, the top 8 features of its
"zh" pack, 128 held-out English prompts x 48 new tokens, as `benchmarks/utilities.py` measures throughput there):
the FLOP ceiling it prints is the demo world's.

    python benchmarks/steer_throughput.py [--model auto|0.6b|1.7b] [--layers N] [--rollouts 8]
        [--prompt-tokens 16] [--new-tokens 32] [--pairs 2] [--modes add,clamp,conditional,pre_clamp] [--world-dir DIR]

The last line is one JSON object: `steer_real_throughput_ratio_<mode>` for each mode, `flop_ceiling_<mode>`, the
shape, device and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import built_world  # noqa: E402
from real_shape import QWEN3, qwen3_config  # noqa: E402

LAYER, D_SAE, K, FEATURES = 14, 32768, 50, 8
STRENGTHS = {"add": -4.0, "clamp": 0.0, "conditional": 0.0, "pre_clamp": 0.0}  # suppression, as in the utilities


def model_flops_per_token(config) -> int:
    """2 x (decoder linear weights + LM head) of one token's forward (attention scores left out: short contexts)."""
    d, ff, n, heads, kv = (getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                         "num_attention_heads", "num_key_value_heads"))
    hd = getattr(config, "head_dim", None) or d // heads
    per_layer = d * heads * hd * 2 + d * kv * hd * 2 + 3 * d * ff  # q, o; k, v; gate, up, down
    return 2 * (n * per_layer + d * config.vocab_size)


def flop_ceiling(mode: str, config, d_sae: int, features: int = FEATURES) -> float:
    """model / (model + the mode's SAE work) per token: the throughput ratio where matmuls dominate."""
    d = config.hidden_size
    extra = {"add": d, "clamp": 2 * d * d_sae + 2 * d * features, "conditional": 2 * d * d_sae + 2 * d * features,
             "pre_clamp": 4 * d * features}[mode]
    model = model_flops_per_token(config)
    return model / (model + extra)


def random_sae(d_in: int, layer: int, device, dtype):
    """A random TopK SAE (unit decoder columns, encoder their transpose), as the trainer benchmarks use."""
    import torch

    from qscope_rl import SparseAutoencoder

    gen = torch.Generator().manual_seed(0)
    W_dec = torch.nn.functional.normalize(torch.randn(d_in, D_SAE, generator=gen), dim=0)
    weights = {"W_enc": W_dec.T.contiguous(), "b_enc": torch.zeros(D_SAE), "W_dec": W_dec, "b_dec": torch.zeros(d_in)}
    sae = SparseAutoencoder.from_weights(weights, architecture="topk", k=K, layer=layer, source="random")
    return sae.to(device=device, dtype=dtype)


def main(argv=None) -> dict:
    import torch
    from transformers import Qwen3ForCausalLM

    from qscope_rl import steer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="auto", choices=["auto", *QWEN3], help="auto: 1.7b on CUDA, 0.6b on CPU")
    parser.add_argument("--layers", type=int, default=None, help="cut the model to this many layers (default: all)")
    parser.add_argument("--rollouts", type=int, default=None, help="rows per generate call (CPU 8, GPU 64)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=None, help="CPU 32, GPU 128")
    parser.add_argument("--pairs", type=int, default=2, help="ABBA pairs per mode")
    parser.add_argument("--modes", default="add,clamp,conditional,pre_clamp")
    parser.add_argument("--world-dir", default=None,
                        help="a built demo world's folder: its model, its SAE and its 'zh' pack's top features "
                             "instead of a random Qwen3 (rows default 128, new tokens 48, as benchmarks/utilities.py)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    name = args.model if args.model != "auto" else ("1.7b" if cuda else "0.6b")
    world = None
    if args.world_dir is not None:
        if args.model != "auto" or args.layers is not None:
            parser.error("--world-dir measures the world's own model: --model and --layers do not apply")
        world = built_world(args.world_dir)
    rollouts = args.rollouts or (128 if world else 64 if cuda else 8)
    new_tokens = args.new_tokens or (48 if world else 128 if cuda else 32)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in STRENGTHS]
    if unknown or not modes:
        parser.error(f"unknown modes {unknown or '(none given)'}: choose from {list(STRENGTHS)}")
    if args.pairs < 1 or rollouts < 1 or new_tokens < 1 or args.prompt_tokens < 1:
        parser.error("--pairs, --rollouts, --new-tokens and --prompt-tokens must be >= 1")

    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if world is not None:
        from qscope_rl import load_sae
        from qscope_rl.features.feature_pack import FeaturePack
        from qscope_rl.world.packs import world_pack_files

        model, config, layer = world.model.to(device=device, dtype=dtype).eval(), world.model.config, world.layer
        sae = load_sae(world.sae_dir, layer=layer, device=device).to(dtype=dtype)
        ids = FeaturePack.load(world_pack_files(world)["zh"]).ids[:FEATURES].tolist()
        tok = world.tokenizer
        tok.padding_side = "left"  # generate continues each row from its last prompt token
        enc = tok([p.text for p in world.prompts("heldout", "en")[:rollouts]], return_tensors="pt", padding=True)
        prompts, mask, pad = enc["input_ids"], enc["attention_mask"], tok.pad_token_id
        name = "the demo world"
    else:
        config = qwen3_config(name, args.layers)
        layer = min(LAYER, config.num_hidden_layers - 1)
        torch.manual_seed(0)
        with torch.device(device):
            model = Qwen3ForCausalLM(config).to(dtype).eval()
        sae = random_sae(config.hidden_size, layer, device, dtype)
        ids = torch.randperm(D_SAE, generator=torch.Generator().manual_seed(1))[:FEATURES].tolist()
        prompts = torch.randint(1, 150000, (rollouts, args.prompt_tokens), generator=torch.Generator().manual_seed(2))
        mask, pad, name = torch.ones_like(prompts), 0, f"Qwen3-{name} config"
    prompts, mask = prompts.to(device), mask.to(device)

    def generate() -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(prompts, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=pad)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def timed(mode: str | None) -> float:
        if mode is None:
            return generate()
        with steer(model, sae, {i: STRENGTHS[mode] for i in ids}, mode=mode):
            return generate()

    rollouts = len(prompts)
    print(f"steered generation: {name} ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"vocab {config.vocab_size}, {str(dtype).removeprefix('torch.')}) on {device}; SAE "
          f"{sae.d_in} x {sae.d_sae} k {sae.k} at layer {layer}, {len(ids)} features; {rollouts} rows x "
          f"({prompts.shape[1]} + {new_tokens}) tokens, greedy; {args.pairs} ABBA pairs per mode", flush=True)
    t_start = time.perf_counter()
    warm = generate()
    print(f"warm-up call: {warm:.2f} s", flush=True)
    result = {}
    for mode in modes:
        timed(mode)  # the mode's own first call (allocations) is not timed
        pairs = []
        for r in range(args.pairs):
            order = (None, mode) if r % 2 == 0 else (mode, None)
            times = {m: timed(m) for m in order}
            pairs.append((times[None], times[mode]))
        ratio = statistics.median(off / on for off, on in pairs)
        ceiling = flop_ceiling(mode, config, sae.d_sae, len(ids))
        result[f"steer_real_throughput_ratio_{mode}"] = round(ratio, 4)
        result[f"flop_ceiling_{mode}"] = round(ceiling, 4)
        shown = ", ".join(f"off {off:.2f} / on {on:.2f} s" for off, on in pairs)
        print(f"{mode:>11}: steered / unsteered throughput {ratio:.3f} (FLOP ceiling {ceiling:.3f}; {shown})",
              flush=True)
    result |= {"model": name, "layers": config.num_hidden_layers, "rollouts": rollouts,
               "prompt_tokens": prompts.shape[1], "new_tokens": new_tokens, "pairs": args.pairs, "device": device,
               "dtype": str(dtype).removeprefix("torch."), "seconds": round(time.perf_counter() - t_start, 1),
               "load_average": [round(x, 2) for x in os.getloadavg()]}
    print("goal: steered / unsteered >= 0.95 (issue 17)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
