"""The dm_control wrapper and the replay buffer (the Gymnasium wrapper: test_gymnasium.py)."""

from collections import OrderedDict

import dm_env
import numpy as np
import torch


def test_ids_split_at_the_first_dash_only(qsm, monkeypatch):
    calls, load = [], qsm.suite.load
    monkeypatch.setattr(qsm.suite, "load", lambda *names, **kwargs: calls.append(names) or load(*names, **kwargs))
    for env_id in ("cheetah-run", "ball_in_cup-catch", "cartpole-swingup_sparse"):
        qsm.DMCEnv(env_id, seed=0)
    assert calls == [("cheetah", "run"), ("ball_in_cup", "catch"), ("cartpole", "swingup_sparse")]


def test_underscore_tasks_load_and_step(qsm):
    for env_id in ["ball_in_cup-catch", "cartpole-swingup_sparse"]:
        env = qsm.DMCEnv(env_id, seed=0)
        obs = env.reset()
        assert obs.shape == (env.obs_dim,)
        next_obs, reward, mask, done = env.step(np.zeros(env.action_dim))
        assert next_obs.dtype == np.float32 and 0.0 <= reward <= 1.0 and mask == 1.0 and not done


def test_observation_is_flattened_in_spec_order(qsm):
    """The flat observation is the nested one's entries raveled in the spec's order (a scalar among arrays too)."""
    env = qsm.DMCEnv("walker-walk", seed=0)  # 14 orientations, a scalar height, 9 velocities
    nested = qsm.suite.load("walker", "walk", task_kwargs={"random": 0})  # the same task and seed, not flattened
    observations = [nested.reset().observation, nested.step(np.full(6, 0.5)).observation]
    assert list(observations[0]) == ["orientations", "height", "velocity"]
    flat = [env.reset(), env.step(np.full(6, 0.5))[0]]
    for obs, nested_obs in zip(flat, observations, strict=True):
        expected = np.concatenate([np.asarray(v, np.float32).ravel() for v in nested_obs.values()])
        assert obs.dtype == np.float32 and obs.shape == (env.obs_dim,) == (24,)
        np.testing.assert_array_equal(obs, expected)
        assert obs[14] == np.float32(nested_obs["height"])


def test_actions_are_rescaled_to_the_spec(qsm):
    env = qsm.DMCEnv("cheetah-run", seed=0)
    env.action_low, env.action_high = np.array([-2.0, 0.0]), np.array([2.0, 10.0])
    np.testing.assert_allclose(env.rescale(np.array([-1.0, -1.0])), [-2.0, 0.0])
    np.testing.assert_allclose(env.rescale(np.array([1.0, 1.0])), [2.0, 10.0])
    np.testing.assert_allclose(env.rescale(np.array([0.5, 0.0])), [1.0, 5.0])
    np.testing.assert_allclose(env.rescale(np.array([3.0, -7.0])), [2.0, 0.0])  # out-of-box actions are clipped


def test_same_seed_same_episode_other_seed_other_start(qsm):
    a, b, c = (qsm.DMCEnv("cartpole-swingup", seed=s) for s in (3, 3, 4))
    np.testing.assert_array_equal(a.reset(), b.reset())
    assert not np.array_equal(a.reset(), c.reset())


def test_time_limit_keeps_the_bootstrap(qsm):
    """dm_control ends every episode at 1000 steps with discount 1: the mask must stay 1 there."""
    env = qsm.DMCEnv("cartpole-balance", seed=0)
    env.reset()
    steps, done = 0, False
    while not done:
        _, _, mask, done = env.step(np.zeros(1))
        steps += 1
        assert mask == 1.0
    assert steps == 1000


class FakeTask:
    """Scripted dm_env: reward 1 per step, a true terminal (discount 0) at step `terminal_at`."""

    def __init__(self, terminal_at):
        self.terminal_at, self.t, self.actions = terminal_at, 0, []

    def reset(self):
        self.t = 0
        return dm_env.restart(OrderedDict(observations=np.zeros(2)))  # flat, as flat_observation gives

    def step(self, action):
        self.t += 1
        self.actions.append(action)
        obs = OrderedDict(observations=np.full(2, self.t, dtype=np.float64))
        return dm_env.termination(1.0, obs) if self.t == self.terminal_at else dm_env.transition(1.0, obs)


def test_terminal_state_cuts_the_bootstrap_and_action_repeat_sums_rewards(qsm):
    env = qsm.DMCEnv("cheetah-run", seed=0, action_repeat=3)
    env.env = FakeTask(terminal_at=5)
    env.reset()
    obs, reward, mask, done = env.step(np.zeros(6))
    assert (reward, mask, done) == (3.0, 1.0, False) and obs[0] == 3
    obs, reward, mask, done = env.step(np.zeros(6))  # stops at the terminal after 2 of 3 repeats
    assert (reward, mask, done) == (2.0, 0.0, True) and obs[0] == 5
    assert len(env.env.actions) == 5


def test_replay_buffer_wraps_around(qsm):
    rb = qsm.ReplayBuffer(capacity=4, obs_dim=2, action_dim=1)
    for i in range(6):  # transitions 4 and 5 overwrite 0 and 1
        rb.add(np.full(2, i, np.float32), np.full(1, i / 10, np.float32), float(i), np.full(2, i + 1, np.float32), 1.0)
    assert rb.size == 4 and rb.pos == 2
    stored = rb.gather(torch.arange(4))  # the rows in ring order
    torch.testing.assert_close(stored.rewards, torch.tensor([4.0, 5.0, 2.0, 3.0]))
    torch.testing.assert_close(stored.next_obs[:, 0], torch.tensor([5.0, 6.0, 3.0, 4.0]))
    torch.manual_seed(0)
    batch = rb.gather(rb.sample_indices(64))
    assert batch.obs.shape == (64, 2) and batch.actions.shape == (64, 1) and batch.rewards.shape == (64,)
    assert set(batch.rewards.tolist()) == {2.0, 3.0, 4.0, 5.0}  # every stored transition, nothing overwritten
    torch.testing.assert_close(batch.next_obs[:, 0], batch.rewards + 1)  # rows stay aligned
    torch.testing.assert_close(batch.actions[:, 0], batch.rewards / 10)


def test_replay_buffer_samples_only_filled_slots(qsm):
    rb = qsm.ReplayBuffer(capacity=100, obs_dim=1, action_dim=1)
    rb.add(np.ones(1), np.ones(1), 5.0, np.ones(1), 0.0)
    batch = rb.gather(rb.sample_indices(16))
    assert batch.rewards.eq(5.0).all() and batch.masks.eq(0.0).all()
