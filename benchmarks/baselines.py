"""`bash benchmark.sh speed --baselines`: what QSM costs against what a user would run instead (the paper's claim that
it is cheap because only the denoiser is differentiated, never the sampling chain).

The methods, for timing only (no second agent to train: nothing here is run for returns), each a `make_*(obs_dim,
action_dim, width, T, device)` returning `update(batch)`, one training update, and `act(obs)`, one action:
- `qsm`: the script's own agent, `train_step` and `act` (imported, not copied);
- `sac`: CleanRL's sac_continuous_action.py update: twin soft Q networks and their targets, a tanh-Gaussian actor,
  the entropy coefficient tuned automatically; the actor and alpha take 2 steps every 2nd update (policy_frequency 2);
- `td3`: CleanRL's td3_continuous_action.py update: twin Q networks, target smoothing noise, the actor and the
  targets updated every 2nd update (policy_frequency 2);
- `diffusion-bp`: the script's critic update and denoiser, the denoiser trained by back-propagating -Q(s, a) through
  all T steps of the DDPM chain that produced a (Diffusion-QL's actor loss, without its behaviour-cloning term).
The harness times per update and per training step (act + dm_control step + update), round-robin over --repeats,
counts the floating-point operations of one update (torch.utils.flop_counter's formulas) and the peak memory: on CUDA
the peak allocated, on the CPU the growth of a fresh process's peak resident memory over a method's build and 4
updates.
"""

import copy
import itertools
import math
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import speed  # the timing: median_rate

import qsm_continuous as qsm

LOG_STD_MAX, LOG_STD_MIN = 2, -5  # CleanRL's SAC


def mlp(inputs: int, outputs: int, width: int) -> nn.Sequential:
    """CleanRL's networks: two hidden ReLU layers of `width`."""
    return nn.Sequential(
        nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, outputs)
    )


def soft_update(target: nn.Module, source: nn.Module, tau: float = 0.005) -> None:
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters(), strict=True):
            t.copy_(tau * s + (1.0 - tau) * t)


def twin_q(obs_dim, action_dim, width, device):
    """Two Q networks, their targets and one Adam over both (CleanRL's q_optimizer)."""
    qf = nn.ModuleList([mlp(obs_dim + action_dim, 1, width) for _ in range(2)]).to(device)
    return qf, copy.deepcopy(qf).requires_grad_(False)


def q_values(qf, obs, actions):  # (2, B)
    return torch.stack([q(torch.cat([obs, actions], -1)).view(-1) for q in qf])


class SACActor(nn.Module):
    def __init__(self, obs_dim, action_dim, width):
        super().__init__()
        self.body = mlp(obs_dim, 2 * action_dim, width)

    def get_action(self, obs):
        """CleanRL's: a tanh-squashed Gaussian sample (actions in [-1, 1]) and its log-probability, (B, A), (B, 1)."""
        mean, log_std = self.body(obs).chunk(2, dim=-1)
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(log_std) + 1)
        normal = torch.distributions.Normal(mean, log_std.exp())
        x_t = normal.rsample()
        y_t = torch.tanh(x_t)
        log_prob = normal.log_prob(x_t) - torch.log(1 - y_t.pow(2) + 1e-6)
        return y_t, log_prob.sum(1, keepdim=True)


def make_sac(obs_dim, action_dim, width, T, device, gamma=0.99, policy_frequency=2):
    actor = SACActor(obs_dim, action_dim, width).to(device)
    qf, qf_target = twin_q(obs_dim, action_dim, width, device)
    q_opt, actor_opt = torch.optim.Adam(qf.parameters(), 1e-3), torch.optim.Adam(actor.parameters(), 3e-4)
    log_alpha = torch.zeros(1, requires_grad=True, device=device)
    a_opt, target_entropy = torch.optim.Adam([log_alpha], 1e-3), -float(action_dim)
    calls = itertools.count()

    def update(b: qsm.Batch) -> dict:
        alpha = log_alpha.exp().detach()
        with torch.no_grad():  # y = r + gamma (1 - done) (min_i Q_i_targ(s', a') - alpha log pi(a'|s'))
            next_actions, next_log_pi = actor.get_action(b.next_obs)
            next_q = q_values(qf_target, b.next_obs, next_actions).min(0).values - alpha * next_log_pi.view(-1)
            y = b.rewards + gamma * b.masks * next_q
        qf_loss = sum(F.mse_loss(q, y) for q in q_values(qf, b.obs, b.actions))
        q_opt.zero_grad()
        qf_loss.backward()
        q_opt.step()
        losses = {"qf_loss": qf_loss.detach()}
        if next(calls) % policy_frequency == 0:  # TD3-style delay, compensated by as many actor steps
            for _ in range(policy_frequency):
                pi, log_pi = actor.get_action(b.obs)
                actor_loss = (alpha * log_pi - q_values(qf, b.obs, pi).min(0).values.view(-1, 1)).mean()
                actor_opt.zero_grad()
                actor_loss.backward()
                actor_opt.step()
                with torch.no_grad():
                    _, log_pi = actor.get_action(b.obs)
                alpha_loss = (-log_alpha.exp() * (log_pi + target_entropy)).mean()
                a_opt.zero_grad()
                alpha_loss.backward()
                a_opt.step()
                alpha = log_alpha.exp().detach()
            losses |= {"actor_loss": actor_loss.detach(), "alpha_loss": alpha_loss.detach()}
        soft_update(qf_target, qf)
        return losses

    def act(obs):
        with torch.no_grad():
            return actor.get_action(obs)[0]

    return update, act, {"actor": actor, "qf": qf, "qf_target": qf_target, "log_alpha": log_alpha}


def make_td3(obs_dim, action_dim, width, T, device, gamma=0.99, policy_noise=0.2, noise_clip=0.5, policy_frequency=2):
    actor = nn.Sequential(mlp(obs_dim, action_dim, width), nn.Tanh()).to(device)
    actor_target = copy.deepcopy(actor).requires_grad_(False)
    qf, qf_target = twin_q(obs_dim, action_dim, width, device)
    q_opt, actor_opt = torch.optim.Adam(qf.parameters(), 3e-4), torch.optim.Adam(actor.parameters(), 3e-4)
    calls = itertools.count()

    def update(b: qsm.Batch) -> dict:
        with torch.no_grad():  # target policy smoothing: a' = clip(mu_targ(s') + clip(N(0, 0.2^2), -0.5, 0.5))
            noise = (torch.randn_like(b.actions) * policy_noise).clamp(-noise_clip, noise_clip)
            next_actions = (actor_target(b.next_obs) + noise).clamp(-1.0, 1.0)
            y = b.rewards + gamma * b.masks * q_values(qf_target, b.next_obs, next_actions).min(0).values
        qf_loss = sum(F.mse_loss(q, y) for q in q_values(qf, b.obs, b.actions))
        q_opt.zero_grad()
        qf_loss.backward()
        q_opt.step()
        losses = {"qf_loss": qf_loss.detach()}
        if next(calls) % policy_frequency == 0:  # the delayed actor and targets
            actor_loss = -q_values(qf, b.obs, actor(b.obs))[0].mean()  # Q_1 only, as CleanRL
            actor_opt.zero_grad()
            actor_loss.backward()
            actor_opt.step()
            soft_update(actor_target, actor)
            soft_update(qf_target, qf)
            losses["actor_loss"] = actor_loss.detach()
        return losses

    def act(obs):
        with torch.no_grad():
            return actor(obs)

    return update, act, {"actor": actor, "actor_target": actor_target, "qf": qf, "qf_target": qf_target}


def agent_args(width, T):
    return qsm.Args(actor_hidden_dims=(width, width), critic_hidden_dims=(width, width), T=T, cuda=False)


def make_qsm(obs_dim, action_dim, width, T, device):
    args = agent_args(width, T)
    agent = qsm.build_agent(obs_dim, action_dim, args, device)
    return (lambda b: qsm.train_step(agent, b, args)), (lambda obs: qsm.act(agent, obs, args)), vars(agent)


def ddpm_with_grad(denoiser, schedule, obs):
    """The script's reverse chain (x_t clipped after every step) with autograd on: the action a function of every
    denoising step's parameters."""
    x = torch.randn(obs.shape[0], denoiser.action_dim, device=obs.device)
    for t in reversed(range(schedule.T)):
        alpha, alpha_bar, beta = schedule.alphas[t], schedule.alpha_bars[t], schedule.betas[t]
        eps = denoiser(obs, x, torch.full((1,), t, device=obs.device))
        x = (x - (1.0 - alpha) / math.sqrt(1.0 - alpha_bar) * eps) / math.sqrt(alpha)
        x = (x + math.sqrt(beta) * torch.randn_like(x) if t > 0 else x).clamp(-1.0, 1.0)
    return x


def make_diffusion_bp(obs_dim, action_dim, width, T, device):
    args = agent_args(width, T)
    agent = qsm.build_agent(obs_dim, action_dim, args, device)

    def update(b: qsm.Batch) -> dict:
        metrics = qsm.update_critic(agent, b, args)  # the same critic step as QSM
        actor_loss = -agent.critic(b.obs, ddpm_with_grad(agent.denoiser, agent.noise_schedule, b.obs)).mean()
        agent.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()  # through all T denoising steps
        agent.actor_optimizer.step()
        return metrics | {"actor_loss": actor_loss.detach()}

    return update, (lambda obs: qsm.act(agent, obs, args)), vars(agent)


METHODS = {"qsm": make_qsm, "sac": make_sac, "td3": make_td3, "diffusion-bp": make_diffusion_bp}
DIFFUSION = ("qsm", "diffusion-bp")


def configurations(widths=(256, 512), batches=(256, 512, 1024), steps=(5, 10, 20)):
    """(method, width, batch, T): SAC and TD3 at CleanRL's width (256) and the script's (512); the diffusion methods
    at the script's width and every T; every batch size."""
    for method in METHODS:
        for width, batch, T in itertools.product(
            widths if method in ("sac", "td3") else (512,), batches, steps if method in DIFFUSION else (None,)
        ):
            yield method, width, batch, T


def random_batch(obs_dim, action_dim, size, device) -> qsm.Batch:
    return qsm.Batch(
        torch.randn(size, obs_dim, device=device),
        torch.rand(size, action_dim, device=device) * 2 - 1,
        torch.randn(size, device=device),
        torch.randn(size, obs_dim, device=device),
        torch.ones(size, device=device),
    )


def peak_mib(config, env_id) -> float:
    """The growth of the peak resident memory of a fresh process over one configuration's build and 4 updates, in
    MiB: networks, optimisers and the largest update's activations (a subprocess: the peak of this one only grows)."""
    result = subprocess.run(
        [sys.executable, __file__, "peak", env_id, *map(str, config)], capture_output=True, text=True, check=True
    )
    return float(result.stdout)


def peak_here(env_id, method, width, batch, T) -> float:
    env = qsm.DMCEnv(env_id, seed=0)
    warm_up = torch.nn.Linear(8, 8)  # torch's one-time buffers (thread pools, kernels) are no method's
    torch.optim.Adam(warm_up.parameters()).step(warm_up(torch.randn(4, 8)).sum().backward())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    update, _, _ = METHODS[method](env.obs_dim, env.action_dim, int(width), 5 if T == "None" else int(T), "cpu")
    batch = random_batch(env.obs_dim, env.action_dim, int(batch), "cpu")
    for _ in range(4):
        update(batch)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


class CountFlops(TorchDispatchMode):
    """The floating-point operations of what runs inside, by torch.utils.flop_counter's formulas (matrix products,
    convolutions, attention). FlopCounterMode itself tracks modules with hooks that torch.func.grad, which QSM's
    target uses, does not allow."""

    total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket in flop_registry:
            self.total += flop_registry[func._overloadpacket](*args, **(kwargs or {}), out_val=out)
        return out


def measure(config, env, device, calls=5, windows=3) -> dict:
    """One configuration, built fresh: updates/s and training steps/s (medians over `windows` of `calls` each; the
    heaviest update, T = 20 at batch 1024, takes about a second on one CPU core), the FLOPs of one update, and on CUDA
    the peak allocated memory (on the CPU: peak_mib, once per configuration)."""
    method, width, batch_size, T = config
    torch.manual_seed(0)
    update, act, _ = METHODS[method](env.obs_dim, env.action_dim, width, T or 5, device)
    batch = random_batch(env.obs_dim, env.action_dim, batch_size, device)
    for _ in range(3):  # warm-up
        update(batch)
    with CountFlops() as flops:  # two updates: SAC's and TD3's actors step every second one
        update(batch)
        update(batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    obs = [env.reset()]

    def step():  # act + environment step + update (the batch reused: sampling is the same for all)
        action = act(torch.as_tensor(obs[0], device=device).unsqueeze(0))[0].cpu().numpy()
        obs[0], _, _, done = env.step(action)
        obs[0] = env.reset() if done else obs[0]
        update(batch)

    rates = {
        "updates": speed.median_rate(lambda: update(batch), device, windows, calls),
        "steps": speed.median_rate(step, device, windows, calls),
    }
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else math.nan
    return {
        "updates/s": rates["updates"],
        "steps/s": rates["steps"],
        "GFLOP/update": flops.total / 2e9,
        "peak MiB": peak,
    }


def compare(env_id, repeats, device, out=None):
    """Every configuration on env_id's dimensions, round-robin over repeats; prints a table of medians (and writes
    a plot to `out`)."""
    env = qsm.DMCEnv(env_id, seed=0)
    configs, results = list(configurations()), {}
    peaks = {config: peak_mib(config, env_id) for config in configs} if device.type == "cpu" else {}
    for round_ in range(repeats):
        for config in configs:
            results.setdefault(config, []).append(
                measure(config, env, device) | ({"peak MiB": peaks[config]} if peaks else {})
            )
            print(
                f"round {round_ + 1}/{repeats}: {config}: {results[config][-1]['steps/s']:.1f} steps/s",
                file=sys.stderr,
                flush=True,
            )
    keys = ["steps/s", "updates/s", "GFLOP/update", "peak MiB"]
    print(f"\n{env_id} (obs {env.obs_dim}, actions {env.action_dim}); medians of {repeats} round(s)")
    print("| method | width | batch | T | " + " | ".join(keys) + " |\n|" + "---|" * (4 + len(keys)))
    table = {}
    for (method, width, batch, T), rounds in results.items():
        table[method, width, batch, T] = {k: statistics.median(r[k] for r in rounds) for k in keys}
        cells = " | ".join(f"{table[method, width, batch, T][k]:.{1 if k != 'GFLOP/update' else 2}f}" for k in keys)
        print(f"| {method} | {width} | {batch} | {T or '-'} | {cells.replace('nan', '-')} |")
    if out:
        plot(table, out)
    return table


def plot(table, out):
    """Training steps/s against the batch (T = 5 for the diffusion methods), and against T at batch 256."""
    import report

    plt = report.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    lines = sorted({(m, w) for m, w, _, T in table if T in (None, 5)})
    color = {method: f"C{i}" for i, method in enumerate(METHODS)}
    for method, width in lines:
        points = sorted(
            (b, v["steps/s"]) for (m, w, b, T), v in table.items() if (m, w) == (method, width) and T in (None, 5)
        )
        left.plot(
            *zip(*points, strict=True),
            marker="o",
            color=color[method],
            label=f"{method} {width}",
            linestyle="--" if width == 256 else "-",
        )
    for method in DIFFUSION:
        points = sorted((T, v["steps/s"]) for (m, _, b, T), v in table.items() if m == method and b == 256)
        right.plot(*zip(*points, strict=True), marker="o", color=color[method], label=method)
    left.set(xscale="log", xlabel="batch", ylabel="training steps/s", title="T = 5 for the diffusion methods")
    right.set(xlabel="diffusion steps T", ylabel="training steps/s", title="batch 256, width 512")
    left.set_xticks([256, 512, 1024], ["256", "512", "1024"])
    left.minorticks_off()
    for ax in (left, right):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":  # python benchmarks/baselines.py peak ENV_ID METHOD WIDTH BATCH T: peak_mib's subprocess
    print(peak_here(*sys.argv[2:]))
