# Q-score matching (QSM): Psenka, Escontrela, Abbeel, Ma, "Learning a Diffusion Model Policy from Rewards via
# Q-Score Matching", ICML 2024, https://arxiv.org/abs/2312.11752. Usage and metrics: README.md.
import os
import sys

# Read by dm_control at import. Without video nothing renders, and "disable" keeps it from probing for an X display;
# --capture-video renders headless through EGL (a GPU's, or Mesa's on the CPU); MUJOCO_GL=osmesa also works.
os.environ.setdefault("MUJOCO_GL", "egl" if "--capture-video" in sys.argv else "disable")

import dataclasses
import itertools
import math
import random
import signal
import socket
import time
import urllib.parse
from dataclasses import dataclass
from typing import NamedTuple

import mujoco
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from dm_control import suite


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (Python, NumPy, torch and the dm_control tasks)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
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
    """write the whole training state to `runs/{run_name}/checkpoint/` every this many steps, at the end and on
    SIGTERM/SIGINT (0: only on a signal)"""
    resume: str | None = None
    """continue a run exactly from its run directory or checkpoint; flags not given are the checkpoint's, and
    --total-timesteps may be raised"""

    # Algorithm specific arguments
    env_id: str = "cheetah-run"
    """the dm_control task as `domain-task`, split at the first `-` (e.g. `ball_in_cup-catch`)"""
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
    critic_hidden_dims: tuple[int, ...] = (512, 512)
    """hidden layer sizes of each critic MLP (ReLU)"""
    actor_hidden_dims: tuple[int, ...] = (512, 512)
    """hidden layer sizes of the denoiser MLP (mish)"""
    T: int = 5
    """number of diffusion steps of the DDPM policy"""
    beta_schedule: str = "vp"
    """noise schedule of the diffusion: `vp`, `cosine` or `linear`"""
    ddpm_temperature: float = 1.0
    """scale of the noise injected at every reverse step of the sampler (0: deterministic chain)"""
    clip_sampler: bool = True
    """clip the sample to [-1, 1] after every reverse step"""
    M_q: float = 50.0
    """the QSM scale alpha: the denoiser regresses onto -M_q * grad_a Q"""
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
    """compile the updates and the sampler with `torch.compile`"""
    cudagraphs: bool = False
    """replay every update and every acting step from a CUDA graph (needs a GPU; with or without --compile)"""
    bf16: bool = False
    """run the updates' matrix products in bfloat16 (autocast); weights, Adam, losses and acting stay float32"""


BETA_SCHEDULES = ("vp", "cosine", "linear")
# the settings that decide what is learned (a resumed run checks them), not how fast, how long or what is logged
ALGORITHM_FIELDS = ("seed", "env_id", "learning_starts", "buffer_size", "batch_size", "gamma", "tau", "critic_lr",
                    "actor_lr", "actor_lr_decay_steps", "critic_hidden_dims", "actor_hidden_dims", "T", "beta_schedule",
                    "ddpm_temperature", "clip_sampler", "M_q", "exploration_noise", "target_noise", "utd_ratio",
                    "action_repeat", "bf16")  # fmt: skip
ENV_IDS = tuple(f"{domain}-{task}" for domain, task in suite.ALL_TASKS)


def check_args(args: Args) -> str | None:
    """The first problem with `args` as a one-line message naming the flag and the fix, or None."""
    try:
        parse_env_id(args.env_id)
        beta_schedule(args.beta_schedule, 1)
    except ValueError as error:
        return str(error)
    if args.cuda and not torch.cuda.is_available():
        return "--cuda was given but torch sees no CUDA device; drop --cuda or install a CUDA build of torch (README)"
    if args.cudagraphs and not args.cuda:
        return "--cudagraphs needs a CUDA device (--cuda); drop --cudagraphs on the CPU"
    positive = ("T", "batch_size", "buffer_size", "total_timesteps", "utd_ratio", "eval_interval", "eval_episodes",
                "action_repeat", "actor_lr_decay_steps", "M_q", "critic_lr", "actor_lr")  # fmt: skip
    for name in positive:
        if getattr(args, name) <= 0:
            return f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}"
    if args.batch_size > args.buffer_size:
        return f"--batch-size {args.batch_size} exceeds --buffer-size {args.buffer_size}; lower one or raise the other"
    if args.learning_starts < 0:
        return f"--learning-starts must be >= 0, got {args.learning_starts}"
    if not 0.0 <= args.gamma <= 1.0:
        return f"--gamma must lie in [0, 1], got {args.gamma}"
    if not 0.0 < args.tau <= 1.0:
        return f"--tau must lie in (0, 1], got {args.tau}"
    for name in ("ddpm_temperature", "exploration_noise", "target_noise"):
        if getattr(args, name) < 0:
            return f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}"
    for name in ("critic_hidden_dims", "actor_hidden_dims"):
        dims = getattr(args, name)
        if not dims or min(dims) <= 0:
            return f"--{name.replace('_', '-')} needs one or more positive sizes, got {dims}"
    return None


# ENVIRONMENT: dm_control, no gym layer. The agent acts in [-1, 1]^A; observations are one float32 vector.
def parse_env_id(env_id: str) -> tuple[str, str]:
    """`cartpole-swingup_sparse` -> (`cartpole`, `swingup_sparse`): split at the first `-` only."""
    if env_id not in ENV_IDS:
        raise ValueError(f"--env-id {env_id!r} is not a dm_control task; valid ids: {', '.join(ENV_IDS)}")
    domain, task = env_id.split("-", 1)
    return domain, task


def flatten_observation(observation: dict) -> np.ndarray:
    """The observation dict in its spec's (fixed) order, each entry raveled, as one float32 vector."""
    return np.concatenate([np.asarray(v, dtype=np.float32).ravel() for v in observation.values()])


def get_numpy_rng_state(rng) -> tuple:
    """A NumPy RandomState's (or np.random's) state with tensors for arrays: loadable with weights_only=True."""
    name, key, pos, has_gauss, gauss = rng.get_state()
    return name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss


def set_numpy_rng_state(rng, state: tuple) -> None:
    name, key, pos, has_gauss, gauss = state
    rng.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))


class DMCEnv:
    """A dm_control task with the agent's action in [-1, 1], flat float32 observations and action repeat."""

    def __init__(self, env_id: str, seed: int, action_repeat: int = 1):
        domain, task = parse_env_id(env_id)
        self.env = suite.load(domain, task, task_kwargs={"random": seed})
        spec = self.env.action_spec()
        self.action_low = spec.minimum.astype(np.float64)
        self.action_high = spec.maximum.astype(np.float64)
        self.action_dim = spec.shape[0]
        self.obs_dim = sum(int(np.prod(s.shape)) for s in self.env.observation_spec().values())
        self.action_repeat = action_repeat

    def rescale(self, action: np.ndarray) -> np.ndarray:
        """[-1, 1] -> [minimum, maximum] of the task's action spec."""
        return self.action_low + (np.clip(action, -1.0, 1.0) + 1.0) * 0.5 * (self.action_high - self.action_low)

    def reset(self) -> np.ndarray:
        return flatten_observation(self.env.reset().observation)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, float, bool]:
        """Returns (next_obs, summed reward, bootstrap mask, episode over).

        The mask is the time step's `discount`: 0 only at a true terminal state, 1 at a time limit, so a time
        limit never cuts the bootstrap."""
        reward = 0.0
        for _ in range(self.action_repeat):
            time_step = self.env.step(self.rescale(action))
            reward += time_step.reward or 0.0
            if time_step.last():
                break
        return flatten_observation(time_step.observation), float(reward), float(time_step.discount), time_step.last()

    def render(self) -> np.ndarray:
        """The task's first camera as a (240, 320, 3) uint8 frame."""
        return self.env.physics.render(height=240, width=320, camera_id=0)

    def get_state(self) -> dict:
        """Everything that decides the future of this task: MuJoCo's full integration state (warm start included),
        the time-limit counter and the task's random generator. Restored, the task steps bit for bit as before."""
        physics, spec = self.env.physics, mujoco.mjtState.mjSTATE_INTEGRATION
        buffer = np.empty(mujoco.mj_stateSize(physics.model.ptr, spec))
        mujoco.mj_getState(physics.model.ptr, physics.data.ptr, buffer, spec)
        return {
            "physics": torch.from_numpy(buffer),
            "step_count": self.env._step_count,
            "reset_next_step": self.env._reset_next_step,
            "random": get_numpy_rng_state(self.env.task.random),
        }

    def set_state(self, state: dict) -> None:
        physics, spec = self.env.physics, mujoco.mjtState.mjSTATE_INTEGRATION
        mujoco.mj_setState(physics.model.ptr, physics.data.ptr, state["physics"].numpy(), spec)
        mujoco.mj_step1(physics.model.ptr, physics.data.ptr)  # dm_control steps with mj_step2 and expects this done
        self.env._step_count, self.env._reset_next_step = state["step_count"], state["reset_next_step"]
        set_numpy_rng_state(self.env.task.random, state["random"])


# ALGO LOGIC: networks
def xavier_linear(in_dim: int, out_dim: int) -> nn.Linear:
    layer = nn.Linear(in_dim, out_dim)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class TwinCritic(nn.Module):
    """Two ReLU MLPs Q_i(s, a) on concat(s, a), as one module with stacked weights: one batched matmul per layer
    evaluates both critics (the official code's two-member ensemble)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims: tuple[int, ...], num_q: int = 2):
        super().__init__()
        dims = (obs_dim + action_dim, *hidden_dims, 1)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for in_dim, out_dim in itertools.pairwise(dims):
            weight = torch.empty(num_q, in_dim, out_dim)
            for w in weight:  # Xavier-uniform per critic, as the official init
                nn.init.xavier_uniform_(w.T)
            self.weights.append(nn.Parameter(weight))
            self.biases.append(nn.Parameter(torch.zeros(num_q, 1, out_dim)))
        self.obs_dim = obs_dim

    def hidden(self, obs: torch.Tensor, actions: torch.Tensor) -> list[torch.Tensor]:
        """The hidden activations h_1..h_L of every critic, each (num_q, B, H_l)."""
        x = torch.cat([obs, actions], dim=-1).expand(len(self.weights[0]), -1, -1)
        activations = []
        for weight, bias in zip(self.weights[:-1], self.biases[:-1], strict=True):
            x = F.relu(torch.baddbmm(bias, x, weight))
            activations.append(x)
        return activations

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """(B, S), (B, A) -> Q values (num_q, B)."""
        # Q = h_L . w + b as a product and a sum, not a 1-column matmul: compiled, it fuses into the last layer's kernel
        return (self.hidden(obs, actions)[-1] * self.weights[-1].transpose(1, 2)).sum(-1) + self.biases[-1].squeeze(-1)

    def action_grad(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """grad_a Q_i(s, a) for every critic, (num_q, B, A); no gradient reaches the critics.

        For a ReLU MLP the input gradient is W_1^T D_1 W_2^T D_2 ... w_out, D_l = diag(h_l > 0): one forward pass and
        one product per layer back. Written out because autograd here would also build a graph for the parameters
        and, inside torch.compile, break the graph."""
        with torch.no_grad():
            active = [h > 0 for h in self.hidden(obs, actions)]  # D_l
            grad = self.weights[-1].transpose(1, 2)  # dQ/dh_L: (num_q, 1, H_L)
            for weight, mask in zip(reversed(self.weights[1:-1]), reversed(active[1:]), strict=True):
                grad = torch.bmm(grad * mask, weight.transpose(1, 2))  # dQ/dh_{l-1} = (dQ/dh_l * D_l) W_l^T
            return torch.bmm(grad * active[0], self.weights[0][:, self.obs_dim :].transpose(1, 2))


def mish(x: torch.Tensor) -> torch.Tensor:
    """mish(x) = x tanh(softplus(x)) = x (e^2x + 2e^x) / (e^2x + 2e^x + 2): one exp instead of exp, log1p and tanh.

    Same values as F.mish to float precision, about 3x faster on the CPU, where mish is half of the denoiser's time.
    x is clamped inside the exp only (for x > 20 the ratio is 1 in float32), so nothing overflows."""
    n = torch.exp(x.clamp(max=20.0))
    m = n * (n + 2.0)
    return x * (m / (m + 2.0))


class Mish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mish(x)


class FourierFeatures(nn.Module):
    """Learnable Fourier features of the diffusion step: t -> [cos(2 pi t W), sin(2 pi t W)], W ~ N(0, 0.2^2)."""

    def __init__(self, output_size: int = 64):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(output_size // 2, 1) * 0.2)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        f = 2 * math.pi * t @ self.kernel.T
        return torch.cat([torch.cos(f), torch.sin(f)], dim=-1)


class Denoiser(nn.Module):
    """eps_theta(s, a_t, t): time -> Fourier features -> MLP(128, 128) mish -> cond; MLP mish on concat(a_t, s, cond).

    The first layer W [a; s; cond] + b is split into the parts of a_t, s and cond, so the sampler can compute the
    state's share once per call and the time's share once per step instead of once per denoising pass per sample."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims: tuple[int, ...], time_dim: int = 64):
        super().__init__()
        self.time_features = nn.Sequential(
            FourierFeatures(time_dim), xavier_linear(time_dim, 128), Mish(), xavier_linear(128, 128)
        )
        dims = (action_dim + obs_dim + 128, *hidden_dims)
        self.hidden = nn.ModuleList(xavier_linear(i, o) for i, o in itertools.pairwise(dims))
        self.out = xavier_linear(dims[-1], action_dim)
        self.action_dim, self.obs_dim = action_dim, obs_dim

    def state_part(self, obs: torch.Tensor) -> torch.Tensor:
        """The state's share of the first layer, W_s s + b: (B, S) -> (B, H)."""
        first = self.hidden[0]
        return F.linear(obs, first.weight[:, self.action_dim : self.action_dim + self.obs_dim], first.bias)

    def time_parts(self, T: int, device: torch.device | str) -> torch.Tensor:
        """The time's share of the first layer, W_c cond(t), for every step t = 0..T-1: (T, H)."""
        steps = torch.arange(T, device=device, dtype=torch.float32).unsqueeze(-1)
        return F.linear(self.time_features(steps), self.hidden[0].weight[:, self.action_dim + self.obs_dim :])

    def head(self, actions: torch.Tensor, state_part: torch.Tensor, time_part: torch.Tensor) -> torch.Tensor:
        x = mish(F.linear(actions, self.hidden[0].weight[:, : self.action_dim]) + state_part + time_part)
        for layer in self.hidden[1:]:
            x = mish(layer(x))
        return self.out(x)

    def forward(self, obs: torch.Tensor, noisy_actions: torch.Tensor, t: torch.Tensor, T: int) -> torch.Tensor:
        """(B, S), (B, A), (B,) integer steps in 0..T-1 -> predicted noise (B, A). The time MLP runs on the T distinct
        steps and each sample takes its row: T rows of work instead of B, the same values."""
        time_parts = self.time_parts(T, t.device)
        # a one-hot product, not time_parts[t]: its gradient is a matmul, free of the index's scatter-add atomics
        return self.head(noisy_actions, self.state_part(obs), F.one_hot(t, T).to(time_parts.dtype) @ time_parts)


# ALGO LOGIC: the diffusion policy
def beta_schedule(name: str, T: int) -> np.ndarray:
    """beta_1..beta_T (float64), as the official code's schedules."""
    if name == "vp":  # beta_t = 1 - exp(-b_min/T - (b_max - b_min)(2t - 1) / (2 T^2)), t = 1..T
        t = np.arange(1, T + 1)
        b_min, b_max = 0.1, 10.0
        return 1.0 - np.exp(-b_min / T - 0.5 * (b_max - b_min) * (2 * t - 1) / T**2)
    if name == "cosine":  # Nichol & Dhariwal (2021), s = 0.008
        s = 0.008
        alpha_bar = np.cos((np.linspace(0, T, T + 1) / T + s) / (1 + s) * np.pi / 2) ** 2
        return np.clip(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.0, 0.999)
    if name == "linear":
        return np.linspace(1e-4, 2e-2, T)
    raise ValueError(f"--beta-schedule {name!r} is unknown; use one of: {', '.join(BETA_SCHEDULES)}")


class DiffusionSchedule:
    """beta_t, alpha_t = 1 - beta_t and alpha_bar_t = prod_{k<=t} alpha_k, indexed t = 0..T-1 as the code's steps."""

    def __init__(self, name: str, T: int, device: torch.device | str = "cpu"):
        self.T = T
        betas = beta_schedule(name, T)
        alpha_bars = np.cumprod(1.0 - betas)
        # The sampler reads the coefficients as Python floats: constants under torch.compile (NumPy values would be
        # traced as tensors) and no device reads. The score update indexes alpha_bar with a random step per sample,
        # so alpha_bar also lives on the device.
        self.betas = tuple(float(b) for b in betas)
        self.alphas = tuple(float(1.0 - b) for b in betas)
        self.alpha_bars = tuple(float(ab) for ab in alpha_bars)
        self.alpha_bars_t = torch.tensor(alpha_bars, dtype=torch.float32, device=device)


def ddpm_sample(
    denoiser: Denoiser,
    schedule: DiffusionSchedule,
    obs: torch.Tensor,
    temperature: float = 1.0,
    clip: bool = True,
    x_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reverse DDPM chain from x_T ~ N(0, I) to an action in [-1, 1]^A: (B, S) -> (B, A). No gradient flows."""
    with torch.no_grad():
        x = torch.randn(obs.shape[0], denoiser.action_dim, device=obs.device) if x_T is None else x_T
        state_part = denoiser.state_part(obs)  # once per call, not once per step
        time_parts = denoiser.time_parts(schedule.T, obs.device)  # (T, H): once per step for the whole batch
        for t in reversed(range(schedule.T)):
            alpha, alpha_bar, beta = schedule.alphas[t], schedule.alpha_bars[t], schedule.betas[t]
            eps_pred = denoiser.head(x, state_part, time_parts[t])
            # x_{t-1} = (x_t - (1 - alpha_t) / sqrt(1 - alpha_bar_t) * eps_theta(s, x_t, t)) / sqrt(alpha_t)
            x = (x - (1.0 - alpha) / math.sqrt(1.0 - alpha_bar) * eps_pred) / math.sqrt(alpha)
            if t > 0:  # + sqrt(beta_t) * temperature * z
                x = x + math.sqrt(beta) * temperature * torch.randn_like(x)
            if clip:
                x = x.clamp(-1.0, 1.0)
        return x.clamp(-1.0, 1.0)


# ALGO LOGIC: replay buffer
class Batch(NamedTuple):
    obs: torch.Tensor  # (B, S)
    actions: torch.Tensor  # (B, A), in [-1, 1]
    rewards: torch.Tensor  # (B,)
    next_obs: torch.Tensor  # (B, S)
    masks: torch.Tensor  # (B,), 0 at a true terminal state, else 1


class ReplayBuffer:
    """A ring buffer on the training device, sampled uniformly with replacement. One row [s, a, r, s', mask] per
    transition in one preallocated tensor: adding is one host-to-device copy, sampling one gather."""

    def __init__(self, capacity: int, obs_dim: int, action_dim: int, device: torch.device | str = "cpu"):
        # empty, not zeros: rows past `size` are never read, and on the CPU pages never written take no memory
        self.rows = torch.empty(capacity, 2 * obs_dim + action_dim + 2, device=device)
        self.sizes = (obs_dim, action_dim, 1, obs_dim, 1)  # the columns of s, a, r, s', mask
        self.obs, self.actions, self.rewards, self.next_obs, self.masks = self.split(self.rows)
        self.capacity, self.added = capacity, 0  # transitions ever added; position and fill follow from it

    @property
    def pos(self) -> int:  # the row the next transition overwrites
        return self.added % self.capacity

    @property
    def size(self) -> int:
        return min(self.added, self.capacity)

    def split(self, rows: torch.Tensor) -> Batch:
        obs, actions, rewards, next_obs, masks = torch.split(rows, self.sizes, dim=-1)
        return Batch(obs, actions, rewards.squeeze(-1), next_obs, masks.squeeze(-1))

    def add(self, obs, action, reward: float, next_obs, mask: float) -> None:
        row = np.concatenate([obs, action, [reward], next_obs, [mask]], dtype=np.float32)
        self.rows[self.pos] = torch.from_numpy(row)
        self.added += 1

    def sample_indices(self, batch_size: int) -> torch.Tensor:
        return torch.randint(0, self.size, (batch_size,), device=self.rows.device)

    def gather(self, idx: torch.Tensor) -> Batch:
        return self.split(self.rows[idx])

    def sample(self, batch_size: int) -> Batch:
        return self.gather(self.sample_indices(batch_size))


# ALGO LOGIC: the two losses of Algorithm 1
def td_target(
    critic_target: TwinCritic,
    denoiser: Denoiser,
    schedule: DiffusionSchedule,
    batch: Batch,
    gamma: float,
    target_noise: float,
    temperature: float = 1.0,
    clip: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y = r + gamma * mask * min_i Q_i_targ(s', a'), a' = clip(DDPM(s') + N(0, target_noise^2)). Returns (y, a')."""
    with torch.no_grad():
        next_actions = ddpm_sample(denoiser, schedule, batch.next_obs, temperature, clip)
        noisy_next_actions = (next_actions + target_noise * torch.randn_like(next_actions)).clamp(-1.0, 1.0)
        next_q = critic_target(batch.next_obs, noisy_next_actions).min(dim=0).values  # (B,)
        return batch.rewards + gamma * batch.masks * next_q, next_actions


def qsm_target(critic: TwinCritic, obs: torch.Tensor, noisy_actions: torch.Tensor, M_q: float) -> torch.Tensor:
    """-M_q * grad_a Q(s, a_t), grad_a Q the mean of the twin critics' action gradients: (B, A)."""
    return -M_q * critic.action_grad(obs, noisy_actions).mean(dim=0)


def qsm_loss(
    denoiser: Denoiser, critic: TwinCritic, schedule: DiffusionSchedule, batch: Batch, M_q: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Q-score matching loss on replay actions: mean (eps_theta(s, a_t, t) - (-M_q grad_a Q(s, a_t)))^2.

    Returns (loss, target). The denoiser predicts noise and the reverse step subtracts it, so matching -M_q grad_a Q
    makes every denoising step climb Q. Only the denoiser is differentiated, never the sampling chain."""
    B = batch.actions.shape[0]
    t = torch.randint(0, schedule.T, (B,), device=batch.actions.device)  # t ~ U{0..T-1}
    noise = torch.randn_like(batch.actions)  # eps ~ N(0, I)
    alpha_bar = schedule.alpha_bars_t[t].unsqueeze(-1)
    noisy_actions = alpha_bar.sqrt() * batch.actions + (1.0 - alpha_bar).sqrt() * noise  # a_t, (B, A)
    target = qsm_target(critic, batch.obs, noisy_actions, M_q)  # -M_q * grad_a Q(s, a_t), (B, A)
    eps_pred = denoiser(batch.obs, noisy_actions, t, schedule.T)  # (B, A)
    target, eps_pred = target.float(), eps_pred.float()  # no-ops, except under --bf16
    loss = (eps_pred - target).pow(2).mean()  # eps_theta(s, a_t, t) -> -M_q * grad_a Q(s, a_t)
    return loss, target


def critic_loss(critic, critic_target, denoiser, schedule, batch: Batch, args: Args) -> tuple[torch.Tensor, dict]:
    """TD loss of both critics: the official code's mean over critics and batch. Returns (loss, detached metrics)."""
    y, next_actions = td_target(
        critic_target, denoiser, schedule, batch, args.gamma, args.target_noise, args.ddpm_temperature,
        args.clip_sampler,
    )  # fmt: skip
    q = critic(batch.obs, batch.actions).float()  # (2, B); .float(): a no-op, except under --bf16
    qf_losses = (q - y).pow(2).mean(dim=1)  # per critic MSE, (2,)
    metrics = {
        "losses/qf1_loss": qf_losses[0].detach(),
        "losses/qf2_loss": qf_losses[1].detach(),
        "losses/qf1_values": q[0].mean().detach(),
        "losses/qf2_values": q[1].mean().detach(),
        "losses/td_target": y.mean(),
        # share of sampled action components at +-1: QSM with a clip every step tends to bang-bang policies
        "charts/action_saturation": (next_actions.abs() >= 1.0).float().mean(),
    }
    return qf_losses.mean(), metrics


def update_critic(critic, critic_target, denoiser, critic_optimizer, schedule, batch: Batch, args: Args) -> dict:
    """One TD step on both critics, then the Polyak step of the targets. Returns detached metrics (no syncs)."""
    loss, metrics = critic_loss(critic, critic_target, denoiser, schedule, batch, args)
    critic_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    critic_optimizer.step()
    with torch.no_grad():  # theta_targ <- (1 - tau) theta_targ + tau theta
        torch._foreach_lerp_(list(critic_target.parameters()), list(critic.parameters()), args.tau)
    return metrics


def update_actor(denoiser, critic, actor_optimizer, schedule, batch: Batch, args: Args) -> dict:
    """One QSM step on the denoiser against the current critics. Returns detached metrics (no syncs)."""
    loss, target = qsm_loss(denoiser, critic, schedule, batch, args.M_q)
    actor_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    actor_optimizer.step()
    # |grad_a Q| per sample: if it collapses to ~0 or explodes, the score target does too
    return {"losses/actor_loss": loss.detach(), "losses/q_grad_norm": target.norm(dim=-1).mean() / args.M_q}


def cosine_decay(step: int, decay_steps: int) -> float:
    """optax.cosine_decay_schedule's factor: 0.5 (1 + cos(pi min(step, D) / D)), reaching 0 at D and staying there."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, decay_steps) / decay_steps))


def build_agent(obs_dim: int, action_dim: int, args: Args, device) -> tuple:
    """(critic, critic_target, denoiser, critic_optimizer, actor_optimizer, actor_scheduler), as Algorithm 1 starts."""
    critic = TwinCritic(obs_dim, action_dim, args.critic_hidden_dims).to(device)
    critic_target = TwinCritic(obs_dim, action_dim, args.critic_hidden_dims).to(device)
    critic_target.load_state_dict(critic.state_dict())
    critic_target.requires_grad_(False)
    denoiser = Denoiser(obs_dim, action_dim, args.actor_hidden_dims).to(device)

    # fused: one kernel for the whole Adam step (about 6x faster than the per-tensor default on the CPU).
    # A CUDA graph replays the step, so there the step counters and learning rates live on the GPU (capturable).
    def lr(value: float) -> float | torch.Tensor:
        return torch.tensor(value, device=device) if args.cudagraphs else value

    critic_optimizer = torch.optim.Adam(critic.parameters(), lr(args.critic_lr), fused=True, capturable=args.cudagraphs)
    actor_optimizer = torch.optim.Adam(denoiser.parameters(), lr(args.actor_lr), fused=True, capturable=args.cudagraphs)
    actor_scheduler = torch.optim.lr_scheduler.LambdaLR(
        actor_optimizer, lambda step: cosine_decay(step, args.actor_lr_decay_steps)
    )
    return critic, critic_target, denoiser, critic_optimizer, actor_optimizer, actor_scheduler


def autocast(device: torch.device, args: Args) -> torch.autocast:
    """--bf16: matrix products in bfloat16 (2x the fp32 rate on a CPU with AVX-512 BF16, tensor cores on a GPU)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)


def train_step(
    batch: Batch, critic, critic_target, denoiser, critic_optimizer, actor_optimizer, schedule, args
) -> dict:
    """Algorithm 1's update: a TD step on the twin critics, then a score step on the denoiser, on one batch."""
    with autocast(batch.obs.device, args):
        metrics = update_critic(critic, critic_target, denoiser, critic_optimizer, schedule, batch, args)
        return metrics | update_actor(denoiser, critic, actor_optimizer, schedule, batch, args)


def act(denoiser, schedule, obs: torch.Tensor, args: Args) -> torch.Tensor:
    """The behaviour policy: a = clip(DDPM(s) + N(0, exploration_noise^2), -1, 1). Float32 also under --bf16: one
    state at a time, the casts to bfloat16 would cost more than its products save (measured on CPU and GPU)."""
    a = ddpm_sample(denoiser, schedule, obs, args.ddpm_temperature, args.clip_sampler)
    return (a + args.exploration_noise * torch.randn_like(a)).clamp(-1.0, 1.0)


class CudaGraph:
    """Calls `fn(x)`, x a tensor, by replaying a CUDA graph: one launch for the hundreds of small kernels of an update,
    which otherwise cost more in Python and launch overhead than in arithmetic (LeanRL's trick, written out).

    The first `warmup` calls run eagerly on a side stream (compilation, optimiser state, cuBLAS workspaces) and are
    real calls; the next one is captured, then every call copies x into the captured input and replays.
    Replay is exact only because `fn` reads nothing but its input and tensors updated in place (parameters,
    optimiser states, tensor learning rates) and never syncs with the host. Outputs are overwritten by the next call."""

    def __init__(self, fn, warmup: int = 3):
        self.fn, self.warmup, self.graph, self.input = fn, warmup, None, None

    def __call__(self, x: torch.Tensor):
        if self.input is None:  # every call, warm-ups too, reads this: torch.compile never recompiles in a capture
            self.input = x.clone()
        self.input.copy_(x)
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


def evaluate(envs: list[DMCEnv], denoiser, schedule, args: Args, device, frames: list | None = None) -> np.ndarray:
    """One full episode in each eval env, side by side (one batched DDPM sample per step), no exploration noise.

    Eval env i is reseeded with seed + 10000 + i first: every evaluation starts from the same initial states, so
    evaluations compare across steps and never depend on earlier ones (nor does a resumed run's)."""
    for i, env in enumerate(envs):
        env.env.task.random.seed(args.seed + 10_000 + i)
    obs = np.stack([env.reset() for env in envs])
    returns = np.zeros(len(envs))
    running = np.ones(len(envs), dtype=bool)
    while running.any():
        if frames is not None and running[0]:  # film the first episode
            frames.append(envs[0].render())
        obs_t = torch.as_tensor(obs[running], device=device)
        actions = ddpm_sample(denoiser, schedule, obs_t, args.ddpm_temperature, args.clip_sampler)
        actions = actions.cpu().numpy()
        for action, i in zip(actions, np.flatnonzero(running), strict=True):
            next_obs, reward, _, done = envs[i].step(action)
            returns[i] += reward
            obs[i] = next_obs
            running[i] = not done
    return returns


def save_checkpoint(path: str, state: dict) -> None:
    """torch.save to a temporary file, fsync, then rename: a crash never leaves a broken checkpoint at `path`."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointError(Exception):
    pass


class Checkpoint:
    """A run's checkpoint directory: `state.pt` (everything but the replay buffer) and the buffer's rows in chunk
    files, each rewritten only when rows in it changed, so a checkpoint of a large buffer costs the rows added since
    the last one. Every file is written atomically and `state.pt`, renamed last, names the chunk files it needs:
    a kill at any instant leaves the previous or the new checkpoint whole. Files it no longer needs are deleted."""

    CHUNK_ROWS = 65_536

    def __init__(self, directory: str):
        self.dir = directory
        self.chunks: dict[int, str] = {}  # chunk index -> file name, as named by the last state.pt written
        self.saved_added = 0  # rb.added at the last save

    def save(self, state: dict, rb: ReplayBuffer, step: int) -> None:
        os.makedirs(self.dir, exist_ok=True)
        chunks = dict(self.chunks)
        for c in self.changed_chunks(rb):
            rows = rb.rows[c * self.CHUNK_ROWS : min((c + 1) * self.CHUNK_ROWS, rb.size)]
            chunks[c] = f"buffer-{c:05d}-{step}.pt"
            save_checkpoint(os.path.join(self.dir, chunks[c]), rows.cpu().clone())
        buffer = {"capacity": rb.capacity, "added": rb.added, "chunk_rows": self.CHUNK_ROWS, "chunks": chunks}
        save_checkpoint(os.path.join(self.dir, "state.pt"), {**state, "buffer": buffer})
        for name in set(self.chunks.values()) - set(chunks.values()):
            os.remove(os.path.join(self.dir, name))
        self.chunks, self.saved_added = chunks, rb.added

    def changed_chunks(self, rb: ReplayBuffer) -> set[int]:
        """The chunks that hold rows written since the last save (the ring may have wrapped around)."""
        if rb.added - self.saved_added >= rb.capacity:
            return set(range(math.ceil(rb.capacity / self.CHUNK_ROWS)))
        changed, i = set(), self.saved_added
        while i < rb.added:
            pos = i % rb.capacity
            changed.add(pos // self.CHUNK_ROWS)
            i += min((pos // self.CHUNK_ROWS + 1) * self.CHUNK_ROWS, rb.capacity) - pos  # to the chunk's end
        return changed

    @staticmethod
    def find(path: str) -> str:
        """The checkpoint directory that `path` (a run directory, a checkpoint directory or its state.pt) means."""
        for directory in (os.path.join(path, "checkpoint"), path, os.path.dirname(path)):
            if os.path.isfile(os.path.join(directory, "state.pt")):
                return directory
        raise CheckpointError(f"--resume {path}: no checkpoint there (looked for {path}/checkpoint/state.pt)")

    def load_state(self) -> dict:
        try:
            return torch.load(os.path.join(self.dir, "state.pt"), map_location="cpu", weights_only=True)
        except Exception as error:  # truncated, corrupt or not a checkpoint at all
            raise CheckpointError(f"--resume: {self.dir}/state.pt is truncated or corrupt ({type(error).__name__}); "
                                  "resume from another checkpoint") from None  # fmt: skip

    def load_buffer(self, buffer: dict, rb: ReplayBuffer) -> None:
        for c, name in buffer["chunks"].items():
            try:
                rows = torch.load(os.path.join(self.dir, name), weights_only=True)
            except Exception as error:
                raise CheckpointError(
                    f"--resume: {self.dir}/{name} is truncated or corrupt ({type(error).__name__})"
                ) from None
            rb.rows[c * buffer["chunk_rows"] : c * buffer["chunk_rows"] + len(rows)] = rows.to(rb.rows.device)
        rb.added = buffer["added"]
        self.chunks, self.saved_added = dict(buffer["chunks"]), rb.added


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def write_video(path: str, frames: list, env: DMCEnv) -> None:
    import imageio  # only with --capture-video

    os.makedirs(os.path.dirname(path), exist_ok=True)
    fps = min(60, round(1 / (env.env.control_timestep() * env.action_repeat)))
    imageio.mimwrite(path, frames, fps=fps, macro_block_size=8)


def evaluate_model(args: Args) -> None:
    """--evaluate-model PATH: the saved policy, --eval-episodes episodes (the usual eval seeds), no training."""
    path = args.evaluate_model
    try:
        state = torch.load(Checkpoint.find(path) + "/state.pt" if os.path.isdir(path) else path, map_location="cpu",
                           weights_only=True)  # fmt: skip
        saved = Args(**state["args"])
    except Exception as error:  # missing, truncated, or not one of this script's files
        fail(f"--evaluate-model {path}: not a readable --save-model file or checkpoint ({type(error).__name__})")
    device = torch.device("cuda" if args.cuda else "cpu")
    args = dataclasses.replace(saved, cuda=args.cuda, eval_episodes=args.eval_episodes, seed=args.seed,
                               capture_video=args.capture_video, cudagraphs=False)  # fmt: skip
    envs = [DMCEnv(args.env_id, args.seed + 10_000 + i, args.action_repeat) for i in range(args.eval_episodes)]
    denoiser = Denoiser(envs[0].obs_dim, envs[0].action_dim, args.actor_hidden_dims).to(device)
    denoiser.load_state_dict(state["denoiser"])
    frames = [] if args.capture_video else None
    torch.manual_seed(args.seed)
    returns = evaluate(envs, denoiser, DiffusionSchedule(args.beta_schedule, args.T, device), args, device, frames)
    print(f"{args.env_id}: eval return {returns.mean():.1f} +- {returns.std():.1f} over {len(returns)} episodes "
          f"({', '.join(f'{r:.1f}' for r in returns)})")  # fmt: skip
    if frames:
        name = os.path.basename(os.path.dirname(os.path.abspath(path))) if os.path.isfile(path) else path.strip("/")
        write_video(f"videos/{name}/evaluate.mp4", frames, envs[0])
        print(f"video: videos/{name}/evaluate.mp4")


# LONG RUNS: resume, checkpoints, offline tracking
RESUME_FIXED = ("env_id", "seed", "action_repeat", "buffer_size", "critic_hidden_dims", "actor_hidden_dims")


def resume_args(args: Args) -> tuple[Args, Checkpoint, dict]:
    """--resume: the checkpoint's settings, overridden by the flags given now. The task, the seed and the shapes of
    the networks and the buffer must stay; any other change is allowed (a lower learning rate after a NaN, say),
    and named, since the run then no longer continues exactly."""
    checkpoint = Checkpoint(Checkpoint.find(args.resume))
    state = checkpoint.load_state()
    saved = Args(**state["args"])
    defaults = dataclasses.replace(saved, resume=args.resume, cuda=torch.cuda.is_available())
    args = tyro.cli(Args, default=defaults)  # the command line again, with the checkpoint's values as defaults
    changed = []
    for name in ALGORITHM_FIELDS:
        value, was = getattr(args, name), getattr(saved, name)
        if value != was:
            value, was = (" ".join(map(str, v)) if isinstance(v, tuple) else v for v in (value, was))
            flag = f"--{name.replace('_', '-')}"
            if name in RESUME_FIXED:
                raise CheckpointError(f"--resume: the checkpoint was trained with {flag} {was}, this run asks for "
                                      f"{value}; drop {flag} to continue that run, or start a new one")  # fmt: skip
            changed.append(f"{flag} {value} (was {was})")
    if changed:
        print(f"note: resuming with {', '.join(changed)}: the run no longer continues exactly", file=sys.stderr)
    for name in state["buffer"]["chunks"].values():
        if not os.path.isfile(os.path.join(checkpoint.dir, name)):
            raise CheckpointError(f"--resume: {checkpoint.dir}/{name}, part of the checkpoint, is missing")
    if args.total_timesteps < state["global_step"]:
        raise CheckpointError(f"--resume: the checkpoint is at step {state['global_step']}, past --total-timesteps "
                              f"{args.total_timesteps}; raise --total-timesteps to train on")  # fmt: skip
    return args, checkpoint, state


def load_optimizer(optimizer: torch.optim.Optimizer, state: dict, lr: float, args: Args, device) -> None:
    """The saved Adam state, with this run's learning rate and graph setting (a run may resume with --cudagraphs)."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group["capturable"] = args.cudagraphs
        group["lr"] = torch.tensor(lr, device=device) if args.cudagraphs else lr


def wandb_reachable(timeout: float = 3.0) -> bool:
    url = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


if __name__ == "__main__":
    args = tyro.cli(Args)
    saved = None  # the checkpoint's training state when resuming
    if args.resume:
        try:
            args, checkpoint, saved = resume_args(args)
        except CheckpointError as error:
            fail(str(error))
    problem = check_args(args)
    if problem:
        fail(problem)
    if args.evaluate_model:
        evaluate_model(args)
        sys.exit(0)

    # TRY NOT TO MODIFY: logging, seeding, devices
    from absl import logging as absl_logging
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    absl_logging.set_verbosity(absl_logging.ERROR)  # dm_control's deprecation chatter
    if saved is None:
        run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir = f"runs/{run_name}"
        checkpoint = Checkpoint(f"{run_dir}/checkpoint")
    else:
        run_dir = os.path.dirname(checkpoint.dir)
        run_name = os.path.basename(run_dir)
    if args.track:
        import wandb

        if os.environ.get("WANDB_MODE") not in ("offline", "disabled") and not wandb_reachable():
            os.environ["WANDB_MODE"] = "offline"
            print(
                "wandb: no network; logging offline to ./wandb (upload later: wandb sync --sync-all)", file=sys.stderr
            )
        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            save_code=True,
            id=saved["wandb_id"] if saved and saved["wandb_id"] else None,
            resume="allow",
        )
    # when resuming, TensorBoard drops what the stopped run logged after its checkpoint
    writer = SummaryWriter(run_dir, purge_step=saved["global_step"] if saved else None)
    if saved is None:
        writer.add_text(
            "hyperparameters",
            "|param|value|\n|-|-|\n" + "\n".join(f"|{key}|{value}|" for key, value in vars(args).items()),
        )

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if args.cuda else "cpu")
    if args.bf16 and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        print("warning: this CPU has no bfloat16 matrix instructions; --bf16 runs slower than float32 here",
              file=sys.stderr)  # fmt: skip

    # environment setup: the task seeded with the run's seed, the eval tasks with others
    env = DMCEnv(args.env_id, args.seed, args.action_repeat)
    eval_envs = [DMCEnv(args.env_id, args.seed + 10_000 + i, args.action_repeat) for i in range(args.eval_episodes)]
    # one fixed initial state at which every evaluation also logs the policy's action distribution (paper, Fig. 4)
    probe_obs = torch.as_tensor(DMCEnv(args.env_id, args.seed + 20_000).reset(), device=device)
    obs_dim, action_dim = env.obs_dim, env.action_dim

    critic, critic_target, denoiser, critic_optimizer, actor_optimizer, actor_scheduler = build_agent(
        obs_dim, action_dim, args, device
    )
    schedule = DiffusionSchedule(args.beta_schedule, args.T, device)
    rb = ReplayBuffer(args.buffer_size, obs_dim, action_dim, device)

    if args.compile:
        # Rebinds the module's names, so the updates, acting and evaluation all call the compiled versions. Only the
        # losses (forward and backward graphs) and the sampler: zero_grad, backward and the optimiser step would
        # break the graph, and the fused Adam step is a single kernel already.
        critic_loss, qsm_loss, ddpm_sample = map(torch.compile, (critic_loss, qsm_loss, ddpm_sample))

    def update(idx: torch.Tensor) -> dict:  # gathers its batch itself, so a CUDA graph replays the gather too
        batch = rb.gather(idx)
        return train_step(batch, critic, critic_target, denoiser, critic_optimizer, actor_optimizer, schedule, args)

    def policy(obs: torch.Tensor) -> torch.Tensor:
        return act(denoiser, schedule, obs, args)

    if args.cudagraphs:
        update, policy = CudaGraph(update), CudaGraph(policy)

    def agent_state() -> dict:
        """The args, networks and optimisers: the --save-model file, and the core of every checkpoint."""
        return {
            "args": vars(args),
            "critic": critic.state_dict(),
            "critic_target": critic_target.state_dict(),
            "denoiser": denoiser.state_dict(),
            "critic_optimizer": critic_optimizer.state_dict(),
            "actor_optimizer": actor_optimizer.state_dict(),
            "actor_scheduler": actor_scheduler.state_dict(),
        }

    def training_state(next_step: int) -> dict:
        """Everything a run needs to go on exactly as if never stopped; the replay buffer is saved beside it."""
        return {
            **agent_state(),
            "global_step": next_step,
            "wandb_id": wandb.run.id if args.track else None,
            "env": env.get_state(),
            "episode": {
                "obs": torch.from_numpy(obs),
                "return": episode_return,
                "length": episode_length,
                "last_return": last_return,
            },
            "rng": {
                "python": random.getstate(),
                "numpy": get_numpy_rng_state(np.random),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
            },
        }

    # TRY NOT TO MODIFY: start the game
    obs = env.reset()
    episode_return, episode_length, last_return = 0.0, 0, float("nan")
    start = 0
    if saved is not None:
        critic.load_state_dict(saved["critic"])
        critic_target.load_state_dict(saved["critic_target"])
        denoiser.load_state_dict(saved["denoiser"])
        load_optimizer(critic_optimizer, saved["critic_optimizer"], args.critic_lr, args, device)
        actor_scheduler.load_state_dict(saved["actor_scheduler"])
        actor_scheduler.base_lrs = [args.actor_lr]
        lr = args.actor_lr * cosine_decay(actor_scheduler.last_epoch, args.actor_lr_decay_steps)  # as LambdaLR has it
        load_optimizer(actor_optimizer, saved["actor_optimizer"], lr, args, device)
        try:
            checkpoint.load_buffer(saved["buffer"], rb)
        except CheckpointError as error:
            fail(str(error))
        env.set_state(saved["env"])
        episode = saved["episode"]
        obs, episode_return, episode_length = episode["obs"].numpy(), episode["return"], episode["length"]
        last_return, start = episode["last_return"], saved["global_step"]
        random.setstate(saved["rng"]["python"])
        set_numpy_rng_state(np.random, saved["rng"]["numpy"])
        torch.set_rng_state(saved["rng"]["torch"])
        if device.type == "cuda" and saved["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(saved["rng"]["cuda"])
        print(f"resumed {run_dir} at step {start}", file=sys.stderr)

    stop_signal = []  # SIGTERM (Slurm pre-emption, kill) or SIGINT (Ctrl-C): finish the step, checkpoint, exit

    def request_stop(signum, frame):
        stop_signal.append(signal.Signals(signum).name)
        signal.signal(signum, signal.SIG_DFL)  # a second one stops at once; the last checkpoint stays whole

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    finite = torch.ones((), dtype=torch.bool, device=device)  # all losses and Q values since the last check
    last_checkpoint = f"{checkpoint.dir} (step {start})" if saved is not None else None

    def check_finite(step: int) -> None:
        """NaN/Inf guard: checked (one sync) when logging and before every checkpoint, so none holds a NaN."""
        if not finite:
            bad = [f"{k} ({v.item():.4g})" for k, v in metrics.items() if not torch.isfinite(v)] or ["a loss"]
            where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint yet"
            fail(f"non-finite {', '.join(bad)} by step {step}; {where} (--resume it with, e.g., a lower --critic-lr)")

    def evaluate_and_log(steps_done: int) -> float:
        """Evaluates the policy, logs it at steps_done (returns, the probe state's actions, a video); returns the
        seconds it took. Deterministic given the networks and the RNG state: eval envs are reseeded, RNGs forked."""
        eval_start = time.time()
        gpus = [torch.cuda.current_device()] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=gpus):  # evaluating never moves the training's random numbers
            frames = [] if args.capture_video else None
            returns = evaluate(eval_envs, denoiser, schedule, args, device, frames)
            probe_actions = ddpm_sample(denoiser, schedule, probe_obs.expand(1000, -1), args.ddpm_temperature,
                                        args.clip_sampler).cpu()  # fmt: skip
        writer.add_scalar("eval/episodic_return", returns.mean(), steps_done)
        writer.add_scalar("eval/episodic_return_std", returns.std(), steps_done)
        for dim in range(action_dim):
            writer.add_histogram(f"eval/action_dim_{dim}", probe_actions[:, dim], steps_done)
        pbar.write(f"step {steps_done}: eval return {returns.mean():.1f} +- {returns.std():.1f}")
        if frames:
            video = f"videos/{run_name}/step_{steps_done}.mp4"
            write_video(video, frames, eval_envs[0])
            if args.track:
                wandb.log({"videos/eval": wandb.Video(video, format="mp4")})
        return time.time() - eval_start

    start_time, start_step = time.time(), None
    pbar = tqdm(range(start, args.total_timesteps, args.action_repeat), unit="step", unit_scale=args.action_repeat,
                initial=start // args.action_repeat, total=args.total_timesteps // args.action_repeat)  # fmt: skip
    if saved is not None and start % args.eval_interval < args.action_repeat:
        # the stopped run evaluated at its checkpoint's step, then the purge above dropped that log: evaluate again
        evaluate_and_log(start)
    for global_step in pbar:
        # ALGO LOGIC: put action logic here
        if global_step < args.learning_starts:
            action = np.random.uniform(-1.0, 1.0, action_dim).astype(np.float32)
        else:
            action = policy(torch.as_tensor(obs, device=device).unsqueeze(0))[0].cpu().numpy()

        # TRY NOT TO MODIFY: execute the game and log data.
        next_obs, reward, mask, done = env.step(action)
        rb.add(obs, action, reward, next_obs, mask)
        episode_return += reward
        episode_length += args.action_repeat
        obs = next_obs
        if done:
            writer.add_scalar("charts/episodic_return", episode_return, global_step)
            writer.add_scalar("charts/episodic_length", episode_length, global_step)
            last_return = episode_return
            obs, episode_return, episode_length = env.reset(), 0.0, 0

        # ALGO LOGIC: training (Algorithm 1: a critic step, then a score step, utd_ratio times per env step)
        if global_step >= args.learning_starts:
            if start_step is None:
                start_time, start_step = time.time(), global_step
            for _ in range(args.utd_ratio):
                metrics = update(rb.sample_indices(args.batch_size))
                actor_scheduler.step()
                finite &= torch.stack(list(metrics.values())).isfinite().all()  # no sync

            if (global_step // args.action_repeat) % 100 == 0:
                check_finite(global_step)
                for key, value in metrics.items():
                    writer.add_scalar(key, value.item(), global_step)
                writer.add_scalar("charts/actor_lr", actor_optimizer.param_groups[0]["lr"], global_step)
                if global_step > start_step:
                    sps = (global_step - start_step) / (time.time() - start_time)
                    writer.add_scalar("charts/SPS", sps, global_step)
                    pbar.set_postfix(sps=f"{sps:.1f}", ret=f"{last_return:.1f}", refresh=False)

        steps_done = global_step + args.action_repeat
        # every eval_interval steps, and once more at the end, so every run reports its final policy
        if steps_done % args.eval_interval < args.action_repeat or steps_done >= args.total_timesteps:
            start_time += evaluate_and_log(steps_done)  # SPS counts training steps/s, not evaluation time

        checkpoint_due = args.checkpoint_interval and steps_done % args.checkpoint_interval < args.action_repeat
        if checkpoint_due or stop_signal or (args.checkpoint_interval and steps_done >= args.total_timesteps):
            if global_step >= args.learning_starts:
                check_finite(global_step)
            checkpoint.save(training_state(steps_done), rb, steps_done)
            last_checkpoint = f"{checkpoint.dir} (step {steps_done})"
            if stop_signal:
                pbar.close()
                print(f"{stop_signal[0]} at step {steps_done}: checkpoint written to {checkpoint.dir}; continue with "
                      f"python {sys.argv[0]} --resume {run_dir}", file=sys.stderr)  # fmt: skip
                break

    if args.save_model and not stop_signal:
        model_path = f"{run_dir}/{args.exp_name}.pt"
        save_checkpoint(model_path, {**agent_state(), "global_step": args.total_timesteps})
        print(f"model saved to {model_path}")

    writer.close()
    if args.track:
        wandb.finish()
