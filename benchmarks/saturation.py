"""`bash benchmark.sh saturation`: why QSM policies sit on the action bounds, without any RL.

A 1-D action, one state, uniform replay actions and a fixed critic with a known answer: `linear` (Q = a, best action
+1) and `bimodal` (Q = -4 (a^2 - 0.36)^2, best actions +-0.6, nothing special at +-1). For each score target and
sampler clip, 400 QSM steps on the denoiser, then 2,000 samples of the T = 5 DDPM chain: the share at +-1 and a
10-bin histogram over [-1, 1]. The paper's target puts every sample at +-1 even when the best actions are +-0.6.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qsm_continuous as qsm

CRITICS = {"linear": lambda a: a.sum(-1), "bimodal": lambda a: -4.0 * (a.pow(2) - 0.36).pow(2).sum(-1)}
# (score target, --normalize-q-grad, M_q, sampler clip): the paper's first
VARIANTS = [("paper", False, 50.0, "x_t"), ("paper", False, 50.0, "x0_hat"), ("paper", False, 50.0, "final"),
            ("paper", True, 1.0, "x_t"), ("denoising", False, 50.0, "x_t"), ("denoising", True, 1.0, "x_t"),
            ("denoising", True, 1.0, "x0_hat"), ("denoising", True, 3.0, "x0_hat")]  # fmt: skip


def main() -> None:
    torch.set_num_threads(1)
    print("| critic | score target | normalize | M_q | clip | at +-1 | histogram over [-1, 1], 10 bins |")
    print("|---|---|---|---|---|---|---|")
    for name, q in CRITICS.items():
        critic = lambda obs, a, q=q: torch.stack([q(a), q(a)])  # noqa: E731  (twin critics, equal)
        for target, normalize, M_q, clip in VARIANTS:
            torch.manual_seed(0)
            den, schedule = qsm.Denoiser(2, 1, (64, 64)), qsm.DiffusionSchedule("vp", 5)
            opt, obs = torch.optim.Adam(den.parameters(), 3e-3), torch.zeros(256, 2)
            args = qsm.Args(M_q=M_q, score_target=target, normalize_q_grad=normalize, cuda=False)
            for _ in range(400):
                batch = qsm.Batch(obs, torch.rand(256, 1) * 2 - 1, torch.zeros(256), obs, torch.ones(256))
                loss, _ = qsm.qsm_loss(den, critic, schedule, batch, args)
                opt.zero_grad()
                loss.backward()
                opt.step()
            a = qsm.ddpm_sample(den, schedule, torch.zeros(2000, 2), 1.0, clip)[:, 0]
            hist = " ".join(f"{n:4d}" for n in torch.histc(a, 10, -1, 1).int().tolist())
            print(f"| {name} | {target} | {normalize} | {M_q:g} | {clip} | {(a.abs() >= 1).float().mean():.0%} | "
                  f"`{hist}` |")  # fmt: skip


if __name__ == "__main__":
    main()
