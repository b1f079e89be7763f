"""The noise schedules, the denoiser and the DDPM sampler, checked against hand computations."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import edited_copy, import_path


def test_vp_schedule_matches_the_papers_values(qsm):
    betas = qsm.beta_schedule("vp", 5)
    np.testing.assert_allclose(betas, [0.1959, 0.4588, 0.6358, 0.7549, 0.8350], atol=1e-4)
    schedule = qsm.DiffusionSchedule("vp", 5)
    np.testing.assert_allclose(schedule.alpha_bars, [0.8041, 0.4352, 0.1585, 0.0389, 0.0064], atol=1e-4)


@pytest.mark.parametrize("T", [1, 2, 5, 20])
def test_vp_schedule_matches_its_formula(qsm, T):
    for t in range(1, T + 1):  # beta_t = 1 - exp(-b_min/T - 0.5 (b_max - b_min)(2t - 1)/T^2)
        expected = 1 - math.exp(-0.1 / T - 0.5 * (10.0 - 0.1) * (2 * t - 1) / T**2)
        assert qsm.beta_schedule("vp", T)[t - 1] == pytest.approx(expected, rel=1e-12)


def test_cosine_and_linear_schedules(qsm):
    T, s = 5, 0.008
    f = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    schedule = qsm.DiffusionSchedule("cosine", T)
    # alpha_bar_t = f(t) / f(0) when no beta hits the 0.999 clip
    np.testing.assert_allclose(schedule.alpha_bars[:-1], [f[t] / f[0] for t in range(1, T)], rtol=1e-10)
    assert schedule.betas[-1] == pytest.approx(0.999)  # the last step is clipped
    np.testing.assert_allclose(qsm.beta_schedule("linear", 3), [1e-4, 0.01005, 2e-2])


def test_schedule_tensor_matches_the_float64_values(qsm):
    schedule = qsm.DiffusionSchedule("vp", 5)
    np.testing.assert_allclose(schedule.alpha_bars_tensor.numpy(), schedule.alpha_bars, rtol=1e-6)
    np.testing.assert_allclose(schedule.alphas, 1 - np.array(schedule.betas))
    np.testing.assert_allclose(schedule.alpha_bars, np.cumprod(schedule.alphas))


def test_unknown_schedule_is_refused(qsm):
    with pytest.raises(ValueError, match="--beta-schedule 'sigmoid' is unknown; use one of: vp, cosine, linear"):
        qsm.beta_schedule("sigmoid", 5)


def test_denoiser_is_the_official_mlp_on_concat_and_t_may_be_shared(qsm):
    """forward must be exactly MLP(concat(a_t, s, cond(t))), cond(t) = MLP(Fourier(t)), for per-sample steps t (B,) and
    for one step shared by the batch, t of shape (1,), as the sampler passes it."""
    torch.manual_seed(0)
    S, A, B = 7, 3, 11
    den = qsm.Denoiser(S, A, (32, 16), 5)
    obs, actions, t = torch.randn(B, S), torch.randn(B, A), torch.randint(0, 5, (B,))
    f = 2 * math.pi * t.float()[:, None] * den.fourier_kernel[:, 0]  # [cos 2 pi t W, sin 2 pi t W], W (32, 1)
    cond = den.cond[1](F.mish(den.cond[0](torch.cat([torch.cos(f), torch.sin(f)], dim=-1))))
    x = torch.cat([actions, obs, cond], dim=-1)
    for layer in den.mlp:
        x = F.mish(layer(x))
    torch.testing.assert_close(den(obs, actions, t), den.out(x))
    shared = den(obs, actions, torch.full((1,), 4))
    torch.testing.assert_close(shared, den(obs, actions, torch.full((B,), 4)))


def hand_written_chain(denoiser, schedule, obs, x_T):
    """The T = 5 DDPM chain at temperature 0, in float64, each step's t given per sample: (B, S) -> (B, A)."""
    x = x_T.double()
    with torch.no_grad():
        for t in [4, 3, 2, 1, 0]:
            a, ab = schedule.alphas[t], schedule.alpha_bars[t]
            eps = denoiser(obs, x.float(), torch.full((len(obs),), t)).double()
            x = ((x - (1 - a) / math.sqrt(1 - ab) * eps) / math.sqrt(a)).clamp(-1, 1)
    return x.float()


class DoubledDenoiser:
    """Mixin for a user's ablation: a denoiser whose forward is not the original one."""

    def forward(self, obs, noisy_actions, t):
        return 2.0 * torch.tanh(super().forward(obs, noisy_actions, t)) + 0.1 * t.float().unsqueeze(-1)


def test_sampler_and_loss_use_the_denoisers_own_forward(qsm):
    """A subclass that changes only forward changes the sampler's output exactly as the hand-written chain with that
    forward does, and the QSM loss with it: nothing reaches the network around forward."""
    torch.manual_seed(0)
    plain = qsm.Denoiser(5, 3, (32, 32), 5)
    changed = type("Changed", (DoubledDenoiser, qsm.Denoiser), {})(5, 3, (32, 32), 5)
    changed.load_state_dict(plain.state_dict())
    schedule = qsm.DiffusionSchedule("vp", 5)
    obs, x_T = torch.randn(16, 5), torch.randn(16, 3)
    got = qsm.ddpm_sample(changed, schedule, obs, temperature=0.0, x_T=x_T, clip="x_t")
    torch.testing.assert_close(got, hand_written_chain(changed, schedule, obs, x_T), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, qsm.ddpm_sample(plain, schedule, obs, temperature=0.0, x_T=x_T))
    critic = qsm.TwinCritic(5, 3, (16,))
    batch = qsm.Batch(obs, torch.rand(16, 3) * 2 - 1, torch.zeros(16), obs, torch.ones(16))
    losses = []
    for den in (plain, changed):
        torch.manual_seed(1)
        losses.append(qsm.qsm_loss(den, critic, schedule, batch, qsm.Args(M_q=1.0))[0])
    assert losses[0] != losses[1]


# edits of Denoiser.forward's body in a copy of the file, as a user makes them: an output offset whose chain ends at -1
# (each reverse step subtracts the huge predicted noise), and a residual MLP
FORWARD_EDITS = {
    "offset": ("        return self.out(x)\n", "        return self.out(x) + 1e6\n"),
    "residual": (
        "            x = mish(layer(x))\n",
        "            x = mish(layer(x)) + (x if x.shape[-1] == layer.out_features else 0)\n",
    ),
}


@pytest.mark.parametrize("edit", sorted(FORWARD_EDITS))
def test_an_edit_of_forward_in_the_file_reaches_the_sampler_td_target_and_acting(qsm, tmp_path, edit):
    """Every caller of the network runs the edited forward: the sampler equals the hand-written chain through it, and
    the TD target's next actions and acting are that sampler's actions; the unedited file's sampler differs."""
    edited = import_path(edited_copy(tmp_path, FORWARD_EDITS[edit]))
    S, A, B = 5, 3, 16
    args = edited.Args(
        critic_hidden_dims=(16,),
        actor_hidden_dims=(32, 32),
        ddpm_temperature=0.0,
        exploration_noise=0.0,
        target_noise=0.0,
        cuda=False,
    )
    torch.manual_seed(0)
    agent = edited.build_agent(S, A, args, "cpu")
    obs = torch.randn(B, S)
    batch = edited.Batch(obs, torch.rand(B, A) * 2 - 1, torch.zeros(B), obs, torch.ones(B))
    schedule = agent.noise_schedule
    calls = {
        "ddpm_sample": lambda: edited.ddpm_sample(agent.denoiser, schedule, obs, 0.0),
        "td_target": lambda: edited.td_target(agent.critic_target, agent.denoiser, schedule, batch, args)[1],
        "act": lambda: edited.act(agent, obs, args),
    }
    for name, call in calls.items():
        torch.manual_seed(1)
        x_T = torch.randn(B, A)  # the first draw of each call
        torch.manual_seed(1)
        chain = hand_written_chain(agent.denoiser, agent.noise_schedule, obs, x_T)
        torch.testing.assert_close(call(), chain, rtol=1e-5, atol=1e-5, msg=name)
    assert (chain == -1).all() if edit == "offset" else (chain.abs() < 1).any()
    original = qsm.Denoiser(S, A, (32, 32), 5)
    original.load_state_dict(agent.denoiser.state_dict())
    assert not torch.allclose(qsm.ddpm_sample(original, agent.noise_schedule, obs, 0.0, x_T=x_T), chain)


@pytest.fixture()
def denoiser(qsm):
    torch.manual_seed(0)
    return qsm.Denoiser(5, 3, (32, 32), 5)


def test_sampler_shape_range_and_seed(qsm, denoiser):
    schedule = qsm.DiffusionSchedule("vp", 5)
    obs = torch.randn(64, 5) * 3
    torch.manual_seed(1)
    a1 = qsm.ddpm_sample(denoiser, schedule, obs)
    torch.manual_seed(1)
    a2 = qsm.ddpm_sample(denoiser, schedule, obs)
    a3 = qsm.ddpm_sample(denoiser, schedule, obs)
    assert a1.shape == (64, 3) and a1.dtype == torch.float32
    assert a1.min() >= -1 and a1.max() <= 1
    assert torch.equal(a1, a2)  # same seed, same actions
    assert not torch.equal(a1, a3)  # the generator moved on
    assert not a1.requires_grad


def test_sampler_at_temperature_zero_is_the_hand_written_chain(qsm, denoiser):
    schedule = qsm.DiffusionSchedule("vp", 5)
    obs, x_T = torch.randn(16, 5), torch.randn(16, 3)
    got = qsm.ddpm_sample(denoiser, schedule, obs, temperature=0.0, x_T=x_T)
    # a different RNG state must not matter at temperature 0
    torch.manual_seed(123)
    again = qsm.ddpm_sample(denoiser, schedule, obs, temperature=0.0, x_T=x_T)
    assert torch.equal(got, again)
    torch.testing.assert_close(got, hand_written_chain(denoiser, schedule, obs, x_T), rtol=1e-5, atol=1e-5)


def test_sampler_without_clipping_can_leave_the_box_only_before_the_last_clip(qsm, denoiser):
    """--sampler-clip final skips the per-step clip: the chain's intermediate x_t (what the denoiser is called on)
    leaves [-1, 1]; with x_t every one after x_T stays inside; the returned action is clipped once at the end."""
    seen = []

    class Recording(torch.nn.Module):  # the denoiser, recording the x_t of every call
        action_dim = denoiser.action_dim

        def forward(self, obs, x, t):
            seen.append(x.abs().max().item())
            return denoiser(obs, x, t)

    schedule = qsm.DiffusionSchedule("vp", 5)
    obs, x_T = torch.randn(256, 5), 4 * torch.randn(256, 3)
    clipped = qsm.ddpm_sample(Recording(), schedule, obs, temperature=0.0, clip="x_t", x_T=x_T)
    inside, seen[:] = seen[1:], []  # x_T itself is never clipped
    free = qsm.ddpm_sample(Recording(), schedule, obs, temperature=0.0, clip="final", x_T=x_T)
    assert len(inside) == 4 and max(inside) <= 1 and max(seen[1:]) > 1
    assert free.abs().max() <= 1 and not torch.equal(clipped, free)


class ConstantNoise(torch.nn.Module):
    """A denoiser that predicts the same noise c for every input: chains computable by hand."""

    action_dim = 1

    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, obs, noisy_actions, t):
        return torch.full_like(noisy_actions, self.c)


def test_sampler_clipping_x0_hat_steps_to_the_posterior_mean_at_the_clipped_clean_action(qsm):
    """--sampler-clip x0_hat, T = 2, eps_theta = c: x0_hat = clip((x_t - sqrt(1 - abar_t) c) / sqrt(abar_t)), then
    x_{t-1} = (sqrt(abar_{t-1}) beta_t x0_hat + sqrt(alpha_t) (1 - abar_{t-1}) x_t) / (1 - abar_t); at t = 0: x0_hat."""
    schedule, c = qsm.DiffusionSchedule("vp", 2), -0.4
    (ab0, ab1), a1, b1 = schedule.alpha_bars, schedule.alphas[1], schedule.betas[1]
    x_T = torch.tensor([[0.3], [2.0], [-0.5]])
    x = x_T.double()
    x0 = ((x - math.sqrt(1 - ab1) * c) / math.sqrt(ab1)).clamp(-1, 1)  # rows 0 and 1 clipped to +1
    x = (math.sqrt(ab0) * b1 * x0 + math.sqrt(a1) * (1 - ab0) * x) / (1 - ab1)
    expected = ((x - math.sqrt(1 - ab0) * c) / math.sqrt(ab0)).clamp(-1, 1)
    got = qsm.ddpm_sample(ConstantNoise(c), schedule, torch.zeros(3, 1), temperature=0.0, clip="x0_hat", x_T=x_T)
    torch.testing.assert_close(got, expected.float())
    paper = qsm.ddpm_sample(ConstantNoise(c), schedule, torch.zeros(3, 1), temperature=0.0, clip="x_t", x_T=x_T)
    assert not torch.allclose(got, paper)


def test_sampler_clipping_x0_hat_is_the_papers_step_while_x0_hat_stays_in_the_box(qsm):
    """Unclipped, the posterior mean at x0_hat equals (x_t - (1 - alpha_t) / sqrt(1 - abar_t) eps) / sqrt(alpha_t)."""
    schedule, x_T = qsm.DiffusionSchedule("vp", 5), 0.01 * torch.randn(64, 1)
    chains = [
        qsm.ddpm_sample(ConstantNoise(0.01), schedule, torch.zeros(64, 1), 0.0, clip, x_T)
        for clip in ("x0_hat", "final")
    ]
    assert chains[0].abs().max() < 0.9
    torch.testing.assert_close(*chains)
