"""Q-score matching (QSM) on dm_control and Gymnasium MuJoCo tasks, in one file: read it top to bottom, run it, copy it.

Psenka, Escontrela, Abbeel, Ma, "Learning a Diffusion Model Policy from Rewards via Q-Score Matching", ICML 2024,
https://arxiv.org/abs/2312.11752. Run: `python qsm_continuous.py --env-id cheetah-run` (`--help`: every flag).

QSM in a few lines (the paper's Algorithm 1). The policy is a DDPM: from a_T ~ N(0, I), T reverse steps
    a_{t-1} = clip((a_t - beta_t / sqrt(1 - alpha_bar_t) * eps_theta(s, a_t, t)) / sqrt(alpha_t) + sqrt(beta_t) z)
turn noise into an action in [-1, 1]^A. The critics learn by TD on actions drawn from that sampler,
    y = r + gamma * mask * min_i Q_i_targ(s', a'),  a' = clip(DDPM(s') + N(0, target_noise^2)),
    L(phi) = sum_i mean (Q_i(s, a) - y)^2,
and the denoiser is regressed onto the critics' action gradient at replay actions a noised by the forward process,
a_t = sqrt(alpha_bar_t) a + sqrt(1 - alpha_bar_t) eps:
    L(theta) = mean || eps_theta(s, a_t, t) - (-M_q * grad_a Q(s, a_t)) ||^2,  Q = mean_i Q_i.
Each reverse step subtracts eps_theta, so every denoising step climbs Q. Only the denoiser is differentiated, never
the sampling chain. Per environment step, after learning_starts random ones: one critic step, then one score step.

Glossary. denoiser = eps_theta = "the actor" of the flags (--actor-lr, --actor-hidden-dims) and of its optimiser;
critic = the num_q critics Q_i, one module; B batch size, S observation size, A action size, T diffusion steps
(t = 0..T-1, T - 1 the noisiest), beta_t the noise schedule, alpha_t = 1 - beta_t, alpha_bar_t = prod_{k<=t} alpha_k.
"""

import contextlib
import copy
import dataclasses
import difflib
import fcntl
import functools
import itertools
import math
import os
import random
import shutil
import signal
import socket
import sys
import time
import urllib.parse
from typing import Literal, NamedTuple

os.environ.setdefault("MUJOCO_GL", "disable")  # read by MuJoCo's import: no renderer (--capture-video restarts)

import gymnasium as gym
import imageio
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from absl import logging as absl_logging
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

try:  # each loads the renderer MUJOCO_GL names
    import mujoco
    from dm_control import suite
except Exception as error:  # e.g. EGL, for --capture-video, on a machine without libEGL: bad input, one line
    renderer = f"MUJOCO_GL={os.environ['MUJOCO_GL']} ({type(error).__name__})"
    fix = "install it (egl, for --capture-video: libegl1; osmesa: libosmesa6)"
    print(f"error: MuJoCo cannot load the renderer {renderer}; {fix}", file=sys.stderr)
    sys.exit(2)


@dataclasses.dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of Python, NumPy, torch and the task (eval episodes: seed + 10000 + i, probe state: seed + 20000)"""
    cuda: bool = torch.cuda.is_available()
    """train on the GPU (the default where one is visible); `--cuda` without one is an error"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "qsm"
    """the wandb's project name"""
    wandb_entity: str | None = None
    """the entity (team) of wandb's project"""
    save_model: bool = False
    """save the networks, optimisers and args to `runs/{run_name}/{exp_name}.pt` at the end"""
    capture_video: bool = False
    """film the first episode of every evaluation to `videos/{run_name}/step_{N}.mp4` (and to wandb with --track)"""
    evaluate_model: str | None = None
    """no training: load a --save-model file or a checkpoint and run --eval-episodes evaluation episodes"""
    checkpoint_interval: int = 100_000
    """save the training state to `runs/{run_name}/checkpoint.pt` every this many steps, at the end, on a signal"""
    resume: str | None = None
    """continue a run exactly from its run directory or checkpoint (flags not given: the checkpoint's)"""

    env_id: str = "cheetah-run"
    """dm_control's `domain-task` (split at the first `-`: `ball_in_cup-catch`) or a Gymnasium MuJoCo id: `Hopper-v5`"""
    total_timesteps: int = 1_000_000
    """total environment steps (action repeat included)"""
    learning_starts: int = 10_000
    """environment steps of uniformly random actions before the first update"""
    buffer_size: int = 1_000_000
    """the replay memory buffer size (transitions)"""
    batch_size: int = 256
    """the batch size of sample from the replay memory"""
    gamma: float = 0.99
    """the discount factor gamma"""
    tau: float = 0.005
    """target critic smoothing coefficient (Polyak)"""
    critic_lr: float = 3e-4
    """the learning rate of the twin critics (Adam)"""
    actor_lr: float = 3e-4
    """the initial learning rate of the denoiser (Adam, cosine decay)"""
    actor_lr_decay_steps: int = 2_000_000
    """updates over which the denoiser's learning rate decays to 0 by a cosine (the official code's 2e6)"""
    num_q: int = 2
    """number of critics Q_i: the TD target takes their minimum, the QSM target their mean"""
    critic_hidden_dims: tuple[int, ...] = (512, 512)
    """hidden layer sizes of each critic MLP (ReLU)"""
    actor_hidden_dims: tuple[int, ...] = (512, 512)
    """hidden layer sizes of the denoiser MLP (mish)"""
    T: int = 5
    """number of diffusion steps of the DDPM policy"""
    beta_schedule: Literal["vp", "cosine", "linear"] = "vp"
    """noise schedule of the diffusion (the official code's three)"""
    ddpm_temperature: float = 1.0
    """scale of the noise injected at every reverse step of the sampler (0: deterministic chain)"""
    sampler_clip: Literal["x_t", "x0_hat", "final"] = "x_t"
    """where the sampler clips to [-1, 1]: `x_t` after every reverse step (the paper), `x0_hat` the predicted clean
    action inside every step (DDPM's clip_denoised), `final` only the returned action"""
    M_q: float = 50.0
    """the QSM scale alpha: the denoiser regresses onto -M_q * grad_a Q"""
    score_target: Literal["paper", "denoising"] = "paper"
    """the denoiser's target: `paper` -M_q grad_a Q(s, a_t), `denoising` eps - M_q sqrt(1 - alpha_bar_t) grad_a Q"""
    normalize_q_grad: bool = False
    """divide grad_a Q by its batch-mean norm in the target: M_q then sets the target's scale, whatever Q's scale"""
    best_of_n: int = 1
    """act and evaluate with the best by min_i Q_i(s, a) of this many DDPM samples per state (1: one, the paper)"""
    exploration_noise: float = 0.1
    """std of the Gaussian noise added to the DDPM action when acting"""
    target_noise: float = 0.1
    """std of the Gaussian noise added to the DDPM next action in the TD target"""
    utd_ratio: int = 1
    """critic and score updates per environment step (each one a real update on a fresh batch)"""
    eval_interval: int = 10_000
    """evaluate the policy every this many environment steps"""
    eval_episodes: int = 5
    """full episodes per evaluation (DDPM sample, no exploration noise), run side by side"""
    action_repeat: int = 1
    """repeat every action this many control steps, summing the rewards"""
    compile: bool = False
    """compile the losses and the sampler with `torch.compile`"""
    cudagraphs: bool = False
    """replay every update and every acting step from a CUDA graph (needs a GPU; with or without --compile)"""
    bf16: bool = False
    """run the updates' hidden-layer products in bfloat16 (autocast); weights, Adam, Q, losses, acting: float32"""


# ENVIRONMENT: dm_control directly, Gymnasium through its own API, the agent's interface the same for both
class DMCEnv:
    """A dm_control task (`cheetah-run`): actions in [-1, 1], flat float32 observations, action repeat, reset(seed)."""

    def __init__(self, env_id: str, seed: int, action_repeat: int = 1):
        domain, task = env_id.split("-", 1)  # at the first `-` only: `ball_in_cup-catch`, `cartpole-swingup_sparse`
        self.env = suite.load(domain, task, task_kwargs={"random": seed}, environment_kwargs={"flat_observation": True})
        spec = self.env.action_spec()
        self.action_low = spec.minimum.astype(np.float64)
        self.action_high = spec.maximum.astype(np.float64)
        self.obs_dim = self.env.observation_spec()["observations"].shape[0]
        self.action_dim = spec.shape[0]
        self.action_repeat = action_repeat

    def rescale(self, action: np.ndarray) -> np.ndarray:  # [-1, 1] -> [minimum, maximum] of the action spec
        return self.action_low + (np.clip(action, -1.0, 1.0) + 1.0) * 0.5 * (self.action_high - self.action_low)

    def reset(self, seed: int | None = None) -> np.ndarray:
        if seed is not None:
            self.env.task.random.seed(seed)
        return self.env.reset().observation["observations"].astype(np.float32)

    def step_once(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool]:  # (obs, reward, terminated, done)
        time_step = self.env.step(self.rescale(action))
        obs = time_step.observation["observations"].astype(np.float32)
        return obs, time_step.reward or 0.0, time_step.discount == 0.0, time_step.last()  # a time limit: discount 1

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, float, bool]:
        """-> (next_obs, summed reward, mask, done): the action repeated; mask 0 at a true terminal state only"""
        reward = 0.0
        for _ in range(self.action_repeat):
            obs, step_reward, terminated, done = self.step_once(action)
            reward += float(step_reward)
            if done:
                break
        return obs, reward, 0.0 if terminated else 1.0, done


class GymEnv(DMCEnv):
    """A Gymnasium MuJoCo task (`Hopper-v5`) behind DMCEnv's interface (its rescale and action repeat)."""

    def __init__(self, env_id: str, seed: int, action_repeat: int = 1):
        self.env = gym.make(env_id)
        self.env.reset(seed=seed)  # seeds the task's RNG, as suite.load's `random` does; later resets draw on from it
        self.action_low = self.env.action_space.low.astype(np.float64)
        self.action_high = self.env.action_space.high.astype(np.float64)
        self.obs_dim = self.env.observation_space.shape[0]
        self.action_dim = self.env.action_space.shape[0]
        self.action_repeat = action_repeat

    def reset(self, seed: int | None = None) -> np.ndarray:
        return self.env.reset(seed=seed)[0].astype(np.float32)

    def step_once(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool]:
        obs, reward, terminated, truncated, _ = self.env.step(self.rescale(action))
        return obs.astype(np.float32), float(reward), terminated, terminated or truncated  # truncated: the time limit


def make_env(env_id: str, seed: int, action_repeat: int = 1) -> DMCEnv:
    return (GymEnv if env_id in gym.envs.registry else DMCEnv)(env_id, seed, action_repeat)


# ALGO LOGIC: the networks
def mish(x: torch.Tensor) -> torch.Tensor:
    """The denoiser's activation mish(x) = x tanh(softplus(x)) = x n / (n + 2), n = e^x (e^x + 2): one exp, faster."""
    e = torch.exp(x.clamp(max=20.0))  # clamped inside the exp only: for x > 20 the ratio is 1 in float32
    n = e * (e + 2.0)
    return x * (n / (n + 2.0))


class TwinCritic(nn.Module):
    """Q_i(s, a), i = 1..num_q: ReLU MLPs on concat(s, a) with stacked weights, evaluated in one batched product per
    layer. Any change here reaches the QSM target too: it differentiates this forward with autograd."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims: tuple[int, ...], num_q: int = 2):
        super().__init__()
        dims = (obs_dim + action_dim, *hidden_dims, 1)
        # per layer W (num_q, in, out), a layer computing x @ W + b; each critic Xavier-uniform, as the official init
        weights = []
        for i, o in itertools.pairwise(dims):
            weights.append(torch.stack([nn.init.xavier_uniform_(torch.empty(i, o)) for _ in range(num_q)]))
        self.weights = nn.ParameterList(weights)
        self.biases = nn.ParameterList(torch.zeros(num_q, 1, o) for o in dims[1:])

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """(B, S), (B, A) -> Q values (num_q, B)."""
        x = torch.cat([obs, actions], dim=-1).expand(len(self.weights[0]), -1, -1)  # (num_q, B, S + A)
        for weight, bias in zip(self.weights[:-1], self.biases[:-1], strict=True):
            x = F.relu(torch.baddbmm(bias, x, weight))
        with torch.autocast(x.device.type, enabled=False):  # Q in float32 under --bf16 too: bf16 rounds 100 by 0.5
            return torch.baddbmm(self.biases[-1], x.to(self.weights[-1].dtype), self.weights[-1]).squeeze(-1)


class Denoiser(nn.Module):
    """eps_theta(s, a_t, t), t the integer step 0..T-1 (the official code's): Fourier features [cos 2 pi t W, sin 2 pi
    t W] -> the time MLP `cond` (128, 128, mish) -> an embedding; an MLP (mish) on concat(a_t, s, embedding) -> eps."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims: tuple[int, ...], T: int, *, time_dim: int = 64):
        super().__init__()
        self.fourier_kernel = nn.Parameter(torch.randn(time_dim // 2, 1) * 0.2)  # W ~ N(0, 0.2^2), learned
        self.cond = nn.ModuleList([nn.Linear(time_dim, 128), nn.Linear(128, 128)])  # the time MLP
        dims = (action_dim + obs_dim + 128, *hidden_dims)
        self.mlp = nn.ModuleList(nn.Linear(i, o) for i, o in itertools.pairwise(dims))
        self.out = nn.Linear(dims[-1], action_dim)
        for layer in [*self.cond, *self.mlp, self.out]:  # the official init: Xavier-uniform weights, zero biases
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.action_dim = action_dim
        self.T = T

    def forward(self, obs: torch.Tensor, noisy_actions: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B, S), (B, A), integer steps t (B,), or (1,) for one step shared by the batch -> predicted noise (B, A).
        The one definition of the network: the QSM loss and the sampler (acting, TD target, evaluation) call it."""
        # t takes T values: the time embedding of each once, (T, .), then row t for every sample
        steps = torch.arange(self.T, device=t.device).float().unsqueeze(-1)
        f = 2 * math.pi * steps * self.fourier_kernel.T  # (T, time_dim / 2), float32 always
        features = torch.cat([torch.cos(f), torch.sin(f)], dim=-1)
        time_embedding = self.cond[1](mish(self.cond[0](features)))  # (T, 128)
        # mlp[0](concat(a_t, s, emb_t)) = W_as [a_t; s] + (W_emb emb_t + b): the embedding's part per step value
        sizes = [self.mlp[0].in_features - time_embedding.shape[-1], time_embedding.shape[-1]]
        W_as, W_emb = self.mlp[0].weight.split(sizes, dim=1)
        time_share = F.linear(time_embedding, W_emb, self.mlp[0].bias)[t]  # (B or 1, H)
        x = mish(F.linear(torch.cat([noisy_actions, obs], dim=-1), W_as) + time_share)
        for layer in self.mlp[1:]:
            x = mish(layer(x))
        return self.out(x)


# ALGO LOGIC: the noise schedule, the sampler and the policy
def beta_schedule(name: str, T: int) -> np.ndarray:
    """beta_t for the steps t = 0..T-1 (float64), as the official code's schedules."""
    match name:
        case "vp":  # beta = 1 - exp(-b_min/T - (b_max - b_min)(2k - 1) / (2 T^2)), k = t + 1 = 1..T
            k = np.arange(1, T + 1)
            b_min = 0.1
            b_max = 10.0
            return 1.0 - np.exp(-b_min / T - 0.5 * (b_max - b_min) * (2 * k - 1) / T**2)
        case "cosine":  # Nichol & Dhariwal (2021), s = 0.008
            alpha_bar = np.cos((np.linspace(0, T, T + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2
            return np.clip(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.0, 0.999)
        case "linear":
            return np.linspace(1e-4, 2e-2, T)
    raise ValueError(f"--beta-schedule {name!r} is unknown; use one of: vp, cosine, linear")


class DiffusionSchedule:
    """The noise schedule: beta_t, alpha_t = 1 - beta_t and alpha_bar_t = prod_{k<=t} alpha_k for t = 0..T-1."""

    def __init__(self, name: str, T: int, device: torch.device | str = "cpu"):
        betas = beta_schedule(name, T)
        self.T = T
        # Python floats for the sampler (constants under torch.compile); alpha_bar also as a tensor, indexed by t
        self.betas = tuple(betas.tolist())
        self.alphas = tuple((1.0 - betas).tolist())
        self.alpha_bars = tuple(np.cumprod(1.0 - betas).tolist())
        self.alpha_bars_tensor = torch.tensor(self.alpha_bars, dtype=torch.float32, device=device)


def ddpm_sample(denoiser, schedule, obs: torch.Tensor, temperature=1.0, clip="x_t", x_T=None) -> torch.Tensor:
    """The reverse DDPM chain from x_T ~ N(0, I) to an action in [-1, 1]^A: (B, S) -> (B, A). No gradient flows."""
    with torch.no_grad():
        x = torch.randn(obs.shape[0], denoiser.action_dim, device=obs.device) if x_T is None else x_T
        for t in reversed(range(schedule.T)):
            alpha = schedule.alphas[t]
            alpha_bar = schedule.alpha_bars[t]
            beta = schedule.betas[t]
            eps_pred = denoiser(obs, x, torch.full((1,), t, device=obs.device))  # one step t for the whole batch
            match clip:
                case "x_t" | "final":  # x_{t-1} = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta) / sqrt(alpha_t)
                    x = (x - beta / math.sqrt(1.0 - alpha_bar) * eps_pred) / math.sqrt(alpha)
                case "x0_hat":  # the posterior mean of q(x_{t-1} | x_t, x0_hat) at the clipped clean action
                    x0_hat = ((x - math.sqrt(1.0 - alpha_bar) * eps_pred) / math.sqrt(alpha_bar)).clamp(-1.0, 1.0)
                    alpha_bar_prev = schedule.alpha_bars[t - 1] if t > 0 else 1.0  # alpha_bar_{t-1}
                    x0_part = math.sqrt(alpha_bar_prev) * beta * x0_hat
                    x = (x0_part + math.sqrt(alpha) * (1.0 - alpha_bar_prev) * x) / (1.0 - alpha_bar)
                case _:
                    raise ValueError(f"--sampler-clip {clip!r} is unknown; use one of: x_t, x0_hat, final")
            if t > 0:  # + sqrt(beta_t) * temperature * z
                x = x + math.sqrt(beta) * temperature * torch.randn_like(x)
            if clip == "x_t":
                x = x.clamp(-1.0, 1.0)
        return x.clamp(-1.0, 1.0)


def policy(agent: "Agent", obs: torch.Tensor, args: Args) -> torch.Tensor:
    """pi(s): one DDPM sample per state (the paper); with --best-of-n N > 1, the best of N samples per state (drawn in
    one sampler call) by min_i Q_i(s, a). (B, S) -> (B, A)."""
    if args.best_of_n == 1:
        return ddpm_sample(agent.denoiser, agent.noise_schedule, obs, args.ddpm_temperature, args.sampler_clip)
    n = args.best_of_n
    obs_n = obs.repeat_interleave(n, dim=0)  # (B N, S): sample k of state j in row j N + k
    actions = ddpm_sample(agent.denoiser, agent.noise_schedule, obs_n, args.ddpm_temperature, args.sampler_clip)
    with torch.no_grad():
        q = agent.critic(obs_n, actions).min(dim=0).values.view(-1, n, 1)  # (B, N, 1)
    return actions.view(-1, n, actions.shape[-1]).take_along_dim(q.argmax(dim=1, keepdim=True), dim=1)[:, 0]


def act(agent: "Agent", obs: torch.Tensor, args: Args) -> torch.Tensor:
    """The behaviour policy: a = clip(pi(s) + N(0, exploration_noise^2), -1, 1). Float32 also under --bf16."""
    a = policy(agent, obs, args)
    return (a + args.exploration_noise * torch.randn_like(a)).clamp(-1.0, 1.0)


# ALGO LOGIC: the replay buffer
class Batch(NamedTuple):
    obs: torch.Tensor  # (B, S)
    actions: torch.Tensor  # (B, A), in [-1, 1]
    rewards: torch.Tensor  # (B,)
    next_obs: torch.Tensor  # (B, S)
    masks: torch.Tensor  # (B,), 0 at a true terminal state, else 1


class ReplayBuffer:
    """A ring buffer of rows [s, a, r, s', mask] in one tensor on the training device, sampled uniformly."""

    def __init__(self, capacity: int, obs_dim: int, action_dim: int, device: torch.device | str = "cpu"):
        # empty, not zeros: rows past `size` are never read, and on the CPU pages never written take no memory
        self.rows = torch.empty(capacity, 2 * obs_dim + action_dim + 2, device=device)
        self.sizes = (obs_dim, action_dim, 1, obs_dim, 1)
        self.capacity = capacity
        self.added = 0  # transitions ever added; the position and the fill follow from it

    pos = property(lambda self: self.added % self.capacity)  # the row the next transition overwrites
    size = property(lambda self: min(self.added, self.capacity))

    def add(self, obs, action, reward: float, next_obs, mask: float) -> None:
        row = np.concatenate([obs, action, [reward], next_obs, [mask]], dtype=np.float32)
        self.rows[self.pos] = torch.from_numpy(row)
        self.added += 1

    def sample_indices(self, batch_size: int) -> torch.Tensor:
        return torch.randint(0, self.size, (batch_size,), device=self.rows.device)

    def gather(self, idx: torch.Tensor) -> Batch:  # separate from sampling: a CUDA graph replays the gather
        obs, actions, rewards, next_obs, masks = torch.split(self.rows[idx], self.sizes, dim=-1)
        return Batch(obs, actions, rewards.squeeze(-1), next_obs, masks.squeeze(-1))


# ALGO LOGIC: Algorithm 1's two losses and their updates
def td_target(critic_target, denoiser, schedule, batch: Batch, args: Args) -> tuple[torch.Tensor, torch.Tensor]:
    """y = r + gamma * mask * min_i Q_i_targ(s', a'), a' = clip(DDPM(s') + N(0, target_noise^2)). Returns (y, a')."""
    with torch.no_grad():
        next_actions = ddpm_sample(denoiser, schedule, batch.next_obs, args.ddpm_temperature, args.sampler_clip)
        noisy_next_actions = (next_actions + args.target_noise * torch.randn_like(next_actions)).clamp(-1.0, 1.0)
        next_q = critic_target(batch.next_obs, noisy_next_actions).min(dim=0).values  # (B,)
        return batch.rewards + args.gamma * batch.masks * next_q, next_actions


def critic_loss(critic, critic_target, denoiser, schedule, batch: Batch, args: Args) -> tuple[torch.Tensor, dict]:
    """sum_i mean_batch (Q_i(s, a) - y)^2: each critic on its own MSE, as the official code (a mean over the critics
    would halve each one's gradient). Returns (loss, detached metrics)."""
    y, next_actions = td_target(critic_target, denoiser, schedule, batch, args)
    q = critic(batch.obs, batch.actions)  # (num_q, B)
    qf_losses = (q - y).pow(2).mean(dim=1)  # (num_q,)
    metrics = {f"losses/qf{i + 1}_loss": loss for i, loss in enumerate(qf_losses)}
    metrics |= {f"losses/qf{i + 1}_values": values.mean() for i, values in enumerate(q)}
    metrics["losses/td_target"] = y.mean()
    metrics["charts/action_saturation"] = (next_actions.abs() >= 1.0).float().mean()  # the share of a' at +-1
    return qf_losses.sum(), {key: value.detach() for key, value in metrics.items()}


def grad_a_q(critic, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """grad_a Q(s, a), Q the mean of the critics, by autograd on the critic's own forward: (B, S), (B, A) -> (B, A)."""
    with torch.no_grad():  # a constant: no gradient reaches the critics (torch.func.grad still differentiates)
        # Q(s_j, a_j) depends on a_j alone, so the gradient of the batch sum holds each sample's own grad_a Q
        return torch.func.grad(lambda a: critic(obs, a).mean(dim=0).sum())(actions)


def qsm_target(q_grad: torch.Tensor, M_q: float, normalize: bool = False) -> torch.Tensor:
    """-M_q * grad_a Q. normalize (--normalize-q-grad): grad_a Q divided by its batch-mean norm, so M_q alone sets
    the scale."""
    if normalize:
        q_grad = q_grad / q_grad.norm(dim=-1).mean().clamp_min(1e-8)
    return -M_q * q_grad


def qsm_loss(denoiser, critic, schedule, batch: Batch, args: Args) -> tuple[torch.Tensor, torch.Tensor]:
    """mean (eps_theta(s, a_t, t) - (-M_q grad_a Q(s, a_t)))^2 at noised replay actions; returns (loss, grad_a Q).
    eps_theta predicts noise and each reverse step subtracts it, so matching -M_q grad_a Q makes every denoising step
    climb Q. Only the denoiser is differentiated, never the sampling chain."""
    t = torch.randint(0, schedule.T, batch.actions.shape[:1], device=batch.actions.device)  # t ~ U{0..T-1}, (B,)
    noise = torch.randn_like(batch.actions)  # eps ~ N(0, I)
    alpha_bar = schedule.alpha_bars_tensor[t].unsqueeze(-1)  # (B, 1)
    noisy_actions = alpha_bar.sqrt() * batch.actions + (1.0 - alpha_bar).sqrt() * noise  # a_t, (B, A)
    q_grad = grad_a_q(critic, batch.obs, noisy_actions)  # grad_a Q(s, a_t), (B, A)
    q_term = qsm_target(q_grad, args.M_q, args.normalize_q_grad)  # -M_q grad_a Q(s, a_t)
    match args.score_target:
        case "paper":  # -M_q grad_a Q(s, a_t)
            target = q_term
        case "denoising":  # eps - M_q sqrt(1 - alpha_bar_t) grad_a Q(s, a_t)
            target = noise + (1.0 - alpha_bar).sqrt() * q_term
        case _:
            raise ValueError(f"--score-target {args.score_target!r} is unknown; use one of: paper, denoising")
    eps_pred = denoiser(batch.obs, noisy_actions, t).float()  # (B, A)
    return (eps_pred - target).pow(2).mean(), q_grad  # eps_theta(s, a_t, t) -> target


@dataclasses.dataclass
class Agent:
    critic: TwinCritic
    critic_target: TwinCritic
    denoiser: Denoiser
    critic_optimizer: torch.optim.Optimizer
    actor_optimizer: torch.optim.Optimizer  # the denoiser's
    actor_scheduler: torch.optim.lr_scheduler.LambdaLR  # the denoiser's learning rate
    noise_schedule: DiffusionSchedule


def cosine_decay(step: int, decay_steps: int) -> float:
    """optax.cosine_decay_schedule's factor: 0.5 (1 + cos(pi min(step, D) / D)), reaching 0 at D and staying there."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, decay_steps) / decay_steps))


def build_agent(obs_dim: int, action_dim: int, args: Args, device) -> Agent:
    """Algorithm 1's start: twin critics, targets equal to them, the denoiser, and their Adam optimisers."""
    critic = TwinCritic(obs_dim, action_dim, args.critic_hidden_dims, args.num_q).to(device)
    critic_target = copy.deepcopy(critic).requires_grad_(False)
    denoiser = Denoiser(obs_dim, action_dim, args.actor_hidden_dims, args.T).to(device)
    # fused: one kernel per Adam step; under CUDA graphs the steps and learning rates live on the GPU (capturable)
    lr = (lambda value: torch.tensor(value, device=device)) if args.cudagraphs else float
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr(args.critic_lr), fused=True, capturable=args.cudagraphs)
    actor_optimizer = torch.optim.Adam(denoiser.parameters(), lr(args.actor_lr), fused=True, capturable=args.cudagraphs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(actor_optimizer, lambda k: cosine_decay(k, args.actor_lr_decay_steps))
    noise_schedule = DiffusionSchedule(args.beta_schedule, args.T, device)
    return Agent(critic, critic_target, denoiser, critic_optimizer, actor_optimizer, scheduler, noise_schedule)


def update_critic(agent: Agent, batch: Batch, args: Args) -> dict:
    """One TD step on the critics, then the Polyak step of the targets. Returns detached metrics (no syncs)."""
    with torch.autocast(batch.obs.device.type, torch.bfloat16, enabled=args.bf16):  # --bf16: the forward only
        loss, logs = critic_loss(agent.critic, agent.critic_target, agent.denoiser, agent.noise_schedule, batch, args)
    agent.critic_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    agent.critic_optimizer.step()
    with torch.no_grad():  # theta_targ <- (1 - tau) theta_targ + tau theta
        torch._foreach_lerp_(list(agent.critic_target.parameters()), list(agent.critic.parameters()), args.tau)
    return logs


def update_actor(agent: Agent, batch: Batch, args: Args) -> dict:
    """One QSM step on the denoiser against the critics just updated. Returns detached metrics (no syncs)."""
    with torch.autocast(batch.obs.device.type, torch.bfloat16, enabled=args.bf16):  # --bf16: the forward only
        loss, q_grad = qsm_loss(agent.denoiser, agent.critic, agent.noise_schedule, batch, args)
    agent.actor_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    agent.actor_optimizer.step()
    return {"losses/actor_loss": loss.detach(), "losses/q_grad_norm": q_grad.norm(dim=-1).mean()}


def train_step(agent: Agent, batch: Batch, args: Args) -> dict:
    """Algorithm 1's update on one batch: a TD step on the critics, then a score step on the denoiser."""
    return update_critic(agent, batch, args) | update_actor(agent, batch, args)


# TRAINING LOOP: Algorithm 1 over the environment's steps
def train(args: Args, saved: dict | None = None, run_dir: str | None = None) -> int:
    """Trains from scratch or on from a checkpoint (`saved`, in `run_dir`); returns the exit status (Run's)."""
    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.cuda else "cpu")
    env = make_env(args.env_id, args.seed, args.action_repeat)  # the training task, seeded with the run's seed

    # ALGO LOGIC: initialise the critics, their targets, the denoiser and an empty replay buffer
    agent = build_agent(env.obs_dim, env.action_dim, args, device)
    rb = make_replay_buffer(args, env.obs_dim, env.action_dim, device)  # ReplayBuffer, if it fits in memory
    update, explore = speed_up(agent, rb, args)  # train_step and act, compiled and graphed when asked

    # the run directory, logging, evaluation, checkpoints, signals; on --resume the checkpoint's state
    with Run(args, agent, rb, env, saved, run_dir) as run:
        obs, episode_return, episode_length = run.episode  # a fresh env.reset(), or the checkpoint's episode
        for global_step in run.steps:  # 0, action_repeat, 2 action_repeat, ... < total_timesteps
            # ALGO LOGIC: act (uniformly at random before learning starts), step the task, store the transition
            if global_step < args.learning_starts:
                action = np.random.uniform(-1.0, 1.0, env.action_dim).astype(np.float32)
            else:
                action = explore(torch.as_tensor(obs, device=device).unsqueeze(0))[0].cpu().numpy()
            next_obs, reward, mask, done = env.step(action)
            rb.add(obs, action, reward, next_obs, mask)
            obs = next_obs  # CRUCIAL step easy to overlook: the next action is taken from the next state
            episode_return += reward
            episode_length += args.action_repeat
            if done:
                run.log_episode(global_step, episode_return, episode_length)
                obs = env.reset()
                episode_return = 0.0
                episode_length = 0

            # ALGO LOGIC: Algorithm 1's update, a critic step then a score step, utd_ratio times per environment step
            if global_step >= args.learning_starts:
                for _ in range(args.utd_ratio):
                    metrics = update(rb.sample_indices(args.batch_size))  # train_step on the batch at these indices
                    agent.actor_scheduler.step()
                    run.record(global_step, metrics)

            # TRY NOT TO MODIFY: losses every 100 steps, evaluations, checkpoints, a signal's stop
            if run.end_of_step(global_step, (obs, episode_return, episode_length)):
                break
    return run.exit_status


# RUN INFRASTRUCTURE: nothing below changes what is learned. Evaluation and logging, speed (torch.compile, CUDA
# graphs), argument checks and resume, run directories and locks, checkpoints, the NaN guard, wandb, signals.
def evaluate(envs: list[DMCEnv], agent: Agent, args: Args, device, video: str | None = None) -> np.ndarray:
    """One episode per env, side by side, no exploration noise; env i reseeded with seed + 10000 + i every time."""
    obs = np.stack([env.reset(seed=args.seed + 10_000 + i) for i, env in enumerate(envs)])
    returns = np.zeros(len(envs))
    running = np.ones(len(envs), dtype=bool)
    frames = []
    while running.any():
        if video and running[0]:  # film the first episode
            frames.append(render(envs[0]))
        actions = policy(agent, torch.as_tensor(obs[running], device=device), args).cpu().numpy()
        for action, i in zip(actions, np.flatnonzero(running), strict=True):
            obs[i], reward, _, done = envs[i].step(action)
            returns[i] += reward
            running[i] = not done
    if video:
        os.makedirs(os.path.dirname(video), exist_ok=True)
        imageio.mimwrite(video, frames, fps=frames_per_second(envs[0]), macro_block_size=8)
        if isinstance(envs[0], GymEnv):  # free its GL context now: Gymnasium's viewer frees it at exit, after EGL's end
            renderer = envs[0].env.unwrapped.mujoco_renderer
            renderer._viewers.clear()
            renderer.viewer = None
    return returns


def render(env: DMCEnv) -> np.ndarray:
    """One frame of the task: dm_control's camera 0 at 320x240, Gymnasium's default camera and size (480x480)."""
    if isinstance(env, GymEnv):
        return env.env.unwrapped.mujoco_renderer.render("rgb_array")
    return env.env.physics.render(height=240, width=320, camera_id=0)


def frames_per_second(env: DMCEnv) -> int:
    """The video's rate: one frame per agent step (the control step times the action repeat), at most 60."""
    control_step = env.env.unwrapped.dt if isinstance(env, GymEnv) else env.env.control_timestep()
    return min(60, round(1 / (control_step * env.action_repeat)))


def evaluate_and_log(agent: Agent, args: Args, eval_envs, probe_obs, writer, step: int) -> float:
    """Logs eval returns, the probe state's actions (paper, Fig. 4), a video; returns its seconds. RNGs forked."""
    start = time.time()
    run_name = os.path.basename(os.path.abspath(writer.log_dir))
    video = f"videos/{run_name}/step_{step}.mp4" if args.capture_video else None
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if probe_obs.is_cuda else []):
        returns = evaluate(eval_envs, agent, args, probe_obs.device, video)
        probe_states = probe_obs.expand(1000, -1)
        probe = ddpm_sample(
            agent.denoiser, agent.noise_schedule, probe_states, args.ddpm_temperature, args.sampler_clip
        )
        probe = probe.cpu()
    writer.add_scalar("eval/episodic_return", returns.mean(), step)
    writer.add_scalar("eval/episodic_return_std", returns.std(), step)
    for dim in range(probe.shape[1]):  # buckets 0.01 wide: the share near +-1 and the modes are read off them
        writer.add_histogram(f"eval/action_dim_{dim}", probe[:, dim], step, bins=np.linspace(-1.0, 1.0, 201))
    tqdm.write(f"step {step}: eval return {returns.mean():.1f} +- {returns.std():.1f}")
    if video and args.track:
        import wandb

        wandb.log({"videos/eval": wandb.Video(video, format="mp4")})
    return time.time() - start


def speed_up(agent: Agent, rb: ReplayBuffer, args: Args):
    """(update, explore): train_step on the batch at given indices, and act. --compile rebinds this module's losses
    and sampler to compiled versions, so every caller (updates, acting, evaluation) gets them; --cudagraphs replays
    each of the two from a CUDA graph. The same math either way."""
    global critic_loss, qsm_loss, ddpm_sample
    if args.compile:
        critic_loss = torch.compile(critic_loss)
        qsm_loss = torch.compile(qsm_loss)
        ddpm_sample = torch.compile(ddpm_sample)

    def update(idx: torch.Tensor) -> dict:  # gathers its own batch: a CUDA graph replays the gather too
        return train_step(agent, rb.gather(idx), args)

    explore = functools.partial(act, agent, args=args)
    if args.cudagraphs:
        return CudaGraph(update), CudaGraph(explore)
    return update, explore


class CudaGraph:
    """fn(x) replayed from a CUDA graph: one launch for an update's hundreds of kernels (LeanRL's trick). `warmup` real
    eager calls, then a capture; exact as fn reads only x and tensors updated in place. Outputs get overwritten."""

    def __init__(self, fn, warmup: int = 3):
        self.fn = fn
        self.warmup = warmup
        self.graph = None
        self.input = None

    def __call__(self, x: torch.Tensor):
        # every call, warm-ups too, reads the same input tensor: torch.compile never recompiles in a capture
        self.input = x.clone() if self.input is None else self.input.copy_(x)
        if self.warmup > 0:
            self.warmup -= 1
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                outputs = self.fn(self.input)
            torch.cuda.current_stream().wait_stream(stream)
            return outputs
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = self.fn(self.input)
        self.graph.replay()
        return self.outputs


class Failure(Exception):
    """Bad input, a failed write, a non-finite loss: `__main__` prints it as one line `error: ...` and exits 2."""


def fail(message: str) -> None:
    raise Failure(message)


# the flags that may change when a run resumes without changing what it learns; any other change is named
RUN_FIELDS = (
    "exp_name",
    "cuda",
    "track",
    "wandb_project_name",
    "wandb_entity",
    "save_model",
    "capture_video",
    "evaluate_model",
    "checkpoint_interval",
    "resume",
    "total_timesteps",
    "eval_interval",
    "eval_episodes",
    "compile",
    "cudagraphs",
)
RESUME_FIXED = ("env_id", "seed", "action_repeat", "buffer_size", "num_q", "critic_hidden_dims", "actor_hidden_dims")
POSITIVE = (
    "total_timesteps",
    "buffer_size",
    "batch_size",
    "critic_lr",
    "actor_lr",
    "actor_lr_decay_steps",
    "T",
    "M_q",
    "num_q",
    "critic_hidden_dims",
    "actor_hidden_dims",
    "utd_ratio",
    "eval_interval",
    "eval_episodes",
    "action_repeat",
    "best_of_n",
)
NON_NEGATIVE = ("checkpoint_interval", "learning_starts", "ddpm_temperature", "exploration_noise", "target_noise")
MAX_SEED = 2**32 - 20_000  # NumPy's seeds end at 2^32; the probe state's seed is seed + 20000
RANGES = {
    "seed": (lambda v: 0 <= v < MAX_SEED, "in [0, 2^32 - 20000)"),
    "tau": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "gamma": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    **dict.fromkeys(POSITIVE, (lambda v: v > 0, "positive")),
    **dict.fromkeys(NON_NEGATIVE, (lambda v: v >= 0, ">= 0")),
}


DMC_IDS = tuple(f"{domain}-{task}" for domain, task in suite.ALL_TASKS)
GYM_IDS = tuple(i for i, spec in gym.envs.registry.items() if str(spec.entry_point).startswith("gymnasium.envs.mujoco"))
ENV_IDS = DMC_IDS + GYM_IDS  # Gymnasium's MuJoCo tasks, v4 and v5: they build on mujoco 3 (v2/v3 need mujoco-py)


def env_id_problem(env_id: str) -> str | None:
    """One line for an id of neither family (naming the nearest valid one) or of a mujoco-py task; else None."""
    if env_id in ENV_IDS:
        return None
    name, _, version = env_id.rpartition("-v")
    if f"{name}-v5" in GYM_IDS and version.isdigit():  # Hopper-v2, Hopper-v3: Gymnasium 1.x has no mujoco-py tasks
        return (
            f"--env-id {env_id} needs mujoco-py (Gymnasium moved its v2/v3 MuJoCo tasks to gymnasium-robotics); "
            f"use {name}-v5 (or {name}-v4), which run on the mujoco package"
        )
    nearest = difflib.get_close_matches(env_id, ENV_IDS, n=1)
    hint = f"did you mean {nearest[0]!r}? " if nearest else ""
    return (
        f"--env-id {env_id!r} is neither a dm_control task nor a Gymnasium MuJoCo task; {hint}valid ids: "
        + ", ".join(ENV_IDS)
    )


def check_args(args: Args) -> str | None:
    """The first problem with `args` as a one-line message naming the flag and the fix, or None."""
    for name, (ok, rule) in RANGES.items():
        value = getattr(args, name)
        flag = f"--{name.replace('_', '-')}"
        if value == ():
            return f"{flag} needs one or more positive sizes"
        for v in value if isinstance(value, tuple) else (value,):
            if not math.isfinite(v) or not ok(v):
                return f"{flag} must be {rule if math.isfinite(v) else 'finite'}, got {v}"
    if problem := env_id_problem(args.env_id):
        return problem
    if args.learning_starts >= args.total_timesteps:
        return (
            f"--learning-starts {args.learning_starts} is not below --total-timesteps {args.total_timesteps}: the run "
            "would make no update; lower --learning-starts or raise --total-timesteps (a random policy's return: "
            "bash benchmark.sh random-policy)"
        )
    if args.batch_size > args.buffer_size:
        return f"--batch-size {args.batch_size} exceeds --buffer-size {args.buffer_size}; lower one or raise the other"
    if args.cuda and not torch.cuda.is_available():
        return "--cuda was given but torch sees no CUDA device; drop --cuda or install a CUDA build of torch (README)"
    if args.cudagraphs and not args.cuda:
        return "--cudagraphs needs a CUDA device (--cuda); on the CPU, run with --no-cudagraphs"
    cxx = os.environ.get("CXX", "g++")
    if args.compile and not args.cuda and not shutil.which(cxx):  # inductor's CPU kernels are C++
        return f"--compile on the CPU needs a C++ compiler ({cxx}); install one or run with --no-compile"


def load_checkpoint(path: str, flag: str) -> tuple[str, dict]:
    """(file, state) of a checkpoint or --save-model file, given it or its run directory; else a one-line error."""
    file = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
    try:  # weights_only: loading runs no pickled code
        state = torch.load(file, map_location="cpu", weights_only=True)
        fields = {name: value for name, value in state["args"].items() if name in Args.__dataclass_fields__}
        return file, state | {"args": Args(**fields)}  # without flags removed since (--torch-deterministic)
    except Exception as error:  # missing, truncated, corrupt or not one of this script's files
        fail(f"{flag} {path}: no readable checkpoint or --save-model file at {file} ({type(error).__name__})")


def resume_args(args: Args) -> tuple[Args, str, dict]:
    """--resume: the checkpoint's settings, overridden by the flags given now; returns (args, run dir, state)."""
    file, state = load_checkpoint(args.resume, "--resume")
    if "buffer" not in state:
        fail(f"--resume {args.resume}: {file} is a --save-model file, not a checkpoint; use runs/RUN/checkpoint.pt")
    saved = state["args"]  # the command line again, with the checkpoint's values as its defaults:
    args = tyro.cli(Args, default=dataclasses.replace(saved, resume=args.resume, cuda=torch.cuda.is_available()))
    changed = []
    for name in (f.name for f in dataclasses.fields(Args) if f.name not in RUN_FIELDS):
        now, was = (" ".join(map(str, v)) if isinstance(v, tuple) else v for v in (vars(args)[name], vars(saved)[name]))
        flag = f"--{name.replace('_', '-')}"
        if now != was and name in RESUME_FIXED:
            fail(
                f"--resume: the checkpoint was trained with {flag} {was}, this run asks for {now}; drop {flag} to "
                "continue that run, or start a new one"
            )
        if now != was:
            changed.append(f"{flag} {now} (was {was})")
    if changed:
        print(f"note: resuming with {', '.join(changed)}: the run no longer continues exactly", file=sys.stderr)
    if args.total_timesteps <= state["global_step"]:  # so the training loop runs at least once
        fail(
            f"--resume: the checkpoint is at step {state['global_step']}, its --total-timesteps is "
            f"{args.total_timesteps}: nothing to train; raise --total-timesteps to train on"
        )
    return args, os.path.dirname(file) or ".", state


def command_line() -> tuple[Args, dict | None, str | None]:
    """The flags (on --resume the checkpoint's, overridden by those given), checked: (args, saved state, run dir)."""
    args = tyro.cli(Args)
    saved = None
    run_dir = None
    if args.resume:
        args, run_dir, saved = resume_args(args)
    if problem := check_args(args):
        fail(problem)
    if args.capture_video and os.environ["MUJOCO_GL"] == "disable":  # also a resumed video run: restart, with EGL
        os.execve(sys.executable, sys.orig_argv, os.environ | {"MUJOCO_GL": "egl"})
    if args.bf16 and not args.cuda and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        print("warning: this CPU has no bfloat16 matrix instructions; --bf16 runs slower than float32", file=sys.stderr)
    absl_logging.set_verbosity(absl_logging.ERROR)  # dm_control's deprecation chatter
    return args, saved, run_dir


def claim_run_dir(run_dir: str | None, args: Args):
    """(run_dir, its lock file) for --resume RUN_DIR or a new runs/{env_id}__{exp_name}__{seed}__{time}[-n], made
    exclusively (mkdir is atomic, also on NFS); held by this process alone (flock) until it ends, by kill -9 too."""
    if run_dir is None:
        base = f"runs/{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
        for run_dir in itertools.chain([base], (f"{base}-{n}" for n in itertools.count(2))):
            with contextlib.suppress(FileExistsError):
                os.makedirs(run_dir)
                break
        shutil.copy(__file__, run_dir)  # the file that made the run (benchmark.sh resumes only runs of the same file)
    lock = open(os.path.join(run_dir, "run.lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # the holder wrote the file's last line
        fail(f"{run_dir} is in use by {open(lock.name).read().splitlines()[-1]}; wait for it, or stop it and resume")
    except OSError as error:  # a filesystem without locks (e.g. Lustre mounted without -o flock)
        print(f"warning: cannot lock {run_dir} ({error.strerror}); keep other processes out of it", file=sys.stderr)
    print(f"pid {os.getpid()} on {socket.gethostname()}", file=lock, flush=True)  # every holder, one line each
    return run_dir, lock


def make_replay_buffer(args: Args, obs_dim: int, action_dim: int, device: torch.device) -> ReplayBuffer:
    need = args.buffer_size * (2 * obs_dim + action_dim + 2) * 4  # float32 rows [s, a, r, s', mask]
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # the CPU allocates lazily: check up front
    if device.type == "cuda" or need <= ram:
        with contextlib.suppress(RuntimeError):  # out of memory
            return ReplayBuffer(args.buffer_size, obs_dim, action_dim, device)
    fail(
        f"--buffer-size {args.buffer_size}: the replay buffer needs {need / 2**30:.1f} GiB, more than this "
        f"{device.type} can allocate; lower --buffer-size"
    )


def numpy_rng_state(rng) -> tuple:  # a NumPy RandomState's state, its key as a list: weights_only loads it
    return tuple(v.tolist() if isinstance(v, np.ndarray) else v for v in rng.get_state())


INTEGRATION = mujoco.mjtState.mjSTATE_INTEGRATION  # all that mj_step reads: time, qpos, qvel, act, ctrl, warmstart
# what Gymnasium's tasks read before a step (a body's x, the centre of mass): left by the last substep's kinematics,
# a substep behind qpos, so not recomputable from the integration state
KINEMATICS = ("xpos", "xquat", "xmat", "xipos", "ximat", "subtree_com")


def get_mujoco_state(model, data) -> torch.Tensor:
    state = np.empty(mujoco.mj_stateSize(model, INTEGRATION))
    mujoco.mj_getState(model, data, state, INTEGRATION)
    return torch.from_numpy(state)


def env_state(env: DMCEnv) -> dict:
    """All that decides the task's future: MuJoCo's state, the time-limit counter, the task's RNG."""
    if isinstance(env, GymEnv):
        task = env.env.unwrapped
        return {
            "physics": get_mujoco_state(task.model, task.data),
            "kinematics": {name: torch.from_numpy(getattr(task.data, name).copy()) for name in KINEMATICS},
            "elapsed_steps": env.env.get_wrapper_attr("_elapsed_steps"),
            "random": task.np_random.bit_generator.state,
        }
    physics = env.env.physics
    return {
        "physics": get_mujoco_state(physics.model.ptr, physics.data.ptr),
        "step_count": env.env._step_count,
        "reset_next_step": env.env._reset_next_step,
        "random": numpy_rng_state(env.env.task.random),
    }


def set_env_state(env: DMCEnv, state: dict) -> None:
    if isinstance(env, GymEnv):
        task = env.env.unwrapped
        mujoco.mj_setState(task.model, task.data, state["physics"].numpy(), INTEGRATION)
        for name, value in state["kinematics"].items():
            getattr(task.data, name)[:] = value.numpy()
        env.env.set_wrapper_attr("_elapsed_steps", state["elapsed_steps"])
        task.np_random.bit_generator.state = state["random"]
        return
    physics = env.env.physics
    mujoco.mj_setState(physics.model.ptr, physics.data.ptr, state["physics"].numpy(), INTEGRATION)
    mujoco.mj_step1(physics.model.ptr, physics.data.ptr)  # dm_control steps with mj_step2 and expects this done
    env.env._step_count = state["step_count"]
    env.env._reset_next_step = state["reset_next_step"]
    env.env.task.random.set_state(state["random"])  # also from older checkpoints' key tensors


def agent_state(agent: Agent, args: Args) -> dict:
    """The args, networks and optimisers: the --save-model file, and the core of every checkpoint."""
    names = ("critic", "critic_target", "denoiser", "critic_optimizer", "actor_optimizer", "actor_scheduler")
    return {"args": vars(args)} | {name: getattr(agent, name).state_dict() for name in names}


def training_state(agent: Agent, args: Args, rb: ReplayBuffer, env: DMCEnv, step: int, episode: tuple, run=None):
    """Everything a run needs to go on exactly as if never stopped, the replay buffer's filled rows included."""
    rng = {
        "python": random.getstate(),
        "numpy": numpy_rng_state(np.random),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
    }
    return agent_state(agent, args) | {
        "global_step": step,
        "env": env_state(env),
        "episode": [torch.from_numpy(episode[0]), *episode[1:]],
        "buffer": {"rows": rb.rows[: rb.size].to("cpu", copy=True), "added": rb.added},  # one copy: a view saves all
        "wandb_id": run and run.id,
        "rng": rng,
    }


def save_atomic(path: str, state: dict) -> None:
    """torch.save to a temporary file, fsync, rename: a kill at any instant leaves the old file or the new one. A
    failed write (disk full, quota, permission) removes the temporary file and ends the run in one line."""
    try:
        with open(f"{path}.tmp", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(f"{path}.tmp", path)
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as a RuntimeError
        free = shutil.disk_usage(os.path.dirname(path) or ".").free / 2**20  # torch's own message seldom says why
        with contextlib.suppress(OSError):
            os.remove(f"{path}.tmp")
        last = os.path.join(os.path.dirname(path), "checkpoint.pt")  # untouched by the failed write
        why = getattr(error, "strerror", None) or error
        fail(
            f"cannot write {path} ({why}; {free:.0f} MiB free there); the last good checkpoint: "
            f"{last if os.path.exists(last) else 'none'}"
        )


def load_networks(agent: Agent, state: dict, file: str, names=("critic", "critic_target", "denoiser")) -> None:
    """Each network's saved weights, or one line naming what differs: a file saved by an edited copy of a network."""
    for name in names:
        try:
            getattr(agent, name).load_state_dict(state[name])
        except RuntimeError as error:  # its second line names the first parameters missing, extra or of another shape
            fail(
                f"{file}: its {name} was made by another version of {type(getattr(agent, name)).__name__} "
                f"({error.args[0].splitlines()[1].strip()}); resume it with the file that made it"
            )


def restore(file: str, state: dict, agent: Agent, args: Args, rb: ReplayBuffer, env: DMCEnv) -> tuple:
    """Loads a checkpoint into the run; returns the current episode (obs, return, length, last return)."""
    load_networks(agent, state, file)
    agent.actor_scheduler.load_state_dict(state["actor_scheduler"])
    agent.actor_scheduler.base_lrs = [args.actor_lr]  # a resumed run may change the learning rates
    actor_lr = args.actor_lr * cosine_decay(agent.actor_scheduler.last_epoch, args.actor_lr_decay_steps)
    for name, lr in (("critic_optimizer", args.critic_lr), ("actor_optimizer", actor_lr)):
        getattr(agent, name).load_state_dict(state[name])
        for group in getattr(agent, name).param_groups:  # this run's rate and graph setting (--cudagraphs may differ)
            group["capturable"] = args.cudagraphs
            group["lr"] = torch.tensor(lr, device=rb.rows.device) if args.cudagraphs else lr
    rows = state["buffer"].pop("rows")  # not kept alive for the run's life: the buffer holds them now
    rb.rows[: len(rows)] = rows.to(rb.rows.device)
    rb.added = state["buffer"]["added"]
    set_env_state(env, state["env"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    if rb.rows.is_cuda and state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return state["episode"][0].numpy(), *state["episode"][1:]


def evaluate_model(args: Args) -> None:
    """--evaluate-model PATH: the saved policy, --eval-episodes episodes (the usual eval seeds), no training."""
    file, state = load_checkpoint(args.evaluate_model, "--evaluate-model")
    device = torch.device("cuda" if args.cuda else "cpu")
    args = dataclasses.replace(
        state["args"],
        cuda=args.cuda,
        eval_episodes=args.eval_episodes,
        seed=args.seed,
        capture_video=args.capture_video,
        cudagraphs=False,
    )
    envs = [make_env(args.env_id, args.seed + 10_000 + i, args.action_repeat) for i in range(args.eval_episodes)]
    agent = build_agent(envs[0].obs_dim, envs[0].action_dim, args, device)
    load_networks(agent, state, file, ("denoiser", "critic"))  # the critic: --best-of-n ranks the samples by Q
    run_name = os.path.basename(os.path.dirname(os.path.abspath(file)))
    video = f"videos/{run_name}/evaluate.mp4" if args.capture_video else None
    torch.manual_seed(args.seed)
    returns = evaluate(envs, agent, args, device, video)
    episodes = ", ".join(f"{r:.1f}" for r in returns)
    line = f"{args.env_id}: eval return {returns.mean():.1f} +- {returns.std():.1f} over {len(returns)} episodes"
    print(f"{line} ({episodes})" + (f"; video: {video}" if video else ""))


def start_wandb(args: Args, run_name: str, wandb_id: str | None):
    """Starts the wandb run, or resumes the checkpoint's (wandb_id); returns it."""
    import wandb  # imported only with --track: it takes seconds

    url = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    if os.environ.get("WANDB_MODE") not in ("offline", "disabled"):
        try:  # no network: log offline, upload later
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), 3.0).close()
        except OSError:
            os.environ["WANDB_MODE"] = "offline"
            print("wandb: no network; logging offline to ./wandb (to upload: wandb sync --sync-all)", file=sys.stderr)
    return wandb.init(
        project=args.wandb_project_name,
        entity=args.wandb_entity,
        sync_tensorboard=True,
        config=vars(args),
        name=run_name,
        save_code=True,
        id=wandb_id,
        resume="allow",
    )


def check_finite(finite: torch.Tensor, metrics: dict, step: int, last_checkpoint: str | None, agent=None) -> None:
    """NaN/Inf guard, one sync: the losses since the last check and, given the agent (before every checkpoint), every
    parameter and optimiser state that a checkpoint saves. So no checkpoint ever holds a NaN."""
    if agent is not None:
        tensors = [p for net in (agent.critic, agent.critic_target, agent.denoiser) for p in net.parameters()]
        optimizers = (agent.critic_optimizer, agent.actor_optimizer)
        tensors += [v for opt in optimizers for state in opt.state.values() for v in state.values()]
        finite = finite & torch.stack([tensor.isfinite().all() for tensor in tensors]).all()
    if not finite:
        bad = [f"{k} ({v.item():.4g})" for k, v in metrics.items() if not v.isfinite()] or ["parameters or Adam state"]
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint yet"
        fail(f"non-finite {', '.join(bad)} by step {step}; {where} (--resume it with, e.g., a lower --critic-lr)")


STOP = []  # SIGTERM (Slurm pre-emption, kill) or SIGINT (Ctrl-C): finish the step, checkpoint, exit


def request_stop(signum, frame) -> None:
    STOP.append(signal.Signals(signum).name)
    signal.signal(signum, signal.SIG_DFL)  # a second signal stops at once; the last checkpoint stays whole


class Run:
    """All of a training run that is not learning: its directory and lock, TensorBoard and wandb, the evaluation
    tasks and the probe state, a --resume's restore, the progress bar (`steps`), the NaN guard, the evaluations,
    checkpoints and signals. As a context manager it ends the progress bar's line on the way out, so that whatever
    comes next, an error included, starts on its own line."""

    def __init__(self, args: Args, agent: Agent, rb: ReplayBuffer, env: DMCEnv, saved, run_dir: str | None):
        self.args = args
        self.agent = agent
        self.rb = rb
        self.env = env
        device = rb.rows.device
        # the eval tasks seeded with seed + 10000 + i, one fixed state to probe the policy with (paper, Fig. 4)
        self.eval_envs = [
            make_env(args.env_id, args.seed + 10_000 + i, args.action_repeat) for i in range(args.eval_episodes)
        ]
        self.probe_obs = torch.as_tensor(make_env(args.env_id, args.seed + 20_000).reset(), device=device)
        self.dir, self.lock = claim_run_dir(run_dir, args)
        self.checkpoint = f"{self.dir}/checkpoint.pt"
        run_name = os.path.basename(os.path.abspath(self.dir))
        self.wandb = start_wandb(args, run_name, saved and saved["wandb_id"]) if args.track else None
        self.writer = SummaryWriter(self.dir, purge_step=saved and saved["global_step"])  # a resume drops later logs
        if not saved:
            rows = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
            self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{rows}")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        machine = f"{socket.gethostname()}: {cores} cores, {torch.get_num_threads()} torch threads"  # each attempt's
        self.writer.add_text("machine", machine, saved["global_step"] if saved else 0)
        self.episode = (env.reset(), 0.0, 0)  # obs, return, length
        self.last_return = float("nan")
        start = 0
        self.last_checkpoint = None
        if saved:
            obs, episode_return, episode_length, self.last_return = restore(
                self.checkpoint, saved, agent, args, rb, env
            )
            self.episode = (obs, episode_return, episode_length)
            start = saved["global_step"]
            self.last_checkpoint = f"{self.checkpoint} (step {start})"
            print(f"resumed {self.dir} at step {start}", file=sys.stderr)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, request_stop)
        self.finite = torch.ones((), dtype=torch.bool, device=device)  # all losses and Q values since the last check
        self.metrics = {}
        if saved and start % args.eval_interval < args.action_repeat:  # the purge dropped this step's evaluation
            evaluate_and_log(agent, args, self.eval_envs, self.probe_obs, self.writer, start)
        self.start_time = time.time()
        self.start_step = None  # the step of the first update: SPS counts from there
        self.last = False  # at the last step
        steps = range(start, args.total_timesteps, args.action_repeat)
        total = args.total_timesteps // args.action_repeat
        self.steps = tqdm(
            steps, unit="step", unit_scale=args.action_repeat, initial=start // args.action_repeat, total=total
        )

    def __enter__(self):
        return self

    def __exit__(self, error_type, *_) -> None:
        self.steps.close()  # ends the progress bar's line
        if error_type is None and self.args.save_model and self.last:
            path = f"{self.dir}/{self.args.exp_name}.pt"
            save_atomic(path, agent_state(self.agent, self.args) | {"global_step": self.args.total_timesteps})
            print(f"model saved to {path}")
        self.writer.close()
        if self.wandb and error_type is None:
            self.wandb.finish()

    @property
    def exit_status(self) -> int:
        """0 at the last step; stopped before it, 128 + the signal, as a shell reports a signal."""
        return 0 if self.last else 128 + signal.Signals[STOP[0]]

    def evaluate(self, step: int) -> None:
        seconds = evaluate_and_log(self.agent, self.args, self.eval_envs, self.probe_obs, self.writer, step)
        self.start_time += seconds  # evaluations do not count against the training steps/s

    def log_episode(self, global_step: int, episode_return: float, episode_length: int) -> None:
        self.writer.add_scalar("charts/episodic_return", episode_return, global_step)
        self.writer.add_scalar("charts/episodic_length", episode_length, global_step)
        self.last_return = episode_return

    def record(self, global_step: int, metrics: dict) -> None:
        """After every update: its metrics kept for the next log, their finiteness gathered on the device (no sync)."""
        if self.start_step is None:
            self.start_time = time.time()
            self.start_step = global_step
        self.finite &= torch.stack(list(metrics.values())).isfinite().all()
        self.metrics = metrics

    def log_losses(self, global_step: int) -> None:
        """The NaN guard's check and the last update's metrics (syncs), the learning rate, the training steps/s."""
        check_finite(self.finite, self.metrics, global_step, self.last_checkpoint)
        for key, value in self.metrics.items():
            self.writer.add_scalar(key, value.item(), global_step)
        self.writer.add_scalar("charts/actor_lr", self.agent.actor_optimizer.param_groups[0]["lr"], global_step)
        if global_step > self.start_step:
            sps = (global_step - self.start_step) / (time.time() - self.start_time)
            self.writer.add_scalar("charts/SPS", sps, global_step)
            self.steps.set_postfix(sps=f"{sps:.1f}", ret=f"{self.last_return:.1f}", refresh=False)

    def end_of_step(self, global_step: int, episode: tuple) -> bool:
        """The losses every 100 steps once learning has started; an evaluation every eval_interval steps and at the
        end; a checkpoint every checkpoint_interval steps, at the end and on a signal. True: stop here (a signal)."""
        args = self.args
        if self.start_step is not None and (global_step // args.action_repeat) % 100 == 0:
            self.log_losses(global_step)
        steps_done = global_step + args.action_repeat
        self.last = steps_done >= args.total_timesteps
        if steps_done % args.eval_interval < args.action_repeat or self.last:
            self.evaluate(steps_done)
        interval = args.checkpoint_interval
        if STOP or (interval and (steps_done % interval < args.action_repeat or self.last)):
            check_finite(self.finite, self.metrics, global_step, self.last_checkpoint, self.agent)  # and all it saves
            state = training_state(
                self.agent, args, self.rb, self.env, steps_done, (*episode, self.last_return), self.wandb
            )
            save_atomic(self.checkpoint, state)
            self.last_checkpoint = f"{self.checkpoint} (step {steps_done})"
            if STOP and not self.last:  # printed above the progress bar, as the evaluations
                resume = f"python {sys.argv[0]} --resume {os.path.abspath(self.dir)}"  # from wherever the user is
                tqdm.write(
                    f"{STOP[0]} at step {steps_done}: checkpoint written to {self.checkpoint}; continue with {resume}",
                    file=sys.stderr,
                )
                return True
        return False


if __name__ == "__main__":
    try:
        args, saved, run_dir = command_line()
        if args.evaluate_model:
            sys.exit(evaluate_model(args))
        sys.exit(train(args, saved, run_dir))
    except Failure as failure:  # bad input, a failed write, a NaN: one line, exit 2
        print(f"error: {failure}", file=sys.stderr)
        sys.exit(2)
