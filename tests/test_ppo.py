"""The PPO core (worldloom.rl): GAE against a direct sum, losses against hand-worked numbers,
clipping's zero gradients, the exact KL to the reference."""

from __future__ import annotations

import math

import pytest
import torch

from worldloom.errors import ConfigError
from worldloom.rl import PPOConfig, ValueHead, categorical_terms, gae, ppo_loss


def direct_gae(rewards, values, dones, last_value, gamma, lam):
    """A_t = Σ_k (γλ)^k δ_{t+k}, summed forward until the episode ends (the done step included)."""
    T, N = rewards.shape
    adv = torch.zeros(T, N)
    for n in range(N):
        for t in range(T):
            total, scale = 0.0, 1.0
            for k in range(t, T):
                nxt = 0.0 if dones[k, n] else (values[k + 1, n] if k + 1 < T else last_value[n])
                delta = rewards[k, n] + gamma * nxt - values[k, n]
                total += scale * float(delta)
                if dones[k, n]:
                    break
                scale *= gamma * lam
            adv[t, n] = total
    return adv


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_matches_a_direct_sum(seed):
    g = torch.Generator().manual_seed(seed)
    T, N = 9, 4
    rewards, values = torch.randn(T, N, generator=g), torch.randn(T, N, generator=g)
    dones = torch.rand(T, N, generator=g) < 0.25
    dones[3, 0] = dones[8, 1] = True  # an episode ending mid-rollout, one ending at the last step
    dones[:, 2] = False  # one env whose episode runs past the rollout (bootstrapped)
    last_value = torch.randn(N, generator=g)
    adv, ret = gae(rewards, values, dones, last_value, 0.97, 0.9)
    want = direct_gae(rewards, values, dones, last_value, 0.97, 0.9)
    assert torch.allclose(adv, want, atol=1e-5)
    assert torch.allclose(ret, want + values, atol=1e-5)


def test_gae_one_step_by_hand():
    # one env, two steps, the second ends the episode: δ_1 = 1 − 0.5 = 0.5 (no bootstrap past the end),
    # δ_0 = 0 + 0.9·0.5 − 0.2 = 0.25, A_0 = 0.25 + 0.9·0.8·0.5 = 0.61
    adv, ret = gae(torch.tensor([[0.0], [1.0]]), torch.tensor([[0.2], [0.5]]), torch.tensor([[False], [True]]),
                   torch.tensor([100.0]), 0.9, 0.8)
    assert adv[:, 0].tolist() == pytest.approx([0.61, 0.5])
    assert ret[:, 0].tolist() == pytest.approx([0.81, 1.0])


def test_gae_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="share one"):
        gae(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 1), torch.zeros(2), 0.9, 0.9)


CFG = PPOConfig(clip=0.2, value_clip=0.2, vf_coef=0.5, ent_coef=0.01, kl_coef=0.1, norm_adv=False)


def loss_inputs(requires_grad=False):
    old = torch.tensor([-1.0, -2.0])
    new = (old + torch.tensor([math.log(1.5), math.log(0.9)])).requires_grad_(requires_grad)  # ratios 1.5, 0.9
    return dict(new_logp=new, old_logp=old, advantages=torch.tensor([1.0, -2.0]), new_values=torch.tensor([1.0, 0.0]),
                old_values=torch.tensor([0.5, 0.1]), returns=torch.tensor([2.0, 0.0]), entropy=torch.tensor([1.0, 0.5]),
                kl_ref=torch.tensor([0.2, 0.0]))


def test_ppo_loss_by_hand():
    out = ppo_loss(**loss_inputs(), cfg=CFG)
    # policy: sample 1 min(1.5·1, 1.2·1) = 1.2; sample 2 min(0.9·−2, 0.9·−2) = −1.8 (0.9 is inside the clip range)
    #   L_clip = −(1.2 − 1.8)/2 = 0.3
    assert out.parts["policy"] == pytest.approx(0.3)
    # value: sample 1 (1 − 2)² = 1, clipped V = 0.5 + 0.2 = 0.7 -> (0.7 − 2)² = 1.69, max 1.69;
    #   sample 2 (0 − 0)² = 0, clipped 0.1 − 0.1 = 0 -> 0; L_value = ½·(1.69 + 0)/2 = 0.4225
    assert out.parts["value"] == pytest.approx(0.4225)
    assert out.parts["entropy"] == pytest.approx(0.75) and out.parts["kl"] == pytest.approx(0.1)
    # total = 0.3 + 0.5·0.4225 − 0.01·0.75 + 0.1·0.1 = 0.51375
    assert float(out.total) == pytest.approx(0.51375)
    assert out.parts["clipfrac"] == pytest.approx(0.5)  # 1.5 is outside [0.8, 1.2], 0.9 inside
    # approx_kl = mean((ρ − 1) − log ρ) = ((0.5 − ln 1.5) + (−0.1 − ln 0.9))/2 = (0.0945349 + 0.0053605)/2
    assert out.parts["approx_kl"] == pytest.approx(0.0499477, abs=1e-6)


def test_value_only_trains_no_policy():
    inp = loss_inputs(requires_grad=True)
    inp["new_values"] = torch.tensor([1.0, 0.0], requires_grad=True)
    out = ppo_loss(**inp, cfg=CFG, value_only=True)
    assert float(out.total.detach()) == pytest.approx(0.5 * 0.4225)  # vf_coef · L_value
    assert out.parts["policy"] == pytest.approx(0.3)  # still logged
    out.total.backward()
    assert inp["new_logp"].grad is None  # the policy is not in the graph


@pytest.mark.parametrize("ratio, adv, zero", [(1.5, 1.0, True), (0.5, 1.0, False), (0.5, -1.0, True), (1.5, -1.0, False),
                                               (1.1, 1.0, False), (0.9, -1.0, False)])
def test_clipping_zeroes_the_gradient_only_past_the_clip_on_the_advantage_side(ratio, adv, zero):
    """Past 1+ε with A > 0 (or below 1−ε with A < 0) the objective is flat: no gradient. On the other side, and
    inside the range, the gradient is −ρ·A/M."""
    new = torch.tensor([math.log(ratio)], requires_grad=True)
    z = torch.zeros(1)
    cfg = PPOConfig(clip=0.2, vf_coef=0.0, ent_coef=0.0, kl_coef=0.0, norm_adv=False)
    ppo_loss(new, z, torch.tensor([adv]), z, z, z, z, z, cfg).total.backward()
    want = 0.0 if zero else -ratio * adv
    assert float(new.grad) == pytest.approx(want)


def test_advantage_normalisation():
    z = torch.zeros(2)
    new = torch.tensor([0.0, 0.0], requires_grad=True)
    cfg = PPOConfig(vf_coef=0.0, ent_coef=0.0, kl_coef=0.0, norm_adv=True)
    ppo_loss(new, z, torch.tensor([1.0, 3.0]), z, z, z, z, z, cfg).total.backward()
    # [1, 3] -> mean 2, std √2 -> [−1/√2, 1/√2]; at ρ = 1 the gradient is −A/M
    assert new.grad.tolist() == pytest.approx([0.5 / math.sqrt(2), -0.5 / math.sqrt(2)], abs=1e-6)


def test_categorical_terms_by_hand_and_kl_zero_at_the_reference():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = (0.25, 0.75)
    logp, ent, kl = categorical_terms(logits, torch.zeros(1, 2), torch.tensor([1]))
    assert float(logp) == pytest.approx(math.log(0.75))
    assert float(ent) == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))  # 0.562335
    assert float(kl) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))  # 0.130812
    same = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(categorical_terms(same, same.clone(), torch.zeros(5, dtype=torch.long))[2], torch.zeros(5))


def test_value_head_starts_at_zero_and_keeps_leading_shape():
    head = ValueHead(16)
    v = head(torch.randn(3, 5, 16))
    assert v.shape == (3, 5) and torch.equal(v, torch.zeros(3, 5))
    v.sum().backward()  # the last layer gets a gradient, so the head learns
    assert head.out.weight.grad.abs().sum() > 0


def test_ppo_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="rl.gamma"):
        PPOConfig(gamma=1.5)
    with pytest.raises(ConfigError, match="rl.epochs"):
        PPOConfig(epochs=0)
