"""`bash benchmark.sh saturation`: why QSM policies sit on the action bounds, without any RL.

A 1-D action, one state, uniform replay actions and a fixed critic with a known answer: `linear` (Q = a, best action
+1) and `bimodal` (Q = -4 (a^2 - 0.36)^2, best actions +-0.6, nothing special at +-1). For each score target and
sampler clip, 400 QSM steps on the denoiser, then 2,000 samples of the T = 5 DDPM chain: the share at +-1 and a
10-bin histogram over [-1, 1]. The paper's target puts every sample at +-1 even when the best actions are +-0.6.

--capacity: the same toy with the bimodal critic, the paper's target and the denoising target (normalised, M_q 3,
x0_hat), the denoiser at 1 hidden layer of 64 and 2 hidden layers of 16, 32, 64, 128, 256 and 512, 5 seeds each: the
share at +-1 and the modes of the samples (stats.count_modes), as mean and range over seeds. Does the policy's shape
come from the denoiser's capacity or from the objective?
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np
import stats

import qsm_continuous as qsm

CRITICS = {"linear": lambda a: a.sum(-1), "bimodal": lambda a: -4.0 * (a.pow(2) - 0.36).pow(2).sum(-1)}
# (score target, --normalize-q-grad, M_q, sampler clip): the paper's first
VARIANTS = [
    ("paper", False, 50.0, "x_t"),
    ("paper", False, 50.0, "x0_hat"),
    ("paper", False, 50.0, "final"),
    ("paper", True, 1.0, "x_t"),
    ("denoising", False, 50.0, "x_t"),
    ("denoising", True, 1.0, "x_t"),
    ("denoising", True, 1.0, "x0_hat"),
    ("denoising", True, 3.0, "x0_hat"),
]


def train_and_sample(critic, hidden, target, normalize, M_q, clip, seed=0, samples=2000):
    """400 QSM steps of a fresh denoiser against the fixed critic, then samples of the T = 5 chain: (N,) actions."""
    torch.manual_seed(seed)
    den, schedule = qsm.Denoiser(2, 1, hidden, 5), qsm.DiffusionSchedule("vp", 5)
    opt, obs = torch.optim.Adam(den.parameters(), 3e-3), torch.zeros(256, 2)
    args = qsm.Args(M_q=M_q, score_target=target, normalize_q_grad=normalize, cuda=False)
    for _ in range(400):
        batch = qsm.Batch(obs, torch.rand(256, 1) * 2 - 1, torch.zeros(256), obs, torch.ones(256))
        loss, _ = qsm.qsm_loss(den, critic, schedule, batch, args)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return qsm.ddpm_sample(den, schedule, torch.zeros(samples, 2), 1.0, clip)[:, 0]


def twin(q):
    return lambda obs, a: torch.stack([q(a), q(a)])  # twin critics, equal


def capacity() -> None:
    print("| score target | denoiser | at +-1: mean (min-max) over 5 seeds | modes: mean (min-max) |")
    print("|---|---|---|---|")
    sizes = [(64,), (16, 16), (32, 32), (64, 64), (128, 128), (256, 256), (512, 512)]
    for target, normalize, M_q, clip in [("paper", False, 50.0, "x_t"), ("denoising", True, 3.0, "x0_hat")]:
        for hidden in sizes:
            shares, modes = [], []
            for seed in range(5):
                a = train_and_sample(twin(CRITICS["bimodal"]), hidden, target, normalize, M_q, clip, seed).numpy()
                shares.append(float((abs(a) >= 1).mean()))
                modes.append(stats.count_modes(a, np.ones_like(a)))
            print(
                f"| {target} | {' x '.join(map(str, hidden))} | {np.mean(shares):.0%} ({min(shares):.0%}-"
                f"{max(shares):.0%}) | {np.mean(modes):.1f} ({min(modes)}-{max(modes)}) |"
            )


def main() -> None:
    torch.set_num_threads(1)
    if "--capacity" in sys.argv[1:]:
        return capacity()
    print("| critic | score target | normalize | M_q | clip | at +-1 | histogram over [-1, 1], 10 bins |")
    print("|---|---|---|---|---|---|---|")
    for name, q in CRITICS.items():
        for target, normalize, M_q, clip in VARIANTS:
            a = train_and_sample(twin(q), (64, 64), target, normalize, M_q, clip)
            hist = " ".join(f"{n:4d}" for n in torch.histc(a, 10, -1, 1).int().tolist())
            print(
                f"| {name} | {target} | {normalize} | {M_q:g} | {clip} | {(a.abs() >= 1).float().mean():.0%} | "
                f"`{hist}` |"
            )


if __name__ == "__main__":
    main()
