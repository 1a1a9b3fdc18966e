"""GRPO steps at the shapes people train: a random Qwen3 policy + LoRA with a Qwen-Scope-sized SAE, on vs off.

The policy is `Qwen3ForCausalLM` built from the real architecture's `Qwen3Config` (random weights, no download):
Qwen3-1.7B (hidden 2048, 28 layers) by default on a GPU; on CPUs, where a 1.7B step takes minutes, Qwen3-0.6B's
config at full depth (hidden 1024, 28 layers, the real 151,936-token vocabulary) with a 1024 x 32768 SAE, and
the FLOP ratio of SAE work to policy work printed beside the measured ratio, at the run's shape and at the
1.7B shape. LoRA as people use it on one GPU: r 16, alpha 32, dropout 0.05, every linear layer; gradient
checkpointing on (TRL's default). The SAE is a random TopK SAE of Qwen-Scope's width (32768, k 50) at layer 14,
saved in the Qwen-Scope layout and loaded by the trainer.

Arms, each in its own subprocess, run ABBA (off, on, on, off per round) so that machine load hits both alike:
- `off`: SAEGRPOTrainer with no SAE (it is GRPOTrainer), one cheap reward;
- `on`: + capture during generation (sparse: top-k codes only), the SAE code-switch penalty reward, the SASFT
  auxiliary loss (weight 0.1) on a random 8-feature pack, and amplified sampling (one steered rollout per group;
  `--no-amplify` leaves it out, to tell its cost from the rest).
Step time: median of TRL's per-step `step_time` after one warm-up step. Peak memory: one more child per arm, one
step, peak tensor memory from building the trainer to the end (torch.profiler's allocation events on CPU,
`torch.cuda.max_memory_allocated` on CUDA); `real_extra_mem_over_sae_weights` = (on - off) / SAE weight bytes.

Capture memory, at a shape of its own (`--capture-*`; residual width 2048, Qwen3-1.7B's, by default): the residual
of B rollouts (prompt P, then T - 1 decode steps, bf16 chunks as HF generate feeds them) captured by the trainers'
`GenerationCapture` and turned into completion-aligned activations (a) with the dense store (keep every chunk,
join, `encode_completions`: the path before sparse capture) and (b) with the sparse store the trainers use
(`SparseCapture` into a preallocated `SparseCodeStore`); `capture_mem_ratio` = peak (b) / peak (a), both
including the same output activations and the SAE encode's chunk buffers (5% of the SAE's weights).

    python benchmarks/real_shape.py [--model auto|0.6b|1.7b] [--rollouts 4] [--prompt-tokens 16]
        [--completion-tokens 16] [--steps 2] [--rounds 1] [--parts steps,memory,capture] [--capture-rollouts 8]
        [--capture-tokens 1024] [--capture-d 2048] [--no-amplify]

The last line is one JSON object: `real_step_ratio` (target <= 1.05), `real_extra_mem_over_sae_weights`
(target <= 1.10), `capture_mem_ratio` (target <= 0.10), the FLOP ratios, the shapes, device and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import make_random_sae, peak_tensor_bytes, run_child, sae_weight_bytes, step_times  # noqa: E402

LAYER, D_SAE, K, PACK_SIZE = 14, 32768, 50, 8
QWEN3 = {  # the published Qwen3 configs (config.json of Qwen/Qwen3-0.6B and Qwen/Qwen3-1.7B)
    "0.6b": dict(hidden_size=1024, intermediate_size=3072),
    "1.7b": dict(hidden_size=2048, intermediate_size=6144),
}
COMMON = dict(vocab_size=151936, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
              max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
EOS_ID = 151643  # <|endoftext|>


def qwen3_config(name: str, layers: int | None = None):
    from transformers import Qwen3Config

    return Qwen3Config(**{**COMMON, **QWEN3[name], **({"num_hidden_layers": layers} if layers else {})})


def device_name() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# -- FLOPs ----------------------------------------------------------------------------------------------


def flop_ratio(name: str, rollouts: int, prompt: int, completion: int, pack: int = PACK_SIZE,
               layers: int | None = None, amplified: int = 1) -> float:
    """(policy + SAE) / policy matmul FLOPs of one GRPO step (attention scores ignored: short sequences).

    Policy: a token forward is 2 x (decoder linear weights + LM head); generation runs B (P + T) of them,
    training 3x that (forward, checkpoint recompute, backward through frozen weights; LoRA's own FLOPs and
    weight gradients are under 1% and left out). SAE: encoding 2 d d_sae per completion token, the aux loss
    3 x 2 d f per completion token (the amplified rollout's added vector is O(d)); the importance correction of
    the ``amplified`` rollouts: a log-softmax over the vocabulary per sampled token (mu, read from the logits
    generation computed; pi is the training forward's own), about 5 V FLOPs.
    """
    cfg = {**COMMON, **QWEN3[name], **({"num_hidden_layers": layers} if layers else {})}
    d, ff, layers, heads, kv, hd = (cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                     "num_attention_heads", "num_key_value_heads", "head_dim"))
    per_layer = d * heads * hd * 2 + d * kv * hd * 2 + 3 * d * ff  # q, o; k, v; gate, up, down
    token_forward = 2 * (layers * per_layer + d * cfg["vocab_size"])
    policy = 4 * token_forward * rollouts * (prompt + completion)
    sae = (2 * d * D_SAE + 3 * 2 * d * pack) * rollouts * completion
    importance = 5 * cfg["vocab_size"] * amplified * completion
    return (policy + sae + importance) / policy


# -- building blocks ------------------------------------------------------------------------------------


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over the whole vocabulary ("t0" ... "t151935"): decodes any sampled id."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    vocab["<|endoftext|>"] = EOS_ID
    del vocab[f"t{EOS_ID}"]
    tok = Tokenizer(WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token="t0", padding_side="left")


def make_sae(folder: Path, d_in: int, layer: int = LAYER) -> Path:
    """A random TopK SAE (d_in x 32768, k 50) in the Qwen-Scope layout, and a random 8-feature pack for it."""
    import torch

    from qscope_rl.features.feature_pack import Feature, FeaturePack

    path = make_random_sae(folder, d_in, D_SAE, layer, K)
    ids = torch.randperm(D_SAE, generator=torch.Generator().manual_seed(0))[:PACK_SIZE].tolist()
    FeaturePack("random", "contrastive", "random-qwen3", str(path), layer, D_SAE, d_in,
                [Feature(i, f"f{i}", 1.0, {"mean_pre": 0.0}) for i in ids]).save(folder / "pack.json")
    return path


class LengthReward:
    """A cheap task reward (completion length in words): both arms pay it, so the ratio sees only SAE work."""

    __name__ = "length"

    def __call__(self, completions, **kwargs):
        return [len(str(c).split()) / 100 for c in completions]


# -- one arm (child process) ----------------------------------------------------------------------------


def run_arm(arm: str, args, folder: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import Qwen3ForCausalLM

    from qscope_rl.rewards import SAECodeSwitchPenalty
    from qscope_rl.trainers import SAEGRPOConfig, SAEGRPOTrainer

    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    config = qwen3_config(args.model, args.layers)
    with torch.device(device_name()):  # initialised where it runs: a 1.7B random init on CPU alone takes a while
        model = Qwen3ForCausalLM(config).to(torch.bfloat16 if cuda else torch.float32)
    tok = word_tokenizer(config.vocab_size)
    gen = torch.Generator().manual_seed(1)
    prompts = [" ".join(f"t{i}" for i in torch.randint(1, 150000, (args.prompt_tokens,), generator=gen).tolist())
               for _ in range(16)]
    dataset = Dataset.from_dict({"prompt": prompts})
    rewards, sae_fields = [LengthReward()], {}
    if arm == "on":
        pack = str(folder / "pack.json")
        rewards.append(SAECodeSwitchPenalty(pack))
        sae_fields = dict(sae_source=str(make_sae_path(folder)), sae_layer=sae_layer(args), sae_capture="generation",
                          code_switch_pack=pack, aux_loss_weight=0.1)
        if not args.no_amplify:
            sae_fields |= dict(amplify_pack=pack, amplify_num_rollouts=1)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    steps = 1 if args.memory else args.steps + 1
    with tempfile.TemporaryDirectory() as out:
        grpo = SAEGRPOConfig(output_dir=out, per_device_train_batch_size=args.rollouts,
                             num_generations=args.rollouts, max_completion_length=args.completion_tokens,
                             max_steps=steps, bf16=cuda, report_to="none", logging_steps=1, save_strategy="no",
                             use_cpu=not cuda, seed=0, disable_tqdm=True, **sae_fields)
        trainers = []

        def build_and_train():
            trainers.append(SAEGRPOTrainer(model=model, reward_funcs=rewards, args=grpo, train_dataset=dataset,
                                           processing_class=tok, peft_config=lora))
            trainers[0].train()

        peak = peak_tensor_bytes(build_and_train) if args.memory else None
        if not args.memory:
            build_and_train()
    trainer = trainers[0]
    return {"arm": arm, "step_times": step_times(trainer), "peak_bytes": peak,
            "sae_bytes": sae_weight_bytes(trainer.sae)}


def sae_layer(args) -> int:
    """Layer 14 at full depth (Qwen-Scope's middle layer); the middle layer of a cut policy."""
    return LAYER if not args.layers or args.layers > LAYER else args.layers // 2


def make_sae_path(folder: Path) -> Path:
    return next(folder.glob("SAE-Res-random-*"))


def child(arm: str, args, folder: Path, memory: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", arm, "--folder", str(folder), "--model", args.model,
           "--rollouts", str(args.rollouts), "--prompt-tokens", str(args.prompt_tokens),
           "--completion-tokens", str(args.completion_tokens), "--steps", str(args.steps),
           "--layers", str(args.layers or 0)]
    cmd += (["--memory"] if memory else []) + (["--no-amplify"] if args.no_amplify else [])
    return run_child(cmd, arm)


# -- capture memory -------------------------------------------------------------------------------------


def capture_memory(rollouts: int, prompt: int, completion: int, d_in: int) -> dict:
    """Peak memory of the trainers' HF-generation capture with the dense store vs the sparse one, fed the chunks
    HF generate feeds (prefill, then one (B, 1, d) residual per decode step; the last token is never fed)."""
    import torch

    from qscope_rl.features.detection import encode_completions
    from qscope_rl.features.sparse_capture import SparseCapture
    from qscope_rl.sae.autoencoder import SparseAutoencoder
    from qscope_rl.trainers.rollout_capture import GenerationCapture

    device = device_name()
    resid_dtype = torch.bfloat16  # the policy's dtype where people train (GPU, bf16)
    sae = SparseAutoencoder(d_in, D_SAE, k=K, device=device)
    with torch.no_grad():
        sae.W_enc.normal_(std=d_in**-0.5)
    tracked = torch.arange(PACK_SIZE, device=device)
    mask = torch.ones(rollouts, completion, dtype=torch.bool, device=device)
    mask[: rollouts // 2, completion // 2:] = False  # half the rollouts stop half-way (EOS)
    mask[:, -1] = False  # the last sampled token: never fed to the model (detection_mask leaves it out)
    chunk = sae.memory_bounded_chunk()

    def feed(capture):
        gen = torch.Generator(device=device).manual_seed(0)
        capture(torch.randn(rollouts, prompt, d_in, generator=gen, device=device, dtype=resid_dtype))
        for _ in range(completion - 1):
            capture(torch.randn(rollouts, 1, d_in, generator=gen, device=device, dtype=resid_dtype))

    def dense():  # generation_capture_store = "dense": keep every step, join, encode (sae_mixin._encode_rollouts)
        capture = GenerationCapture(prompt)
        feed(capture)
        hidden, why = capture.completion_residual(rollouts, completion)
        del capture  # the trainer drops its capture here, before encoding
        out.append(encode_completions(sae, hidden, mask, tracked_ids=tracked, chunk_tokens=chunk))

    def sparse():  # the trainers' default store: top-k codes only, encoded a chunk of decode steps at a time
        capture = GenerationCapture(prompt, SparseCapture(sae, tracked_ids=tracked, prompt_length=prompt,
                                                          chunk_tokens=chunk, capacity=completion))
        feed(capture)
        out.append(capture.completion_activations(mask)[0])

    out, peaks = [], {}
    with torch.no_grad():
        for name, fn in (("dense", dense), ("sparse", sparse)):
            peaks[name] = peak_tensor_bytes(fn)
    a, b = out
    same = torch.equal(a.mask, b.mask) and torch.allclose(a.values.sort(-1).values, b.values.sort(-1).values,
                                                          atol=1e-4, rtol=1e-4)
    return {"dense_bytes": peaks["dense"], "sparse_bytes": peaks["sparse"], "same_activations": bool(same),
            "ratio": peaks["sparse"] / peaks["dense"]}


# -- main -----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="auto", choices=["auto", "0.6b", "1.7b"],
                        help="policy architecture; auto: 1.7b on CUDA, 0.6b on CPU")
    parser.add_argument("--rollouts", type=int, default=None, help="rollouts per step (one group); CPU 4, GPU 16")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="CPU 16, GPU 128")
    parser.add_argument("--completion-tokens", type=int, default=None, help="CPU 16, GPU 256")
    parser.add_argument("--layers", type=int, default=0, help="cut the policy to this many layers (0: full depth)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per child, after one warm-up step")
    parser.add_argument("--rounds", type=int, default=1, help="ABBA rounds (off, on, on, off)")
    parser.add_argument("--capture-rollouts", type=int, default=None, help="CPU 8, GPU 128")
    parser.add_argument("--capture-prompt", type=int, default=64)
    parser.add_argument("--capture-tokens", type=int, default=None, help="CPU 1024, GPU 2048")
    parser.add_argument("--capture-d", type=int, default=2048,
                        help="residual width of the capture measurement (2048: Qwen3-1.7B, the issue's shape)")
    parser.add_argument("--parts", default="steps,memory,capture",
                        help="what to measure (comma-separated): steps (ABBA step times), memory, capture")
    parser.add_argument("--no-amplify", action="store_true",
                        help="the `on` arm without amplified sampling (and so without its importance correction)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_arm(args.child, args, Path(args.folder))))
        return

    import torch

    cuda = torch.cuda.is_available()
    defaults = dict(model="1.7b" if cuda else "0.6b", rollouts=16 if cuda else 4, prompt_tokens=128 if cuda else 16,
                    completion_tokens=256 if cuda else 16, capture_rollouts=128 if cuda else 8,
                    capture_tokens=2048 if cuda else 1024)
    for name, value in defaults.items():
        if getattr(args, name) in (None, "auto"):
            setattr(args, name, value)
    d_in = QWEN3[args.model]["hidden_size"]
    depth = args.layers or COMMON["num_hidden_layers"]
    load_start, started = os.getloadavg()[0], time.time()
    print(f"device {device_name()} ({torch.cuda.get_device_name() if cuda else os.cpu_count()} "
          f"{'GPU' if cuda else 'CPU threads'}), policy Qwen3-{args.model} config (random, {depth} of 28 "
          f"layers), LoRA r16 all-linear, SAE {d_in} x {D_SAE} k {K} at layer {sae_layer(args)}; "
          f"{args.rollouts} rollouts x ({args.prompt_tokens} prompt + {args.completion_tokens} completion) tokens "
          f"per step; load average {load_start:.1f}", flush=True)
    times = {"off": [], "on": []}
    memory = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_sae(folder, d_in, sae_layer(args))
        for r in range(args.rounds if "steps" in args.parts else 0):
            for arm in ("off", "on", "on", "off"):
                result = child(arm, args, folder, memory=False)
                times[arm] += result["step_times"]
                print(f"round {r + 1}/{args.rounds} {arm:<3} steps {[round(t, 2) for t in result['step_times']]} s "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
        for arm in ("off", "on") if "memory" in args.parts else ():
            memory[arm] = child(arm, args, folder, memory=True)
            print(f"memory {arm:<3} peak {memory[arm]['peak_bytes'] / 2**20:.0f} MiB", flush=True)
    nan = float("nan")
    capture = {"dense_bytes": nan, "sparse_bytes": nan, "same_activations": None, "ratio": nan}
    if "capture" in args.parts:
        capture = capture_memory(args.capture_rollouts, args.capture_prompt, args.capture_tokens, args.capture_d)
    print(f"capture of {args.capture_rollouts} x ({args.capture_prompt} + {args.capture_tokens}) tokens, "
          f"d {args.capture_d}, "
          f"bf16 residual: dense {capture['dense_bytes'] / 2**20:.0f} MiB, "
          f"sparse {capture['sparse_bytes'] / 2**20:.0f} MiB, same: {capture['same_activations']}", flush=True)
    median = {arm: statistics.median(t) if t else nan for arm, t in times.items()}
    sae_bytes = memory["on"]["sae_bytes"] if memory else 1
    extra = memory["on"]["peak_bytes"] - memory["off"]["peak_bytes"] if memory else nan
    print(f"median step: off {median['off']:.2f} s, on {median['on']:.2f} s; extra peak {extra / 2**20:.0f} MiB over "
          f"SAE weights {sae_bytes / 2**20:.0f} MiB; {time.time() - started:.0f} s in all", flush=True)
    print(json.dumps({
        "real_step_ratio": round(median["on"] / median["off"], 3),
        "real_extra_mem_over_sae_weights": round(extra / sae_bytes, 3),
        "capture_mem_ratio": round(capture["ratio"], 4),
        "flop_ratio_run_shape": round(flop_ratio(args.model, args.rollouts, args.prompt_tokens,
                                                 args.completion_tokens, layers=args.layers,
                                                 amplified=0 if args.no_amplify else 1), 4),
        "amplify": not args.no_amplify,
        # 8 groups of 16 rollouts, one amplified per group (none with --no-amplify)
        "flop_ratio_1.7b_128x(256+2048)": round(flop_ratio("1.7b", 128, 256, 2048,
                                                           amplified=0 if args.no_amplify else 8), 4),
        "step_times_s": {arm: [round(t, 3) for t in v] for arm, v in times.items()},
        "model": f"Qwen3-{args.model}", "layers": depth, "sae_layer": sae_layer(args), "rollouts": args.rollouts,
        "prompt_tokens": args.prompt_tokens,
        "completion_tokens": args.completion_tokens, "capture_shape": [args.capture_rollouts, args.capture_prompt,
                                                                       args.capture_tokens, args.capture_d],
        "capture_same_activations": capture["same_activations"], "device": device_name(),
        "load_average": [round(load_start, 1), round(os.getloadavg()[0], 1)],
    }))


if __name__ == "__main__":
    main()
