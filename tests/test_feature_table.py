"""The top-features table: rows and decoded contexts, and a GRPO run logging it to each installed backend."""

import copy
import importlib.util
import json

import pytest
import torch
from test_grpo_trainer import prompt_dataset

from qscope_rl.features.detection import CompletionActivations
from qscope_rl.rewards import CodeSwitchJudge, NormalizedReward, RewardHackingGuard, SAECodeSwitchPenalty
from qscope_rl.trainers import SAEGRPOConfig, SAEGRPOTrainer
from qscope_rl.trainers.feature_table import COLUMNS, TABLE_KEY, feature_examples, feature_table_rows, markdown_table


class SpellTokens:
    """decode() writes token ids as letters, so contexts can be checked by eye: 0 -> a, 1 -> b, ..."""

    def decode(self, ids):
        return "".join(chr(ord("a") + int(i)) for i in ids)


def tiny_acts():
    # 2 completions x 6 tokens x k=2; feature 9 fires at (0, 4) = 2.0 and (1, 1) = 3.0, and at (1, 5) off the mask.
    indices = torch.zeros(2, 6, 2, dtype=torch.long)
    values = torch.zeros(2, 6, 2)
    indices[0, 4, 1], values[0, 4, 1] = 9, 2.0
    indices[1, 1, 0], values[1, 1, 0] = 9, 3.0
    indices[1, 5, 0], values[1, 5, 0] = 9, 9.0
    indices[0, 2, 0], values[0, 2, 0] = 5, 1.0
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 5] = False
    return CompletionActivations(values, indices, mask)


def test_examples_are_the_hardest_firing_contexts_decoded():
    ids = [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]
    tok = SpellTokens()
    # completion 1 first (3.0 > 2.0); the masked 9.0 does not count; context 2 tokens back, 2 after
    assert feature_examples(tiny_acts(), ids, tok, 9, n=3, context=2) == ["g[[h]]ij", "cd[[e]]f"]
    assert feature_examples(tiny_acts(), ids, tok, 9, n=1, context=8) == ["g[[h]]ij"]
    assert feature_examples(tiny_acts(), ids, tok, 7, n=3) == []  # never fires
    rows = feature_table_rows([{"id": 9, "rate": 0.2, "mean_activation": 2.5}, {"id": 5, "rate": 0.1,
                                                                                 "mean_activation": 1.0}],
                              tiny_acts(), ids, tok, step=7, n_examples=2, context=1)
    assert rows == [[7, 0, 9, 0.2, 2.5, "g[[h]]ij\nd[[e]]f"], [7, 1, 5, 0.1, 1.0, "b[[c]]de"]]
    table = markdown_table(rows)
    assert table.splitlines()[0] == "| " + " | ".join(COLUMNS) + " |"
    assert "g[[h]]ij<br>d[[e]]f" in table


BACKENDS = [b for b in ("wandb", "tensorboard", "trackio") if importlib.util.find_spec(b)]


@pytest.mark.slow
@pytest.mark.skipif(not BACKENDS, reason="no tracking backend installed")
def test_grpo_logs_the_table_to_every_installed_backend(world, pack_files, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    if "trackio" in BACKENDS:  # trackio reads TRACKIO_DIR at import (TRL imports it): point its storage here
        import trackio.sqlite_storage

        monkeypatch.setattr(trackio.sqlite_storage, "TRACKIO_DIR", tmp_path / "trackio")
        (tmp_path / "trackio").mkdir()
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    guard = RewardHackingGuard(SAECodeSwitchPenalty(pack_files["zh"]), CodeSwitchJudge(), baseline_rollouts=4,
                               window_rollouts=4)
    args = SAEGRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                         max_completion_length=12, max_steps=2, learning_rate=5e-4, bf16=False, report_to=BACKENDS,
                         logging_steps=1, save_strategy="no", use_cpu=True, seed=0, gradient_checkpointing=False,
                         sae_source=str(world.sae_dir), sae_layer=world.layer, code_switch_pack=str(pack_files["zh"]),
                         run_name="feature-table-test", project="qscope-test")
    trainer = SAEGRPOTrainer(model=copy.deepcopy(world.model), args=args, train_dataset=prompt_dataset(world),
                             processing_class=world.tokenizer,
                             reward_funcs=[NormalizedReward(SAECodeSwitchPenalty(pack_files["zh"])),
                                           NormalizedReward(guard, method="rank")])
    assert guard in trainer.callback_handler.callbacks  # found inside the wrapper: on_trip="stop" can stop training
    trainer.train()
    top = trainer.sae_top_features()
    assert 0 < len(top) <= args.sae_log_top_features
    keys = set().union(*trainer.state.log_history)
    for key in ("guard/sae_code_switch/sae_rate", "guard/sae_code_switch/judged_rate", "guard/sae_code_switch/tripped",
                "rewards/sae_code_switch_zscore/mean", "sae_code_switch_zscore/raw_mean",
                "rewards/sae_code_switch_rank/mean"):
        assert key in keys, key
    ids = {f["id"] for f in top}
    if "wandb" in BACKENDS:
        tables = sorted(tmp_path.glob("wandb/offline-run-*/files/media/table/sae/top_features_*.table.json"))
        by_step = {t["data"][0][0]: t for t in map(json.loads, (p.read_text() for p in tables))}
        assert sorted(by_step) == [1, 2]  # one table per log step
        assert by_step[2]["columns"] == list(COLUMNS) and {row[2] for row in by_step[2]["data"]} == ids
    if "tensorboard" in BACKENDS:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
        events.Reload()
        texts = events.Tensors(f"{TABLE_KEY}/text_summary")
        assert [t.step for t in texts] == [1, 2]
        last = texts[-1].tensor_proto.string_val[0].decode()
        assert last.startswith("| step | rank | feature") and all(f"| {i} |" in last for i in ids)
    if "trackio" in BACKENDS:
        assert_trackio_table(tmp_path / "trackio", ids)


def assert_trackio_table(folder, ids):
    import sqlite3

    from trackio.sqlite_storage import SQLiteStorage

    db = SQLiteStorage.get_project_db_path("qscope-test")
    assert db.parent == folder and db.exists(), f"trackio wrote no database under {folder}"
    with sqlite3.connect(db) as con:
        rows = [json.loads(m)[TABLE_KEY]["_value"] for (m,) in con.execute("SELECT metrics FROM metrics")
                if TABLE_KEY.encode() in bytes(m)]
    by_step = {table[0]["step"]: table for table in rows}
    assert sorted(by_step) == [1, 2]
    assert {row["feature"] for row in by_step[2]} == ids and list(by_step[2][0]) == list(COLUMNS)
