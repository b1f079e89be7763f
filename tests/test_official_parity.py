"""Parity with the official JAX implementation: tests/data/official_qsm_golden.npz holds one update and one acting
call of jaxrl5's ScoreMatchingLearner (parameters, random draws, every intermediate); tests/data/FORMAT.md describes
each array, the official semantics and the tolerances used here (its section 7)."""

from pathlib import Path

import numpy as np
import pytest
import torch

G = dict(np.load(Path(__file__).parent / "data" / "official_qsm_golden.npz"))
S, A, B, T = (int(G[f"meta/{key}"]) for key in ("obs_dim", "action_dim", "batch_size", "T"))


def scale_error(x, ref) -> float:
    """max |x - ref| / max |ref| (FORMAT.md, section 7): elementwise relative errors mean nothing near 0."""
    x, ref = np.asarray(torch.as_tensor(x).detach(), dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert x.shape == ref.shape, (x.shape, ref.shape)
    return float(np.abs(x - ref).max() / np.abs(ref).max())


def critic_pairs(critic, prefix):
    """(fixture name, parameter, view of a parameter-shaped tensor in the official layout) for each array."""
    for layer, (weight, bias) in enumerate(zip(critic.weights, critic.biases, strict=True)):
        for i in range(2):  # critic_1, critic_2: stacked in one module here
            yield f"{prefix}/{i}/layer{layer}/kernel", weight, lambda x, i=i: x[i]
            yield f"{prefix}/{i}/layer{layer}/bias", bias, lambda x, i=i: x[i, 0]


def denoiser_pairs(den):
    yield "denoiser/fourier/kernel", den.fourier_kernel, lambda x: x
    layers = [
        ("cond/layer0", den.cond[0]),
        ("cond/layer1", den.cond[1]),
        ("mlp/layer0", den.mlp[0]),
        ("mlp/layer1", den.mlp[1]),
        ("out", den.out),
    ]
    for name, layer in layers:
        yield f"denoiser/{name}/kernel", layer.weight, lambda x: x.T  # flax kernels are (in, out)
        yield f"denoiser/{name}/bias", layer.bias, lambda x: x


def all_pairs(agent):
    yield from critic_pairs(agent.critic, "critic")
    yield from critic_pairs(agent.critic_target, "target_critic")
    yield from denoiser_pairs(agent.denoiser)


class Draws:
    """Feeds the fixture's random draws to the code under test, by role and in order: each torch.randn, randn_like
    and randint call takes the next array, whose shape must match. Every array must be consumed."""

    def __init__(self, monkeypatch, *names):
        self.queue = [(name, torch.from_numpy(G[name].copy())) for name in names]
        monkeypatch.setattr(torch, "randn", lambda *size, **kw: self.take(size[0] if len(size) == 1 else size))
        monkeypatch.setattr(torch, "randn_like", lambda x, **kw: self.take(x.shape))
        monkeypatch.setattr(torch, "randint", lambda low, high, size, **kw: self.take(size))

    def take(self, shape):
        assert self.queue, "the code drew more random numbers than the official update"
        name, value = self.queue.pop(0)
        assert tuple(value.shape) == tuple(shape), (name, tuple(value.shape), tuple(shape))
        return value.clone()

    def done(self):
        assert not self.queue, f"not consumed: {[name for name, _ in self.queue]}"


TD_DRAWS = ("draws/td/x_T", *(f"draws/td/z/{k}" for k in range(T - 1)), "draws/td/target_noise")
QSM_DRAWS = ("draws/qsm/t", "draws/qsm/eps")
ACT_SAMPLE_DRAWS = ("draws/act/x_T", *(f"draws/act/z/{k}" for k in range(T - 1)))
for k in range(
    T
):  # z[k] belongs to step t = T-1-k; the official z at t = 0 is multiplied by 0, this sampler draws none
    G[f"draws/td/z/{k}"], G[f"draws/act/z/{k}"] = G["draws/td/z"][k], G["draws/act/z"][k]
G["draws/act/noise/batched"] = G["draws/act/noise"][None]  # drawn as (1, A) here, the same values


@pytest.fixture()
def agent(qsm):
    """The agent at the fixture's initial parameters, with the official configuration."""
    args = qsm.Args(critic_hidden_dims=(32, 32), actor_hidden_dims=(32, 32), batch_size=B, cuda=False)
    agent = qsm.build_agent(S, A, args, "cpu")
    with torch.no_grad():
        for name, param, view in all_pairs(agent):
            view(param).copy_(torch.from_numpy(G[f"init/{name}"]))
    return agent, args


@pytest.fixture()
def batch(qsm):
    return qsm.Batch(*(torch.from_numpy(G[f"batch/{k}"]) for k in ("obs", "actions", "rewards", "next_obs", "masks")))


def test_the_fixture_is_this_scripts_default_configuration(qsm):
    args = vars(qsm.Args())
    for key in (
        "T",
        "M_q",
        "ddpm_temperature",
        "tau",
        "target_noise",
        "exploration_noise",
        "critic_lr",
        "actor_lr",
        "actor_lr_decay_steps",
    ):
        assert G[f"meta/{key}"] == args[key], key
    assert G["meta/clip_sampler"] and args["sampler_clip"] == "x_t"  # the official code clips every x_t
    assert (args["score_target"], args["normalize_q_grad"], args["best_of_n"]) == ("paper", False, 1)
    assert G["meta/discount"] == args["gamma"] and args["beta_schedule"] == "vp"
    assert int(G["meta/time_dim"]) == 64 and tuple(G["meta/cond_hidden_dims"]) == (128, 128)


@pytest.mark.parametrize("name", ["vp", "cosine", "linear"])
def test_schedules(qsm, name):
    schedule = qsm.DiffusionSchedule(name, T)
    for key in ("betas", "alphas", "alpha_bars"):
        np.testing.assert_allclose(getattr(schedule, key), G[f"schedule/{name}/{key}"], rtol=0, atol=2e-6)


def test_networks_at_the_initial_parameters(qsm, agent, batch):
    agent, _ = agent
    assert scale_error(agent.critic(batch.obs, batch.actions), G["at_init/q"]) < 1e-5
    for t in range(T):
        eps = agent.denoiser(batch.obs, batch.actions, torch.full((B,), t))
        assert scale_error(eps, G["at_init/eps_theta"][t]) < 1e-5, t
        shared = agent.denoiser(batch.obs, batch.actions, torch.full((1,), t))  # one t for the batch, as the sampler
        torch.testing.assert_close(shared, eps, rtol=1e-6, atol=1e-6)
    # grad_a Q_i by autograd on each critic alone; the QSM target is -M_q times their mean
    actions = batch.actions.clone().requires_grad_()
    q = agent.critic(batch.obs, actions)
    dq_da = torch.stack([torch.autograd.grad(q[i].sum(), actions, retain_graph=True)[0] for i in range(2)])
    assert scale_error(dq_da, G["at_init/dq_da"]) < 1e-5
    target = qsm.qsm_target(qsm.grad_a_q(agent.critic, batch.obs, batch.actions), float(G["meta/M_q"]))
    assert scale_error(target, -G["meta/M_q"] * G["at_init/dq_da"].mean(0)) < 1e-5


def test_td_target_and_critic_loss_gradients(qsm, agent, batch, monkeypatch):
    agent, args = agent
    seen = {}
    agent.critic_target.register_forward_hook(lambda m, inputs, out: seen.update(noisy=inputs[1], next_q=out))
    draws = Draws(monkeypatch, *TD_DRAWS)
    schedule = agent.noise_schedule
    loss, metrics = qsm.critic_loss(agent.critic, agent.critic_target, agent.denoiser, schedule, batch, args)
    draws.done()
    assert scale_error(seen["noisy"], G["td/next_actions_noisy"]) < 5e-5
    assert scale_error(seen["next_q"], G["td/next_q"]) < 1e-5
    assert scale_error(metrics["losses/td_target"], G["td/y"].mean()) < 5e-5
    qf = torch.stack([metrics["losses/qf1_loss"], metrics["losses/qf2_loss"]])
    assert scale_error(qf, G["td/loss"]) < 1e-5
    loss.backward()  # each critic is stepped on the gradient of its own loss: the sum, not the mean
    check_gradients(critic_pairs(agent.critic, "critic"))


def test_td_target_values(qsm, agent, batch, monkeypatch):
    agent, args = agent
    draws = Draws(monkeypatch, *TD_DRAWS)
    y, next_actions = qsm.td_target(agent.critic_target, agent.denoiser, agent.noise_schedule, batch, args)
    draws.done()
    assert scale_error(next_actions, G["td/next_actions"]) < 5e-5
    assert scale_error(y, G["td/y"]) < 5e-5


def check_gradients(pairs, key="grad"):
    """Per tensor to 1e-4 (scale-relative), and the gradient's overall scale per network to 1e-4."""
    dot, norm = 0.0, 0.0
    for name, param, view in pairs:
        grad, ref = view(param.grad).double().numpy(), G[f"{key}/{name}"].astype(np.float64)
        assert scale_error(grad, ref) < 1e-4, name
        dot, norm = dot + (grad * ref).sum(), norm + (ref * ref).sum()
    assert abs(dot / norm - 1) < 1e-4, dot / norm


def test_qsm_loss_target_and_gradients(qsm, agent, batch, monkeypatch):
    agent, args = agent
    with torch.no_grad():  # the QSM step sees the critics after this update's critic step
        for name, param, view in critic_pairs(agent.critic, "critic"):
            view(param).copy_(torch.from_numpy(G[f"update1/{name}"]))
    seen = {}
    agent.denoiser.register_forward_hook(lambda m, inputs, out: seen.update(a_t=inputs[1], eps_pred=out))
    draws = Draws(monkeypatch, *QSM_DRAWS)
    loss, q_grad = qsm.qsm_loss(agent.denoiser, agent.critic, agent.noise_schedule, batch, args)
    target = qsm.qsm_target(q_grad, args.M_q)
    draws.done()
    assert scale_error(seen["a_t"], G["qsm/a_t"]) < 1e-5
    assert scale_error(seen["eps_pred"], G["qsm/eps_pred"]) < 1e-5
    assert scale_error(target, G["qsm/target"]) < 1e-5
    assert scale_error(target, -G["meta/M_q"] * G["qsm/dq_da"].mean(0)) < 1e-5
    assert scale_error(loss, G["qsm/loss"]) < 1e-5
    loss.backward()
    assert all(p.grad is None for p in agent.critic.parameters())  # the target is a constant
    check_gradients(denoiser_pairs(agent.denoiser))


def test_acting(qsm, agent, monkeypatch):
    agent, args = agent
    obs = torch.from_numpy(G["act/obs"])[None]
    draws = Draws(monkeypatch, *ACT_SAMPLE_DRAWS)
    ddpm_action = qsm.ddpm_sample(agent.denoiser, agent.noise_schedule, obs, args.ddpm_temperature, args.sampler_clip)
    draws.done()
    assert scale_error(ddpm_action[0], G["act/ddpm_action"]) < 5e-5
    draws = Draws(monkeypatch, *ACT_SAMPLE_DRAWS, "draws/act/noise/batched")
    action = qsm.act(agent, obs, args)
    draws.done()
    assert scale_error(action[0], G["act/action"]) < 5e-5


def test_learning_rates(qsm):
    lrs = [3e-4 * qsm.cosine_decay(int(k), int(G["meta/actor_lr_decay_steps"])) for k in G["lr/steps"]]
    np.testing.assert_allclose(lrs, G["lr/actor"], rtol=1e-6, atol=1e-6 * 3e-4)  # float32 gives exactly 0 near the end


def test_one_full_update_equals_the_official_update(qsm, agent, batch, monkeypatch):
    """train_step as the script runs it: critic step, Polyak step, actor step, with the fixture's draws. The
    parameters after it follow FORMAT.md's Adam first-step rule; the gradients it stepped on must match tightly."""
    agent, args = agent
    draws = Draws(monkeypatch, *TD_DRAWS, *QSM_DRAWS)
    lrs = [float(agent.critic_optimizer.param_groups[0]["lr"]), float(agent.actor_optimizer.param_groups[0]["lr"])]
    qsm.train_step(agent, batch, args)
    draws.done()
    np.testing.assert_allclose(lrs, [G["update1/critic_lr"], G["update1/actor_lr"]], rtol=1e-6)
    check_gradients(critic_pairs(agent.critic, "critic"))
    check_gradients(denoiser_pairs(agent.denoiser))
    lr = float(G["update1/critic_lr"])
    for name, param, view in all_pairs(agent):
        got, ref = view(param).detach().double().numpy(), G[f"update1/{name}"].astype(np.float64)
        grad = G[f"grad/{name.replace('target_critic', 'critic')}"]  # a target follows its critic's gradient
        tight = np.abs(grad) > 1e-5
        error = np.abs(got - ref)
        assert error[tight].max(initial=0) <= 1e-6, name
        assert error[~tight].max(initial=0) <= 2 * lr + 1e-6, name
