"""Watch SAE feature rates on a fixed probe set during any training loop, and warn or stop when one crosses a limit.

`SAEMonitor` is the measurement: it samples completions of fixed prompts with the model (or reads fixed
texts), encodes them with the SAE, and returns feature rates. `SAEMonitorCallback` runs it every N steps
inside any transformers `Trainer` (SFT, DPO, GRPO, RLOO, a plain `Trainer`); a hand-written loop calls
`SAEMonitor.measure(model)` itself.

A callback only observes: it cannot change the loss. To train against features use `SAEGRPOTrainer` /
`SAERLOOTrainer` (SAE rewards, auxiliary loss), `SASFTTrainer` (the SASFT loss), or `SAELossHelper` in your
own loop.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers import TrainerCallback
from trl.models import unwrap_model_for_generation

from qscope_rl.features.detection import code_switch_scores, encode_completions, repetition_scores
from qscope_rl.features.feature_pack import FeaturePack
from qscope_rl.hooks import capture_residual, hidden_size
from qscope_rl.sae.autoencoder import SparseAutoencoder
from qscope_rl.sae.loaders import load_sae
from qscope_rl.tools.steered_generation import sampling_kwargs

ON_LIMIT = ("warn", "stop")


def _as_pack(pack: FeaturePack | str | None) -> FeaturePack | None:
    return FeaturePack.load(pack) if isinstance(pack, str) or hasattr(pack, "__fspath__") else pack


class SAEMonitor:
    """Feature rates of a fixed probe set under a model.

    ``prompts``: completions are sampled from them with the model being trained (``max_new_tokens``,
    ``temperature``, a fixed ``seed``), and only completion tokens are encoded; ``texts``: the texts
    themselves are encoded. Metrics (each under ``prefix``):

    - ``code_switch_rate``: share of probes whose code-switch score (unwanted-language pack) > ``threshold``;
    - ``repetition_rate``: share of probes whose repetition score > ``threshold``;
    - ``feature_<id>_rate``: share of probe tokens on which feature ``id`` fires.

    ``limits`` maps metric names (with or without the prefix) to the largest acceptable value.

    Example::

        monitor = SAEMonitor(sae, tokenizer, prompts=held_out, code_switch_pack="zh.json",
                             limits={"code_switch_rate": 0.2})
        metrics = monitor.measure(model)
        too_high = monitor.crossed(metrics)
    """

    def __init__(self, sae: SparseAutoencoder | str, tokenizer, *, prompts: Sequence[str] | None = None,
                 texts: Sequence[str] | None = None, layer: int | None = None,
                 code_switch_pack: FeaturePack | str | None = None, repetition_pack: FeaturePack | str | None = None,
                 features: Sequence[int] = (), threshold: float = 0.0, limits: dict[str, float] | None = None,
                 max_new_tokens: int = 32, temperature: float = 1.0, seed: int = 0, batch_size: int = 16,
                 prefix: str = "sae/probe/"):
        if (prompts is None) == (texts is None):
            raise ValueError("give the probe set as either prompts= (completions are sampled) or texts= (read)")
        probes = list(prompts if prompts is not None else texts)
        if not probes:
            raise ValueError("the probe set is empty: give at least one prompt or text")
        self.sae = load_sae(sae, layer) if isinstance(sae, str) else sae
        self.layer = self.sae.layer if layer is None else layer
        if self.layer is None:
            raise ValueError("the SAE does not say which layer it reads: pass layer=")
        self.code_switch_pack, self.repetition_pack = _as_pack(code_switch_pack), _as_pack(repetition_pack)
        for pack in (self.code_switch_pack, self.repetition_pack):
            if pack is not None:
                pack.check_compatible(self.sae, layer=self.layer)
        self.features = [int(f) for f in features]
        bad = [f for f in self.features if not 0 <= f < self.sae.d_sae]
        if bad:
            raise ValueError(f"features {bad} out of range for an SAE with d_sae={self.sae.d_sae}")
        if self.code_switch_pack is None and self.repetition_pack is None and not self.features:
            raise ValueError("nothing to monitor: give code_switch_pack, repetition_pack or features")
        self.tokenizer, self.probes, self.sample = tokenizer, probes, prompts is not None
        self.threshold, self.prefix = threshold, prefix
        self.max_new_tokens, self.temperature, self.seed, self.batch_size = max_new_tokens, temperature, seed, \
            batch_size
        self.limits = {(k if k.startswith(prefix) else prefix + k): float(v) for k, v in (limits or {}).items()}
        unknown = sorted(set(self.limits) - set(self.metric_names))
        if unknown:
            raise ValueError(f"limits on unknown metrics {unknown}; this monitor logs {self.metric_names}")

    @property
    def metric_names(self) -> list[str]:
        names = ["code_switch_rate"] if self.code_switch_pack is not None else []
        names += ["repetition_rate"] if self.repetition_pack is not None else []
        names += [f"feature_{f}_rate" for f in self.features]
        return [self.prefix + n for n in names]

    @torch.no_grad()
    def measure(self, model: nn.Module) -> dict[str, float]:
        """Sample (or read) the probe set with ``model`` and return the feature rates (model mode restored)."""
        if self.sae.d_in != hidden_size(model):
            raise ValueError(f"the SAE has d_in={self.sae.d_in}, the model's hidden size is {hidden_size(model)}")
        was_training = model.training
        model.eval()
        flagged = {name: [] for name in self.metric_names}
        fires, tokens = torch.zeros(len(self.features)), 0
        try:
            for start in range(0, len(self.probes), self.batch_size):
                acts = self._encode_batch(model, self.probes[start:start + self.batch_size])
                if self.code_switch_pack is not None:
                    score = code_switch_scores(acts, self.code_switch_pack).per_completion
                    flagged[self.prefix + "code_switch_rate"] += (score > self.threshold).tolist()
                if self.repetition_pack is not None:
                    score = repetition_scores(acts, self.repetition_pack).per_completion
                    flagged[self.prefix + "repetition_rate"] += (score > self.threshold).tolist()
                if self.features:
                    ids = torch.tensor(self.features, device=acts.indices.device)
                    on = ((acts.indices.unsqueeze(-1) == ids) & (acts.values.unsqueeze(-1) > 0)).any(-2)  # (B, T, f)
                    fires += (on & acts.mask.unsqueeze(-1)).sum((0, 1)).float().cpu()
                    tokens += int(acts.mask.sum())
        finally:
            model.train(was_training)
        metrics = {name: sum(v) / len(v) for name, v in flagged.items() if v}
        for f, count in zip(self.features, fires.tolist()):
            metrics[f"{self.prefix}feature_{f}_rate"] = count / max(tokens, 1)
        return metrics

    def crossed(self, metrics: dict[str, float]) -> dict[str, float]:
        """The metrics above their limit, with their values."""
        return {k: metrics[k] for k, limit in self.limits.items() if k in metrics and metrics[k] > limit}

    def _encode_batch(self, model: nn.Module, probes: list[str]):
        device = next(model.parameters()).device
        tok = self.tokenizer
        # Sampling continues from the last column: left-pad, or generation continues after pad tokens.
        side, tok.padding_side = tok.padding_side, "left" if self.sample else tok.padding_side
        try:
            enc = tok(probes, return_tensors="pt", padding=True, add_special_tokens=not self.sample).to(device)
        finally:
            tok.padding_side = side
        if self.sample:
            input_ids, attention_mask, region = self._sample(model, enc)
        else:
            input_ids, attention_mask, region = enc["input_ids"], enc["attention_mask"], enc["attention_mask"]
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding does not shift positions
        with capture_residual(model, self.layer) as cap:
            model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        hidden = cap.last[:, -region.shape[1]:]  # (B, T, d)
        return encode_completions(self.sae, hidden.to(self.sae.W_enc.device), region.bool().to(self.sae.W_enc.device),
                                  chunk_tokens=self.sae.memory_bounded_chunk())

    def _sample(self, model: nn.Module, enc) -> tuple[Tensor, Tensor, Tensor]:
        """Sampled completions: prompt + completion ids, their attention mask, and the completion mask."""
        tok = self.tokenizer
        sampling = sampling_kwargs(self.temperature)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            out = model.generate(**enc, max_new_tokens=self.max_new_tokens, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id, **sampling)
        completion = out[:, enc["input_ids"].shape[1]:]  # (B, T)
        is_eos = completion == tok.eos_token_id
        region = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # up to and including the first EOS
        attention_mask = torch.cat([enc["attention_mask"], region.long()], dim=1)
        return out, attention_mask, region.long()


class SAEMonitorCallback(TrainerCallback):
    """Every ``every_n_steps`` optimizer steps, measure an `SAEMonitor` and log its rates; warn or stop on limits.

    Works with any transformers `Trainer`. TRL trainers get the rates appended to ``trainer._metrics["train"]``
    (logged and averaged with the trainer's next log, to whatever ``report_to`` names); other trainers get
    them through ``trainer.log``. When a rate crosses its limit it warns, and with ``on_limit="stop"`` sets
    ``control.should_training_stop``. ``sae`` defaults to the trainer's own SAE (SAE trainers), ``tokenizer``
    to its ``processing_class``; other keyword arguments go to `SAEMonitor`.

    A callback cannot change the loss: to train against features use `SAEGRPOTrainer` / `SAERLOOTrainer`,
    `SASFTTrainer`, or `SAELossHelper` in a hand-written loop.

    Multi-process: every rank measures the whole probe set with the same seed and weights, so every rank
    gets the same rates and takes the same stop decision. The model is reached through TRL's
    `unwrap_model_for_generation` (it gathers ZeRO-3 parameters for generation).

    Example::

        trainer.add_callback(SAEMonitorCallback(trainer, prompts=held_out, code_switch_pack="zh.json",
                                                every_n_steps=50, limits={"code_switch_rate": 0.2}))
    """

    def __init__(self, trainer, sae: SparseAutoencoder | str | None = None, *, every_n_steps: int = 10,
                 on_limit: str = "warn", layer: int | None = None, tokenizer=None, **monitor_kwargs):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if on_limit not in ON_LIMIT:
            raise ValueError(f"on_limit={on_limit!r}: expected one of {ON_LIMIT}")
        if sae is None:
            sae, layer = getattr(trainer, "sae", None), getattr(trainer, "sae_layer", None) if layer is None else layer
            if sae is None:
                raise ValueError(f"{type(trainer).__name__} has no SAE: pass sae= (an SAE or a source to load)")
        tokenizer = tokenizer or getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
        if tokenizer is None:
            raise ValueError(f"{type(trainer).__name__} has no processing_class: pass tokenizer=")
        self.trainer, self.every_n_steps, self.on_limit = trainer, every_n_steps, on_limit
        self.monitor = SAEMonitor(sae, tokenizer, layer=layer, **monitor_kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_n_steps:
            return control
        trainer = self.trainer
        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as model:
            metrics = self.monitor.measure(model)
        if isinstance(getattr(trainer, "_metrics", None), dict) and "train" in trainer._metrics:
            for name, value in metrics.items():
                trainer._metrics["train"][name].append(value)
        else:
            trainer.log(dict(metrics))
        crossed = self.monitor.crossed(metrics)
        if crossed:
            action = "stopping training" if self.on_limit == "stop" else "continuing"
            warnings.warn(f"SAE monitor at step {state.global_step}: {crossed} above the limits "
                          f"{ {k: self.monitor.limits[k] for k in crossed} }; {action}", stacklevel=2)
            if self.on_limit == "stop":
                control.should_training_stop = True
        return control
