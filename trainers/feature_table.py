"""The top problem features of the last rollouts as a table for ``report_to``: wandb, trackio, tensorboard.

One row per feature the trainer reports (`SAETrainerMixin.sae_top_features`: id, firing rate over every
process's completion tokens, mean activation where it fires) plus a few decoded contexts from this process's
rollouts where it fires hardest, the firing token in ``[[ ]]``. Logged at every log step the way TRL logs its
completions table (``wandb.Table`` / ``trackio.Table`` under the key ``sae/top_features``); tensorboard, which has
no tables, gets the same rows as a markdown text summary. Nothing is sent anywhere a backend would not send its
own logs: with ``WANDB_MODE=offline`` the table lands in the offline run like every other metric.
"""

from __future__ import annotations

import importlib.util

import torch

TABLE_KEY = "sae/top_features"
COLUMNS = ("step", "rank", "feature", "rate", "mean_activation", "examples")
TABLE_BACKENDS = ("wandb", "trackio", "tensorboard")


def feature_examples(acts, completion_ids: list[list[int]], tokenizer, feature: int, n: int = 3,
                     context: int = 8) -> list[str]:
    """Up to ``n`` contexts (from different completions) where ``feature`` fires hardest: the ``context`` tokens
    before the firing token, the token itself in ``[[ ]]``, and the two after it, decoded."""
    hit = (acts.indices == feature) & (acts.values > 0) & acts.mask.unsqueeze(-1)  # (B, T, k)
    strength = (acts.values * hit).sum(-1)  # (B, T)
    best, where = strength.max(-1)  # (B,) the hardest firing token of each completion
    examples = []
    for row in best.argsort(descending=True, stable=True).tolist()[:n]:
        if best[row] <= 0:
            break
        t, ids = int(where[row]), completion_ids[row]
        before = tokenizer.decode(ids[max(t - context, 0):t])
        token, after = tokenizer.decode(ids[t:t + 1]), tokenizer.decode(ids[t + 1:t + 3])
        examples.append(f"{before}[[{token}]]{after}".replace("\n", " "))
    return examples


def feature_table_rows(top_features: list[dict], acts, completion_ids, tokenizer, step: int, n_examples: int = 3,
                       context: int = 8) -> list[list]:
    """Rows in `COLUMNS` order for the features of ``top_features`` (``[{"id", "rate", "mean_activation"}]``)."""
    rows = []
    for rank, feature in enumerate(top_features):
        examples = feature_examples(acts, completion_ids, tokenizer, int(feature["id"]), n_examples, context)
        rows.append([step, rank, int(feature["id"]), float(feature["rate"]), float(feature["mean_activation"]),
                     "\n".join(examples)])
    return rows


def markdown_table(rows: list[list]) -> str:
    """The rows as a markdown table (tensorboard renders text summaries as markdown)."""
    escape = lambda v: str(v).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [f"{v:.4g}" if isinstance(v, float) else escape(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def log_feature_table(rows: list[list], report_to, step: int, callbacks=()) -> list[str]:
    """Send the rows to each table backend in ``report_to`` that is running; returns the backends used.

    wandb: only into an active run (``wandb.run``); trackio: like TRL's completions table; tensorboard: through
    the `TensorBoardCallback` among ``callbacks`` (its writer, its log dir)."""
    report_to = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if "all" in report_to:
        report_to = [b for b in TABLE_BACKENDS if importlib.util.find_spec(b if b != "tensorboard" else "tensorboard")]
    used = []
    if "wandb" in report_to and importlib.util.find_spec("wandb"):
        import wandb

        if wandb.run is not None:
            wandb.log({TABLE_KEY: wandb.Table(columns=list(COLUMNS), data=rows), "train/global_step": step})
            used.append("wandb")
    if "trackio" in report_to and importlib.util.find_spec("trackio"):
        import pandas as pd
        import trackio

        trackio.log({TABLE_KEY: trackio.Table(dataframe=pd.DataFrame(rows, columns=list(COLUMNS))),
                     "train/global_step": step})
        used.append("trackio")
    if "tensorboard" in report_to:
        writer = next((getattr(cb, "tb_writer", None) for cb in callbacks
                       if type(cb).__name__ == "TensorBoardCallback"), None)
        if writer is not None:
            writer.add_text(TABLE_KEY, markdown_table(rows), step)
            writer.flush()
            used.append("tensorboard")
    return used


class FeatureTableMixin:
    """`log` also sends the top-features table (main process only, at most once per generation batch).

    Needs `sae_top_features()`, `self._rollout_acts`, `self._rollout_completion_ids` (set by `SAETrainerMixin`)
    and ``args.sae_feature_table_examples`` (0 turns the table off)."""

    _table_logged_for = None

    def log(self, logs, start_time=None):
        super().log(logs, start_time)
        self._log_feature_table()

    def _log_feature_table(self) -> None:
        n_examples = getattr(self.args, "sae_feature_table_examples", 0)
        acts, completion_ids = getattr(self, "_rollout_acts", None), getattr(self, "_rollout_completion_ids", None)
        if (self.sae is None or acts is None or n_examples <= 0 or not self.accelerator.is_main_process
                or self._table_logged_for is acts):
            return
        top = self.sae_top_features()
        if not top:
            return
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        with torch.no_grad():
            rows = feature_table_rows(top, acts, completion_ids, tokenizer, self.state.global_step, n_examples)
        log_feature_table(rows, self.args.report_to, self.state.global_step, self.callback_handler.callbacks)
        self._table_logged_for = acts
