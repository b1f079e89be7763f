"""`bash benchmark.sh random-policy`: a uniform random policy's eval return on a run's own evaluation episodes.

The baseline of the pendulum check (issue 31): the script's `evaluate`, its policy (`policy`) swapped for actions
drawn uniformly from [-1, 1]^A, on the episodes a run of that seed evaluates on (task seeds seed + 10000 + i, the same
action repeat and reward sums). Prints a markdown table: per seed the mean ± std over episodes, then over seeds.
"""

import argparse
from unittest import mock

import events
import numpy as np
import torch
from report import fail


def random_returns(env_id: str, seed: int, episodes: int = 5, action_repeat: int = 1) -> np.ndarray:
    """The return of each of a run's evaluation episodes under uniform random actions (drawn from torch, seeded)."""
    qsm = events.script()
    args = qsm.Args(env_id=env_id, seed=seed, eval_episodes=episodes, action_repeat=action_repeat, cuda=False)
    envs = [qsm.make_env(env_id, seed + 10_000 + i, action_repeat) for i in range(episodes)]
    generator = torch.Generator().manual_seed(seed)

    def uniform(agent, obs, args):  # the policy's signature: one action per running episode
        return torch.rand(len(obs), envs[0].action_dim, generator=generator) * 2 - 1

    with mock.patch.object(qsm, "policy", uniform):
        return qsm.evaluate(envs, None, args, "cpu")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="bash benchmark.sh random-policy", description=__doc__.splitlines()[0])
    parser.add_argument("--env-ids", nargs="+", default=["pendulum-swingup"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--episodes", type=int, default=5, help="episodes per evaluation (the script's default: 5)")
    opts = parser.parse_args(argv)
    if problem := events.unknown_env_id(opts.env_ids):
        fail(problem)  # one line and exit 2, as the other subcommands
    print("| task | seed | uniform random policy: eval return |\n|---|---|---|")
    for env_id in opts.env_ids:
        means = []
        for seed in opts.seeds:
            returns = random_returns(env_id, seed, opts.episodes)
            means.append(returns.mean())
            print(f"| {env_id} | {seed} | {returns.mean():.1f} ± {returns.std():.1f} |")
        seeds = " ".join(map(str, opts.seeds))
        print(f"| {env_id} | mean over seeds {seeds} | {np.mean(means):.1f} ± {np.std(means):.1f} |")


if __name__ == "__main__":
    main()
