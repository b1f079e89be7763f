"""The critic's action gradient, the QSM target and loss, the TD target and the two updates."""

import types

import pytest
import torch
import tyro
from helpers import edited_copy, import_path


class QuadraticCritic:
    """Hand-made twin critic with a known gradient: Q_1 = -0.5 |a - a*(s)|^2, Q_2 = -1.5 |a - a*(s)|^2.

    mean_i grad_a Q_i = -2 (a - a*(s)), so the QSM target is 2 M_q (a - a*(s))."""

    def __init__(self, obs_dim, action_dim, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.M = torch.randn(obs_dim, action_dim, generator=g)

    def best_action(self, obs):
        return 0.6 * torch.tanh(obs @ self.M)  # inside the action box

    def __call__(self, obs, actions):
        sq = (actions - self.best_action(obs)).pow(2).sum(-1)
        return torch.stack([-0.5 * sq, -1.5 * sq])


class ELULayerNormCritic(torch.nn.Module):
    """A critic a user might write for an ablation: three ELU MLPs with LayerNorm, nothing like TwinCritic inside."""

    def __init__(self, S, A, num_q=3):
        super().__init__()
        self.nets = torch.nn.ModuleList(
            torch.nn.Sequential(
                torch.nn.Linear(S + A, 32), torch.nn.LayerNorm(32), torch.nn.ELU(), torch.nn.Linear(32, 1)
            )
            for _ in range(num_q)
        )

    def forward(self, obs, actions):
        return torch.stack([net(torch.cat([obs, actions], -1)).squeeze(-1) for net in self.nets])


@pytest.mark.parametrize(
    ("make", "compiled"),
    [
        ("twin", False),
        ("twin-3-critics", False),
        ("twin-elu", False),
        ("elu-layernorm", False),
        ("twin-elu", True),
        ("elu-layernorm", True),
    ],
)
def test_qsm_target_is_autograd_of_any_critic(qsm, make, compiled, monkeypatch):
    """Whatever the critic (another activation, LayerNorm, more critics), the target is exactly -M_q * mean_i grad_a Q_i
    computed by autograd on that critic's own forward: no other edit needed, eager or compiled (one graph)."""
    if compiled:
        torch._dynamo.reset()
        monkeypatch.setattr(qsm, "grad_a_q", torch.compile(qsm.grad_a_q, fullgraph=True))
    torch.manual_seed(0)
    S, A, B = 5, 3, 40
    if make == "elu-layernorm":
        critic = ELULayerNormCritic(S, A).double()
    else:
        critic = qsm.TwinCritic(S, A, (16, 16), num_q=3 if make == "twin-3-critics" else 2).double()
    if make == "twin-elu":  # the edit a user makes in the copied file: the critics' activation
        monkeypatch.setattr(qsm.F, "relu", torch.nn.functional.elu)
    obs, actions = torch.randn(B, S, dtype=torch.float64), torch.randn(B, A, dtype=torch.float64)
    a = actions.clone().requires_grad_()
    q = critic(obs, a)
    grads = [torch.autograd.grad(q[i].sum(), a, retain_graph=True)[0] for i in range(len(q))]
    expected = -50.0 * torch.stack(grads).mean(0)
    target = qsm.qsm_target(qsm.grad_a_q(critic, obs, actions), M_q=50.0)
    torch.testing.assert_close(target, expected, rtol=1e-12, atol=1e-12)
    assert not target.requires_grad  # no gradient may reach the critic from the score update
    if make == "twin-elu":  # the activation really changed: ReLU's gradient differs
        monkeypatch.undo()  # ReLU again, and the eager grad_a_q
        assert not torch.allclose(qsm.qsm_target(qsm.grad_a_q(critic, obs, actions), M_q=50.0), expected)


def test_twin_critic_on_a_hand_built_network(qsm):
    """One hidden unit that is always active: Q_i(s, a) = w2_i * (v_i . [s, a] + 10), so grad_a Q_i = w2_i v_i[a]."""
    critic = qsm.TwinCritic(2, 2, (1,))
    v = torch.tensor([[0.1, -0.2, 0.3, -0.4], [0.5, 0.6, -0.7, 0.8]])
    w2 = torch.tensor([2.0, -3.0])
    with torch.no_grad():
        critic.weights[0].copy_(v.unsqueeze(-1))
        critic.biases[0].fill_(10.0)
        critic.weights[1].copy_(w2.view(2, 1, 1))
        critic.biases[1].zero_()
    obs, actions = torch.rand(4, 2), torch.rand(4, 2)
    q = critic(obs, actions)
    torch.testing.assert_close(q[0], 2.0 * (torch.cat([obs, actions], -1) @ v[0] + 10))
    torch.testing.assert_close(q[1], -3.0 * (torch.cat([obs, actions], -1) @ v[1] + 10))
    # -mean_i w2_i v_i[a] = -(0.6 + 2.1, -0.8 - 2.4) / 2
    target = qsm.qsm_target(qsm.grad_a_q(critic, obs, actions), M_q=1.0)
    torch.testing.assert_close(target, torch.tensor([[-1.35, 1.6]]).expand(4, 2))


def test_qsm_target_is_minus_M_q_times_grad_Q(qsm):
    critic = QuadraticCritic(4, 2)
    obs, noisy_actions = torch.randn(8, 4), torch.randn(8, 2)
    target = qsm.qsm_target(qsm.grad_a_q(critic, obs, noisy_actions), M_q=50.0)
    torch.testing.assert_close(target, 100.0 * (noisy_actions - critic.best_action(obs)), rtol=0, atol=1e-5)


def test_qsm_loss_uses_the_forward_diffusion_of_replay_actions(qsm):
    """Replays the loss's random draws (t, then eps) and recomputes it by hand."""
    torch.manual_seed(0)
    S, A, B = 4, 2, 32
    den, critic, schedule = qsm.Denoiser(S, A, (16,), 5), QuadraticCritic(S, A), qsm.DiffusionSchedule("vp", 5)
    batch = qsm.Batch(torch.randn(B, S), torch.rand(B, A) * 2 - 1, torch.zeros(B), torch.randn(B, S), torch.ones(B))
    torch.manual_seed(7)
    loss, _ = qsm.qsm_loss(den, critic, schedule, batch, qsm.Args(M_q=3.0))
    torch.manual_seed(7)
    t = torch.randint(0, 5, (B,))
    eps = torch.randn(B, A)
    ab = torch.tensor(schedule.alpha_bars, dtype=torch.float32)[t].unsqueeze(-1)
    a_t = ab.sqrt() * batch.actions + (1 - ab).sqrt() * eps
    expected = ((den(batch.obs, a_t, t) - 6.0 * (a_t - critic.best_action(batch.obs))) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()  # only the denoiser is differentiated
    assert all(p.grad is not None for p in den.parameters())


def test_denoising_score_target_is_eps_minus_M_q_sigma_t_grad_Q(qsm):
    """--score-target denoising: eps_theta(s, a_t, t) -> eps - M_q sqrt(1 - alpha_bar_t) grad_a Q(s, a_t), with the
    loss's own draws (t, then eps) replayed."""
    torch.manual_seed(0)
    S, A, B = 4, 2, 32
    den, critic, schedule = qsm.Denoiser(S, A, (16,), 5), QuadraticCritic(S, A), qsm.DiffusionSchedule("vp", 5)
    batch = qsm.Batch(torch.randn(B, S), torch.rand(B, A) * 2 - 1, torch.zeros(B), torch.randn(B, S), torch.ones(B))
    torch.manual_seed(7)
    loss, q_grad = qsm.qsm_loss(den, critic, schedule, batch, qsm.Args(M_q=3.0, score_target="denoising"))
    torch.manual_seed(7)
    t = torch.randint(0, 5, (B,))
    eps = torch.randn(B, A)
    ab = torch.tensor(schedule.alpha_bars, dtype=torch.float32)[t].unsqueeze(-1)
    a_t = ab.sqrt() * batch.actions + (1 - ab).sqrt() * eps
    target = eps + (1 - ab).sqrt() * 6.0 * (a_t - critic.best_action(batch.obs))  # -M_q grad_a Q = 6 (a_t - a*)
    torch.testing.assert_close(loss, ((den(batch.obs, a_t, t) - target) ** 2).mean())
    torch.testing.assert_close(q_grad, -2.0 * (a_t - critic.best_action(batch.obs)))  # grad_a Q itself, before M_q


def test_normalized_q_grad_divides_by_its_batch_mean_norm_and_ignores_the_scale_of_Q(qsm):
    critic, obs, actions = QuadraticCritic(4, 2), torch.randn(8, 4), torch.randn(8, 2)
    grad = -2.0 * (actions - critic.best_action(obs))  # mean_i grad_a Q_i
    target = qsm.qsm_target(qsm.grad_a_q(critic, obs, actions), M_q=3.0, normalize=True)
    torch.testing.assert_close(target, -3.0 * grad / grad.norm(dim=-1).mean())
    scaled = qsm.qsm_target(qsm.grad_a_q(lambda s, a: 10.0 * critic(s, a), obs, actions), M_q=3.0, normalize=True)
    torch.testing.assert_close(scaled, target)


def test_best_of_n_acts_with_the_highest_min_Q_of_n_samples_drawn_in_one_sampler_call(qsm):
    torch.manual_seed(0)
    S, A, N = 4, 2, 8
    den, critic, schedule = qsm.Denoiser(S, A, (32,), 5), QuadraticCritic(S, A), qsm.DiffusionSchedule("vp", 5)
    agent = types.SimpleNamespace(denoiser=den, critic=critic, noise_schedule=schedule)  # the fields policy reads
    obs = torch.randn(3, S)
    torch.manual_seed(1)
    got = qsm.policy(agent, obs, qsm.Args(best_of_n=N))
    torch.manual_seed(1)
    samples = qsm.ddpm_sample(den, schedule, obs.repeat_interleave(N, dim=0)).view(3, N, A)  # state j's in rows j
    distance = (samples - critic.best_action(obs)[:, None]).norm(dim=-1)  # min_i Q_i = -1.5 distance^2
    torch.testing.assert_close(got, samples[torch.arange(3), distance.argmin(dim=1)], rtol=0, atol=0)
    torch.manual_seed(1)
    one = qsm.policy(agent, obs, qsm.Args(best_of_n=1))
    torch.manual_seed(1)
    torch.testing.assert_close(one, qsm.ddpm_sample(den, schedule, obs), rtol=0, atol=0)  # N = 1: the paper's


def test_score_updates_move_sampled_actions_to_the_best_action(qsm):
    """A few hundred QSM steps against a fixed critic with a known argmax a*(s) pull the DDPM samples onto a*.

    M_q = 1 here: with this critic, eps = 2 (a_t - a*) makes the T = 5 VP chain contract onto a*. (At M_q = 50 one
    reverse step overshoots to the clip: the bang-bang saturation of QSM policies.) A wrong sign pushes the samples
    away from a*, so this test also pins the sign of the target."""
    torch.manual_seed(0)
    S, A, B = 4, 2, 256
    critic = QuadraticCritic(S, A)
    den, schedule = qsm.Denoiser(S, A, (64, 64), 5), qsm.DiffusionSchedule("vp", 5)
    opt = torch.optim.Adam(den.parameters(), lr=3e-3)
    obs_test = torch.randn(512, S)

    def distance():
        return (qsm.ddpm_sample(den, schedule, obs_test) - critic.best_action(obs_test)).norm(dim=-1).mean()

    before = distance()
    for _ in range(400):
        obs = torch.randn(B, S)
        batch = qsm.Batch(obs, torch.rand(B, A) * 2 - 1, torch.zeros(B), obs, torch.ones(B))
        loss, _ = qsm.qsm_loss(den, critic, schedule, batch, qsm.Args(M_q=1.0))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = distance()
    assert before > 1.0
    assert after < before / 5, (before, after)


class ConstantCritic:
    """Q_1(s', a') = sum(s'), Q_2(s', a') = 2 sum(s') - 1; records the actions it was asked about."""

    def __call__(self, obs, actions):
        self.actions = actions
        return torch.stack([obs.sum(-1), 2 * obs.sum(-1) - 1])


def test_td_target_on_a_hand_computed_batch(qsm):
    torch.manual_seed(0)
    den, schedule = qsm.Denoiser(2, 3, (8,), 5), qsm.DiffusionSchedule("vp", 5)
    next_obs = torch.tensor([[1.0, 2.0], [0.5, -1.0], [1.0, 1.0]])  # min(Q1, Q2) = [3, -2, 2]
    batch = qsm.Batch(
        obs=torch.zeros(3, 2),
        actions=torch.zeros(3, 3),
        rewards=torch.tensor([1.0, 2.0, -1.0]),
        next_obs=next_obs,
        masks=torch.tensor([1.0, 1.0, 0.0]),
    )
    critic = ConstantCritic()
    y, next_actions = qsm.td_target(critic, den, schedule, batch, qsm.Args(gamma=0.9, target_noise=0.5))
    torch.testing.assert_close(y, torch.tensor([1.0 + 0.9 * 3.0, 2.0 + 0.9 * -2.0, -1.0]))  # mask 0: y = r
    assert next_actions.shape == (3, 3)
    noisy = critic.actions  # a' = clip(DDPM(s') + N(0, 0.5^2))
    assert noisy.abs().max() <= 1 and not torch.equal(noisy, next_actions)


def _agent(qsm, S=3, A=2, **kw):
    torch.manual_seed(0)
    args = qsm.Args(critic_hidden_dims=(16, 16), actor_hidden_dims=(16, 16), cuda=False, **kw)
    return qsm.build_agent(S, A, args, "cpu"), args


def test_update_critic_steps_the_critics_and_polyaks_the_targets(qsm):
    S, A, B = 3, 2, 32
    agent, args = _agent(qsm, S, A, tau=0.1)
    batch = qsm.Batch(torch.randn(B, S), torch.rand(B, A), torch.randn(B), torch.randn(B, S), torch.ones(B))
    before = [p.detach().clone() for p in agent.critic.parameters()]
    den_before = [p.detach().clone() for p in agent.denoiser.parameters()]
    metrics = qsm.update_critic(agent, batch, args)
    for p0, p1, pt in zip(before, agent.critic.parameters(), agent.critic_target.parameters(), strict=True):
        assert not torch.equal(p0, p1)  # the critics moved
        torch.testing.assert_close(pt, 0.9 * p0 + 0.1 * p1)  # theta_targ <- 0.9 theta_targ + 0.1 theta
    assert all(torch.equal(p0, p1) for p0, p1 in zip(den_before, agent.denoiser.parameters(), strict=True))
    assert {"losses/qf1_loss", "losses/qf2_loss", "losses/qf1_values", "charts/action_saturation"} <= set(metrics)
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("num_q", [1, 3])
def test_any_number_of_critics_learns_and_logs_each(qsm, num_q):
    """--num-q N: the TD target takes the minimum of the N target critics, the loss sums each critic's own MSE, and
    every critic's loss and Q value is logged; a real update moves the critics and the denoiser."""
    S, A, B = 3, 2, 32
    agent, args = _agent(qsm, S, A, num_q=num_q)
    batch = qsm.Batch(torch.randn(B, S), torch.rand(B, A), torch.randn(B), torch.randn(B, S), torch.ones(B))
    seen = {}
    agent.critic_target.register_forward_hook(lambda module, inputs, out: seen.update(next_q=out))
    schedule = agent.noise_schedule
    loss, metrics = qsm.critic_loss(agent.critic, agent.critic_target, agent.denoiser, schedule, batch, args)
    assert seen["next_q"].shape == (num_q, B)
    y = batch.rewards + args.gamma * seen["next_q"].min(dim=0).values
    q = agent.critic(batch.obs, batch.actions)
    torch.testing.assert_close(loss, (q - y).pow(2).mean(dim=1).sum())
    names = [f"losses/qf{i}_{kind}" for kind in ("loss", "values") for i in range(1, num_q + 1)]
    assert sorted(k for k in metrics if k.startswith("losses/qf")) == sorted(names)
    before = [p.detach().clone() for p in [*agent.critic.parameters(), *agent.denoiser.parameters()]]
    metrics = qsm.train_step(agent, batch, args)
    after = [*agent.critic.parameters(), *agent.denoiser.parameters()]
    assert all(not torch.equal(p0, p1) for p0, p1 in zip(before, after, strict=True))
    assert all(torch.isfinite(v) for v in metrics.values())


def test_a_new_score_target_is_one_literal_value_and_one_case(qsm, tmp_path):
    """The ablation of a time-weighted target, -M_q (1 - alpha_bar_t) grad_a Q, made in a copy of the file as the
    README says: one Literal value (tyro then accepts it) and one case in qsm_loss; nothing else to edit."""
    literal = 'score_target: Literal["paper", "denoising"] = "paper"'
    case = '        case "paper":  # -M_q grad_a Q(s, a_t)\n'
    new_case = f'        case "time-weighted":\n            target = (1.0 - alpha_bar) * q_term\n{case}'
    edited = import_path(
        edited_copy(
            tmp_path, (literal, literal.replace('"denoising"]', '"denoising", "time-weighted"]')), (case, new_case)
        )
    )
    args = tyro.cli(edited.Args, args=["--score-target", "time-weighted", "--M-q", "3", "--no-cuda"])
    torch.manual_seed(0)
    S, A, B = 4, 2, 64
    den, critic, schedule = edited.Denoiser(S, A, (16,), 5), QuadraticCritic(S, A), edited.DiffusionSchedule("vp", 5)
    obs = torch.randn(B, S)
    batch = edited.Batch(obs, torch.rand(B, A) * 2 - 1, torch.zeros(B), obs, torch.ones(B))
    torch.manual_seed(1)
    loss, _ = edited.qsm_loss(den, critic, schedule, batch, args)
    torch.manual_seed(1)
    t, noise = torch.randint(0, 5, (B,)), torch.randn(B, A)  # the loss's draws, in its order
    alpha_bar = schedule.alpha_bars_tensor[t].unsqueeze(-1)
    a_t = alpha_bar.sqrt() * batch.actions + (1 - alpha_bar).sqrt() * noise
    target = (1 - alpha_bar) * 2 * 3.0 * (a_t - critic.best_action(obs))  # -M_q (1 - alpha_bar) grad_a Q
    torch.testing.assert_close(loss, (den(obs, a_t, t) - target).pow(2).mean())
    with pytest.raises(ValueError, match="--score-target 'time_weighted' is unknown"):  # no fall-through to another
        edited.qsm_loss(den, critic, schedule, batch, edited.Args(score_target="time_weighted"))


def test_update_actor_steps_only_the_denoiser(qsm):
    S, A, B = 3, 2, 32
    agent, args = _agent(qsm, S, A)
    batch = qsm.Batch(torch.randn(B, S), torch.rand(B, A), torch.randn(B), torch.randn(B, S), torch.ones(B))
    critic_before = [p.detach().clone() for p in agent.critic.parameters()]
    den_before = [p.detach().clone() for p in agent.denoiser.parameters()]
    metrics = qsm.update_actor(agent, batch, args)
    assert all(torch.equal(p0, p1) for p0, p1 in zip(critic_before, agent.critic.parameters(), strict=True))
    assert all(p.grad is None for p in agent.critic.parameters())
    assert any(not torch.equal(p0, p1) for p0, p1 in zip(den_before, agent.denoiser.parameters(), strict=True))
    assert metrics["losses/actor_loss"] > 0 and metrics["losses/q_grad_norm"] > 0


@pytest.mark.parametrize("normalize", [False, True])
def test_q_grad_norm_is_the_batch_mean_norm_of_grad_Q_itself(qsm, normalize):
    """losses/q_grad_norm is mean_j ||grad_a Q(s_j, a_t,j)||, before M_q and --normalize-q-grad (under which the
    target's own norm is always M_q): here Q = 10 x the quadratic critic, grad_a Q = -20 (a_t - a*)."""
    S, A, B = 3, 2, 32
    agent, args = _agent(qsm, S, A, M_q=3.0, normalize_q_grad=normalize)
    quadratic = QuadraticCritic(S, A)
    agent.critic = lambda obs, actions: 10.0 * quadratic(obs, actions)
    batch = qsm.Batch(torch.randn(B, S), torch.rand(B, A) * 2 - 1, torch.randn(B), torch.randn(B, S), torch.ones(B))
    torch.manual_seed(5)
    metrics = qsm.update_actor(agent, batch, args)
    torch.manual_seed(5)
    t, noise = torch.randint(0, 5, (B,)), torch.randn(B, A)  # the loss's draws, in its order
    alpha_bar = agent.noise_schedule.alpha_bars_tensor[t].unsqueeze(-1)
    a_t = alpha_bar.sqrt() * batch.actions + (1 - alpha_bar).sqrt() * noise
    expected = (-20.0 * (a_t - quadratic.best_action(batch.obs))).norm(dim=-1).mean()
    torch.testing.assert_close(metrics["losses/q_grad_norm"], expected)
    assert metrics["losses/q_grad_norm"] > 10.0  # far from the 1.0 that the normalised target's norm over M_q gives


def test_cosine_decay_matches_optax(qsm):
    assert qsm.cosine_decay(0, 100) == 1.0
    assert qsm.cosine_decay(50, 100) == pytest.approx(0.5)
    assert qsm.cosine_decay(100, 100) == pytest.approx(0.0)
    assert qsm.cosine_decay(250, 100) == pytest.approx(0.0)  # stays at 0, no restart


def test_bf16_update_tracks_float32(qsm):
    """--bf16 runs the update's products in bfloat16 (so it is not bit-identical) yet moves the same parameters the
    same way; parameters stay float32, and acting (float32 also under --bf16) draws exactly the same actions."""

    def one_update(bf16: bool):
        args = qsm.Args(bf16=bf16, critic_hidden_dims=(64, 64), actor_hidden_dims=(64, 64), cuda=False)
        torch.manual_seed(0)
        agent = qsm.build_agent(5, 2, args, "cpu")
        g = torch.Generator().manual_seed(1)
        batch = qsm.Batch(
            torch.randn(64, 5, generator=g),
            torch.rand(64, 2, generator=g) * 2 - 1,
            torch.randn(64, generator=g),
            torch.randn(64, 5, generator=g),
            torch.ones(64),
        )
        params = [p for module in (agent.critic, agent.denoiser) for p in module.parameters()]
        before = torch.cat([p.detach().flatten() for p in params])
        torch.manual_seed(3)
        actions = qsm.act(agent, batch.obs[:8], args)
        torch.manual_seed(5)
        metrics = qsm.train_step(agent, batch, args)
        assert all(p.dtype == torch.float32 for p in params)
        return metrics, torch.cat([p.detach().flatten() for p in params]) - before, actions

    metrics32, delta32, actions32 = one_update(False)
    metrics16, delta16, actions16 = one_update(True)
    assert torch.equal(actions16, actions32)
    assert not torch.equal(delta16, delta32)  # the products really ran in bfloat16
    assert torch.nn.functional.cosine_similarity(delta16, delta32, dim=0) > 0.95
    for key in ("losses/qf1_loss", "losses/qf2_loss", "losses/actor_loss", "losses/td_target"):
        torch.testing.assert_close(metrics16[key], metrics32[key], rtol=0.03, atol=1e-3, msg=key)


def test_bf16_td_target_is_float32_arithmetic_on_the_bf16_features(qsm):
    """Under --bf16 the critics' hidden layers run in bfloat16, their output layer and the TD target in float32: at
    Q ~ 80 (late in a long run) a bfloat16 Q is rounded to steps of 0.5, the size of a reward."""
    args = qsm.Args(bf16=True, critic_hidden_dims=(64, 64), actor_hidden_dims=(64, 64), cuda=False)
    torch.manual_seed(0)
    agent = qsm.build_agent(5, 2, args, "cpu")
    agent.critic_target.biases[-1].data.fill_(80.0)
    g = torch.Generator().manual_seed(1)
    batch = qsm.Batch(
        torch.randn(64, 5, generator=g),
        torch.rand(64, 2, generator=g) * 2 - 1,
        torch.rand(64, generator=g),
        torch.randn(64, 5, generator=g),
        torch.ones(64),
    )
    torch.manual_seed(2)
    with torch.autocast("cpu", torch.bfloat16):
        y, _ = qsm.td_target(agent.critic_target, agent.denoiser, agent.noise_schedule, batch, args)
        torch.manual_seed(2)  # the same next actions and target noise, by hand
        next_actions = qsm.ddpm_sample(agent.denoiser, agent.noise_schedule, batch.next_obs)
    noisy = (next_actions + args.target_noise * torch.randn_like(next_actions)).clamp(-1.0, 1.0)
    weights, biases = agent.critic_target.weights, agent.critic_target.biases
    x = torch.cat([batch.next_obs, noisy], dim=-1).expand(2, -1, -1).bfloat16()
    for weight, bias in zip(weights[:-1], biases[:-1], strict=True):  # the hidden layers as autocast runs them
        x = torch.relu(torch.baddbmm(bias.bfloat16(), x, weight.bfloat16()))
    q = torch.baddbmm(biases[-1].double(), x.double(), weights[-1].double()).squeeze(-1)  # the output layer, exact
    expected = batch.rewards.double() + args.gamma * batch.masks.double() * q.min(dim=0).values
    assert y.dtype == torch.float32 and q.min() > 70  # Q where bfloat16 steps by 0.5
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=1e-4)  # float32's rounding; bfloat16's is 0.25


def test_time_features_are_float32_in_training_and_acting(qsm):
    """The denoiser's Fourier features of t, the input of its first conditioning layer, are the same float32 numbers
    under --bf16's autocast (training) as without it (acting): a product in bfloat16 would round 2 pi t W."""
    torch.manual_seed(0)
    denoiser = qsm.Denoiser(5, 2, (64, 64), 5)
    features = []
    denoiser.cond[0].register_forward_pre_hook(lambda module, inputs: features.append(inputs[0]))
    obs, actions, t = torch.randn(8, 5), torch.rand(8, 2), torch.arange(8) % 5
    denoiser(obs, actions, t)
    with torch.autocast("cpu", torch.bfloat16):
        denoiser(obs, actions, t)
    assert features[0].dtype == features[1].dtype == torch.float32
    assert torch.equal(features[0], features[1])
