"""benchmarks/random_policy.py: a uniform random policy on a run's own evaluation episodes (the pendulum baseline)."""

import numpy as np
import pytest
import random_policy
import torch


def test_random_returns_are_the_evaluation_episodes_under_uniform_actions(qsm):
    """By hand: the eval tasks' seeds (seed + 10000 + i), every step one uniform action per episode from the seeded
    generator, rewards summed to the episode's end. Catches other episodes, other actions, or the policy left in."""
    returns = random_policy.random_returns("cartpole-swingup", seed=1, episodes=2)
    envs = [qsm.DMCEnv("cartpole-swingup", 1 + 10_000 + i) for i in range(2)]
    for i, env in enumerate(envs):
        env.env.task.random.seed(1 + 10_000 + i)
        env.reset()
    generator, expected, done = torch.Generator().manual_seed(1), np.zeros(2), False
    while not done:  # cartpole's episodes all last 1000 steps
        actions = (torch.rand(2, envs[0].action_dim, generator=generator) * 2 - 1).numpy()
        for i, env in enumerate(envs):
            _, reward, _, done = env.step(actions[i])
            expected[i] += reward
    np.testing.assert_allclose(returns, expected, rtol=1e-12)
    assert returns[0] != returns[1] and (returns > 0).all()  # two different episodes, each with some reward


def test_unknown_task_is_one_line_naming_the_valid_ids(capsys):
    """The grid's and the speed benchmark's message (one helper, events.unknown_env_id) and exit status (2, as argparse
    and the script), before any episode runs."""
    with pytest.raises(SystemExit) as exit_:
        random_policy.main(["--env-ids", "pendulum-swingup", "cheetah_run"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == ""
    assert err.startswith(
        "error: --env-ids 'cheetah_run' is neither a dm_control task nor a Gymnasium MuJoCo task; "
        "did you mean 'cheetah-run'?"
    )
    assert err.count("\n") == 1
