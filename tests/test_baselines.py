"""benchmarks/baselines.py, the methods the cost benchmark weighs QSM against: each update runs and moves its networks,
and the parts that tell them apart match a hand computation on a tiny case (SAC's entropy term, TD3's delayed actor,
the back-propagated actor's gradient reaching the chain's first denoising step)."""

import math

import baselines
import pytest
import torch


def snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def moved(module, before):
    return any(not torch.equal(p, q) for p, q in zip(module.parameters(), before, strict=True))


def tiny(method, T=3):
    torch.manual_seed(0)
    update, act, nets = baselines.METHODS[method](4, 2, 16, T, torch.device("cpu"))
    return update, act, nets, baselines.random_batch(4, 2, 32, torch.device("cpu"))


@pytest.mark.parametrize("method", sorted(baselines.METHODS))
def test_each_update_moves_the_actor_and_the_critics_and_acts_in_the_box(method):
    update, act, nets, batch = tiny(method)
    actor, critic = (nets["denoiser"], nets["critic"]) if "denoiser" in nets else (nets["actor"], nets["qf"])
    before = snapshot(actor), snapshot(critic)
    losses = update(batch)
    assert moved(actor, before[0]) and moved(critic, before[1])
    assert all(math.isfinite(v.item()) for v in losses.values())
    actions = act(batch.obs)
    assert actions.shape == (32, 2) and actions.abs().max() <= 1


def test_sac_log_probability_is_the_squashed_gaussians():
    """log pi(a|s) = sum_i [log N(x_i; mu_i, sigma_i) - log(1 - tanh(x_i)^2)], a = tanh(x): the tanh correction
    is what makes the entropy term right for actions in [-1, 1]."""
    _, _, nets, batch = tiny("sac")
    actor = nets["actor"]
    a, log_pi = actor.get_action(batch.obs)
    mean, log_std = actor.body(batch.obs).chunk(2, dim=-1)
    log_std = baselines.LOG_STD_MIN + 0.5 * (baselines.LOG_STD_MAX - baselines.LOG_STD_MIN) * (torch.tanh(log_std) + 1)
    x = torch.atanh(a.clamp(-1 + 1e-6, 1 - 1e-6))
    gauss = -((x - mean) ** 2) / (2 * torch.exp(2 * log_std)) - log_std - 0.5 * math.log(2 * math.pi)
    by_hand = (gauss - torch.log(1 - a.pow(2) + 1e-6)).sum(1, keepdim=True)
    torch.testing.assert_close(log_pi, by_hand, rtol=1e-3, atol=1e-3)


def test_td3_moves_its_actor_and_targets_every_second_update():
    update, _, nets, batch = tiny("td3")
    for call in range(4):
        actor, critic, target = snapshot(nets["actor"]), snapshot(nets["qf"]), snapshot(nets["actor_target"])
        losses = update(batch)
        delayed = call % 2 == 0
        assert moved(nets["qf"], critic)  # the critics every update
        assert moved(nets["actor"], actor) == delayed == moved(nets["actor_target"], target)
        assert ("actor_loss" in losses) == delayed


def test_the_back_propagated_actor_reaches_the_first_denoising_step_and_qsm_does_not():
    """-Q(s, DDPM(s)) differentiated through the chain: the gradient reaches the denoiser's output at the first
    reverse step (t = T - 1); the script's sampler (QSM's) carries no gradient at all."""
    _, _, nets, batch = tiny("diffusion-bp")
    outputs = []

    class Recording(torch.nn.Module):
        action_dim = nets["denoiser"].action_dim

        def forward(self, obs, x, t):
            eps = nets["denoiser"](obs, x, t)
            eps.retain_grad()
            outputs.append((int(t), eps))
            return eps

    actions = baselines.ddpm_with_grad(Recording(), nets["noise_schedule"], batch.obs)
    (-nets["critic"](batch.obs, actions).mean()).backward()
    first_t, first = outputs[0]
    assert first_t == 2 and first.grad is not None and first.grad.abs().sum() > 0
    sampled = baselines.qsm.ddpm_sample(nets["denoiser"], nets["noise_schedule"], batch.obs)
    assert not sampled.requires_grad


def test_qsm_differentiates_one_denoiser_call_and_the_back_propagated_actor_all_T():
    """The paper's cost claim, counted: per update, QSM runs the denoiser with autograd once (its loss; the sampler
    runs without), the back-propagated actor T times (the chain), whatever else both do."""

    def graded_calls(method, T):  # (denoiser calls with autograd on, all denoiser calls) in one update
        update, _, nets, batch = tiny(method, T)
        calls = []
        nets["denoiser"].register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
        update(batch)
        return sum(calls), len(calls)

    assert graded_calls("qsm", 5) == (1, 1 + 5)  # the loss; the TD target's chain without gradient
    assert graded_calls("qsm", 20) == (1, 1 + 20)
    assert graded_calls("diffusion-bp", 20) == (20, 20 + 20)  # the actor's chain with it; the TD target's without


@pytest.mark.slow  # subprocesses
def test_the_cost_harness_measures_a_configuration_and_the_peak_grows_with_T_only_when_back_propagating():
    env = baselines.qsm.DMCEnv("cartpole-balance", seed=0)
    result = baselines.measure(("td3", 16, 32, None), env, torch.device("cpu"), calls=2, windows=1)
    assert result["updates/s"] > 0 and result["steps/s"] > 0 and result["GFLOP/update"] > 0
    peak = {
        (m, T): baselines.peak_mib((m, 256, 512, T), "cartpole-balance")
        for m in ("qsm", "diffusion-bp")
        for T in (5, 20)
    }
    assert peak["diffusion-bp", 20] > peak["diffusion-bp", 5] + 25  # 15 more steps of activations: ~40 MiB
    assert abs(peak["qsm", 20] - peak["qsm", 5]) < 10
