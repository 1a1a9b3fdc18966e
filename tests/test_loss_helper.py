"""SAELossHelper in hand-written loops: parity with FeatureAuxLoss, clear errors, and a minimal PPO-style loop
(TRL removed PPOTrainer) that uses the helper and SAEMonitor."""

import copy

import pytest
import torch
from torch.testing import assert_close

from qscope_rl import capture_residual, load_sae
from qscope_rl.features.aux_loss import FeatureAuxLoss
from qscope_rl.rewards import LanguageConsistencyReward
from qscope_rl.trainers import SAELossHelper, SAEMonitor


@pytest.fixture(scope="module")
def sae(world):
    return load_sae(world.sae_dir, layer=world.layer)


def test_helper_matches_feature_aux_loss_and_refuses_bad_input(world, sae, packs):
    model = world.model
    batch = world.tokenizer([d.text for d in world.documents("train")[:4]], return_tensors="pt", padding=True)
    helper = SAELossHelper(model, sae, packs["zh"], weight=0.5)
    with pytest.raises(RuntimeError, match="no forward was captured"):
        helper.loss()
    with helper.capture():
        model(**batch)
    with torch.no_grad(), capture_residual(model, world.layer) as cap:
        model(**batch)
    reference = FeatureAuxLoss(sae, packs["zh"].ids, packs["zh"].alphas, weight=0.5)(cap.last, batch["attention_mask"])
    assert_close(helper.loss(batch["attention_mask"]), reference)
    with pytest.raises(ValueError, match="layer 9 does not exist"):
        SAELossHelper(model, sae, packs["zh"], layer=9)
    with pytest.raises(ValueError, match="mask must be"):
        helper.loss(torch.ones(3, 2))


def test_minimal_ppo_loop_with_helper_and_monitor(world, sae, packs):
    """Clipped-ratio policy gradient on sampled completions + the SAE term; the monitor watches held-out prompts."""
    tok = world.tokenizer
    policy = copy.deepcopy(world.model).train()
    helper = SAELossHelper(policy, sae, packs["zh"].ids, weight=1.0)  # ids: alpha = 0, plain suppression
    monitor = SAEMonitor(sae, tok, prompts=[p.text for p in world.prompts("heldout", lang="en")[:4]],
                         code_switch_pack=packs["zh"], max_new_tokens=8)
    before = monitor.measure(policy)
    prompts = [p.text for p in world.prompts("train", lang="en")[:4]]
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        policy.eval()
        seq = policy.generate(**enc, max_new_tokens=10, do_sample=True, top_k=0, pad_token_id=tok.pad_token_id)
        policy.train()
    P = enc["input_ids"].shape[1]
    completion = seq[:, P:]
    is_eos = completion == tok.eos_token_id
    completion_mask = ((is_eos.long().cumsum(1) - is_eos.long()) == 0).float()  # (B, T) up to the first EOS
    attention_mask = torch.cat([enc["attention_mask"], completion_mask.long()], dim=1)
    rewards = torch.tensor(LanguageConsistencyReward("en")(completions=tok.batch_decode(completion)))
    advantages = (rewards - rewards.mean())[:, None]  # (B, 1)

    def logps(model):
        logits = model(input_ids=seq, attention_mask=attention_mask).logits[:, P - 1:-1]
        return torch.log_softmax(logits.float(), -1).gather(-1, completion[..., None]).squeeze(-1)  # (B, T)

    with torch.no_grad():
        old = logps(policy)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3)
    aux_values = []
    for _ in range(3):  # PPO epochs on the same rollouts
        with helper.capture():
            new = logps(policy)
        ratio = (new - old).exp()
        clipped = -torch.min(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages)
        pg = (clipped * completion_mask).sum() / completion_mask.sum()
        loss = pg + helper.loss(completion_mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        aux_values.append(helper.last_value.item())
    assert aux_values[-1] < aux_values[0]
    after = monitor.measure(policy)
    assert set(before) == set(after) == {"sae/probe/code_switch_rate"} and policy.training
