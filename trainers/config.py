"""SAE settings shared by the SAE trainers, the RL configs, and `SASFTConfig`.

`SAEArguments` holds only what the SAE machinery reads; each trainer config mixes it into TRL's own config,
so every TRL field still works and can be overridden from the command line.
"""

from __future__ import annotations

import copy
import math
from dataclasses import MISSING, dataclass, field, fields

from transformers import TrainingArguments
from trl import GRPOConfig, RLOOConfig, SFTConfig

CAPTURE_MODES = ("auto", "generation", "forward")
SAE_DTYPES = (None, "float32", "bfloat16", "float16")
AMPLIFY_BASELINES = ("group", "normal")


@dataclass
class SAESourceArguments:
    """Which SAE to load, as every SAE trainer config names it. With `sae_source=None` the trainer is its TRL parent."""

    sae_source: str | None = field(
        default=None,
        metadata={"help": "SAE to load with qscope_rl.load_sae: a local folder, a Hub repo id or a model name. "
                  "None disables every SAE feature: the trainer is its TRL parent."},
    )
    sae_layer: int | None = field(default=None, metadata={"help": "Decoder layer whose output the SAE reads."})
    sae_id: str | None = field(
        default=None,
        metadata={"help": "SAELens' name of one SAE in sae_source (SAE.from_pretrained(release, sae_id)): "
                  "'layer14' for Qwen-Scope (sets sae_layer), or the subfolder of cfg.json in a SAELens-format repo."},
    )
    sae_k: int | None = field(default=None, metadata={"help": "Override the SAE's k (TopK)."})
    sae_dtype: str | None = field(
        default=None, metadata={"help": "dtype of the frozen SAE (float32, bfloat16); default: as stored."})

    def validate_sae_source(self) -> None:
        if self.sae_dtype not in SAE_DTYPES:
            raise ValueError(f"sae_dtype={self.sae_dtype!r}: expected float32, bfloat16 or float16")
        self.validate_sae_id()

    def validate_sae_id(self) -> None:
        """Check ``sae_id`` against the source and layer without any download; a ``layer<L>`` id sets sae_layer."""
        from qscope_rl.sae.releases import parse_sae_id, release_for_saelens_name

        if self.sae_id is None:
            return
        if not isinstance(self.sae_id, str) or not self.sae_id.strip("/ "):
            raise ValueError(f"sae_id={self.sae_id!r}: expected the name of one SAE ('layer14', or a SAELens "
                             f"repo's subfolder)")
        if self.sae_source is None:
            raise ValueError(f"sae_id={self.sae_id!r} needs sae_source (the release or repo it names an SAE of)")
        try:
            id_layer = parse_sae_id(self.sae_id)
        except ValueError:
            if release_for_saelens_name(str(self.sae_source)) is not None:
                raise  # a Qwen-Scope release names its SAEs layer<L> only
            return  # a subfolder of a SAELens-format repo: its cfg.json says the layer
        if self.sae_layer is not None and self.sae_layer != id_layer:
            raise ValueError(f"sae_id={self.sae_id!r} is layer {id_layer}, but sae_layer={self.sae_layer}: give "
                             f"one of them, or the same layer")
        self.sae_layer = id_layer


@dataclass
class SAEArguments(SAESourceArguments):
    """The SAE fields of an RL trainer config: the SAE, its packs, the auxiliary loss and amplified sampling."""

    sae_capture: str = field(
        default="auto",
        metadata={"help": "How rollouts are encoded: 'generation' captures the residual while rollouts are "
                  "generated (HF generate, or inside vLLM with vllm_mode='colocate'; no extra forward), 'forward' "
                  "runs one no-grad forward that stops after the SAE layer (vLLM server, tools), 'auto' picks "
                  "'generation' when it can."},
    )
    code_switch_pack: str | None = field(
        default=None,
        metadata={"help": "Feature pack (JSON) of the UNWANTED language's features: drives sae/code_switch_rate "
                  "and is the default pack of the auxiliary loss."},
    )
    repetition_pack: str | None = field(
        default=None, metadata={"help": "Feature pack (JSON) of repetition features: drives sae/repetition_rate."})
    repetition_probe: str | None = field(
        default=None,
        metadata={"help": "Completion probe (.safetensors from `qscope-rl features probe`, e.g. looping vs clean "
                  "texts): drives sae/repetition_probe_rate, the share of rollouts it calls positive."},
    )
    sae_detect_threshold: float = field(
        default=0.0, metadata={"help": "A completion counts as flagged when its SAE score exceeds this."})
    aux_loss_weight: float = field(
        default=0.0,
        metadata={"help": "lambda of the SASFT term lambda * sum_s ReLU(pre_s - alpha_s) on completion tokens; "
                  "0 disables it."},
    )
    aux_loss_pack: str | None = field(
        default=None, metadata={"help": "Features of the auxiliary loss; default: code_switch_pack."})
    aux_loss_use_alpha: bool = field(
        default=True,
        metadata={"help": "Subtract each feature's mean pre-activation (SASFT alpha); False suppresses any "
                  "positive pre-activation (generic suppression)."},
    )
    amplify_pack: str | None = field(
        default=None,
        metadata={"help": "Feature pack to amplify in a few rollouts per group (Qwen-Scope RL recipe), e.g. a "
                  "repetition pack. None disables amplified sampling."},
    )
    amplify_alpha: float = field(
        default=4.0, metadata={"help": "Strength alpha of h + alpha * d for each amplified feature."})
    amplify_top_n: int = field(default=1, metadata={"help": "How many of the pack's top features to amplify."})
    amplify_num_rollouts: int = field(
        default=1, metadata={"help": "m: rollouts per group of num_generations generated with amplification."})
    amplify_importance_cap: float | None = field(
        default=3.0,
        metadata={"help": "Amplified rollouts are samples of the steered policy, not of the policy being trained: "
                  "each of their tokens' loss is weighted by min(pi/mu, cap), pi the policy's and mu the steered "
                  "policy's probability of the token (truncated importance sampling, as TRL corrects vLLM's sampler; "
                  "cap as TRL's vllm_importance_sampling_clip_max). None treats them as on-policy samples."},
    )
    amplify_baseline: str = field(
        default="group",
        metadata={"help": "GRPO's baseline for groups with amplified rollouts: 'group' (TRL's: mean and std over "
                  "all of the group's rollouts) or 'normal' (over its normal rollouts only, so that the amplified "
                  "rollouts' low rewards do not shift and scale the normal rollouts' advantages; the amplified "
                  "ones are scored against the same baseline). GRPO only, with "
                  "multi_objective_aggregation='sum_then_normalize'."},
    )
    sae_log_top_features: int = field(
        default=3, metadata={"help": "How many of the most active problem features to log each step."})
    sae_feature_table_examples: int = field(
        default=3,
        metadata={"help": "Decoded rollout contexts per feature in the top-features table sent to report_to "
                  "(wandb, trackio, tensorboard) at each log; 0 turns the table off."},
    )

    def validate_sae_args(self, num_generations: int | None) -> None:
        if self.sae_capture not in CAPTURE_MODES:
            raise ValueError(f"sae_capture={self.sae_capture!r}: expected one of {CAPTURE_MODES}")
        uses_sae = any([self.code_switch_pack, self.repetition_pack, self.repetition_probe, self.aux_loss_weight,
                        self.amplify_pack])
        if self.sae_source is None:
            self.validate_sae_id()  # a sae_id without a source is an error, not silently ignored
        if uses_sae and self.sae_source is None:
            raise ValueError("code_switch_pack / repetition_pack / repetition_probe / aux_loss_weight / amplify_pack "
                             "need sae_source")
        if self.sae_source is None:
            return
        self.validate_sae_source()
        for name in ("sae_detect_threshold", "aux_loss_weight", "amplify_alpha"):
            if not math.isfinite(getattr(self, name)):  # NaN passes every < / > check and poisons each step
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
        if self.sae_feature_table_examples < 0:
            raise ValueError(f"sae_feature_table_examples must be >= 0, got {self.sae_feature_table_examples}")
        if self.aux_loss_weight < 0:
            raise ValueError(f"aux_loss_weight must be >= 0, got {self.aux_loss_weight}")
        if self.aux_loss_weight > 0 and not (self.aux_loss_pack or self.code_switch_pack):
            raise ValueError("aux_loss_weight > 0 needs aux_loss_pack or code_switch_pack")
        if self.amplify_pack is not None:
            if num_generations is not None and num_generations < 2:
                raise ValueError(f"amplified sampling needs num_generations >= 2 (got {num_generations}): each "
                                 f"group must keep normal rollouts beside the amplified ones")
            if not 1 <= self.amplify_num_rollouts < (num_generations or 2):
                raise ValueError(f"amplify_num_rollouts must be in 1..num_generations-1, got "
                                 f"{self.amplify_num_rollouts} with num_generations={num_generations}")
            if self.amplify_top_n < 1:
                raise ValueError(f"amplify_top_n must be >= 1, got {self.amplify_top_n}")
            if self.amplify_importance_cap is not None and not self.amplify_importance_cap > 0:
                raise ValueError(f"amplify_importance_cap must be > 0 or None, got {self.amplify_importance_cap}")
        if self.amplify_baseline not in AMPLIFY_BASELINES:
            raise ValueError(f"amplify_baseline={self.amplify_baseline!r}: expected one of {AMPLIFY_BASELINES}")
        if self.amplify_baseline == "normal" and self.amplify_pack is not None and num_generations is not None \
                and num_generations - self.amplify_num_rollouts < 2:
            raise ValueError(f"amplify_baseline='normal' needs >= 2 normal rollouts per group for their mean and "
                             f"std, got num_generations={num_generations} with amplify_num_rollouts="
                             f"{self.amplify_num_rollouts}")
        if getattr(self, "use_vllm", False) and getattr(self, "vllm_mode", None) == "server":
            # A vLLM server is another process: no hook reaches its model (vllm_mode='colocate' is hooked).
            if self.amplify_pack is not None:
                raise ValueError("amplify_pack needs hooks inside the generating model, which vllm_mode='server' "
                                 "runs in another process: use vllm_mode='colocate' (or use_vllm=False)")
            if self.sae_capture == "generation":
                raise ValueError("sae_capture='generation' is impossible with vllm_mode='server' (another "
                                 "process): use vllm_mode='colocate', or sae_capture='forward' / 'auto'")


@dataclass
class SAEGRPOConfig(GRPOConfig, SAEArguments):
    """`trl.GRPOConfig` plus the SAE fields of `SAEArguments`."""

    def __post_init__(self):
        self.validate_sae_args(self.num_generations)  # before TRL's checks, so SAE errors name SAE fields
        if self.amplify_baseline == "normal" and self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError("amplify_baseline='normal' recomputes the baseline of the summed reward "
                             "(multi_objective_aggregation='sum_then_normalize'); with "
                             f"{self.multi_objective_aggregation!r} use amplify_baseline='group'")
        super().__post_init__()


@dataclass
class SAERLOOConfig(RLOOConfig, SAEArguments):
    """`trl.RLOOConfig` plus the SAE fields of `SAEArguments`."""

    def __post_init__(self):
        self.validate_sae_args(self.num_generations)  # before TRL's checks, so SAE errors name SAE fields
        if self.amplify_baseline != "group":
            raise ValueError("amplify_baseline='normal' is for GRPO: RLOO's baseline is each rollout's "
                             "leave-one-out mean, not a group statistic; use amplify_baseline='group'")
        super().__post_init__()


def sae_trainer_config(config_class: type, args, model, trainer_name: str, trainer: str | None = None):
    """The config an SAE RL trainer runs with, checked before its TRL parent sets anything up: ``args`` itself when it
    is a ``config_class``; ``None`` builds its default, named after the model as TRL names its own
    (``"<model>-GRPO"``); the parent's plain config (a `trl.GRPOConfig` of a script or test written for TRL) runs as
    the parent: a copy with the SAE fields at their defaults, so no SAE (the caller's object is not changed);
    anything else is refused."""
    if args is None:
        from trl.trainer.utils import get_config_model_id

        name = model if isinstance(model, str) else get_config_model_id(model.config)
        return config_class(output_dir=f"{name.split('/')[-1]}-{trainer_name}")
    if isinstance(args, config_class):
        return args
    parent = next(base for base in config_class.__mro__[1:] if issubclass(base, TrainingArguments))
    if isinstance(args, parent):
        adopted = copy.copy(args)  # TRL's set-up writes to its args: not to the caller's
        adopted.__class__ = config_class
        own = {f.name for f in fields(type(args))}
        for f in fields(config_class):
            if f.name not in own:
                setattr(adopted, f.name, f.default_factory() if f.default is MISSING else f.default)
        return adopted
    trainer = trainer or f"SAE{trainer_name}Trainer"
    article = "an" if config_class.__name__.startswith("SAE") else "a"
    raise TypeError(f"{trainer} needs {article} {config_class.__name__} (TRL's own config plus the SAE fields) or a "
                    f"{parent.__name__}, got {type(args).__name__}")


SASFT_ALPHAS = ("pack", "zero")


@dataclass
class SASFTConfig(SFTConfig, SAESourceArguments):
    """`trl.SFTConfig` plus what `SASFTTrainer` reads: the SAE, the unwanted-language pack, lambda and alpha."""

    sasft_pack: str | None = field(
        default=None,
        metadata={"help": "Feature pack (JSON) of the UNWANTED language's features, e.g. the 'zh' pack when "
                  "training on English."},
    )
    sasft_top_n: int | None = field(
        default=None, metadata={"help": "Use only the pack's first n features (default: all of them)."})
    sasft_lambda: float = field(
        default=0.1, metadata={"help": "lambda of CE + lambda * sum_s ReLU(pre_s - alpha_s) (label tokens)."})
    sasft_alpha: str = field(
        default="pack",
        metadata={"help": "alpha_s: 'pack' = each feature's mean pre-activation from the pack (SASFT), 'zero' = "
                  "0 (suppress any positive pre-activation)."},
    )

    def __post_init__(self):
        if self.sasft_pack is not None and self.sae_source is None:
            raise ValueError("sasft_pack needs sae_source")
        if self.sae_source is not None and self.sasft_pack is None:
            raise ValueError("sae_source is set but sasft_pack is not: SASFT needs the unwanted-language pack")
        if not (math.isfinite(self.sasft_lambda) and self.sasft_lambda >= 0):
            raise ValueError(f"sasft_lambda must be a finite number >= 0, got {self.sasft_lambda}")
        if self.sasft_alpha not in SASFT_ALPHAS:
            raise ValueError(f"sasft_alpha={self.sasft_alpha!r}: expected one of {SASFT_ALPHAS}")
        if self.sasft_top_n is not None and self.sasft_top_n < 1:
            raise ValueError(f"sasft_top_n must be >= 1, got {self.sasft_top_n}")
        self.validate_sae_source()
        super().__post_init__()
