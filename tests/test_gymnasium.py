"""Gymnasium's MuJoCo tasks behind the dm_control wrapper's interface: masks at terminated and truncated, action
bounds, seeding, ids that are not tasks, and a run resumed bit for bit."""

import gymnasium as gym
import numpy as np
import pytest
from helpers import SMALL, only_run_dir, read_scalars, run_script


def test_terminated_cuts_the_bootstrap_truncated_keeps_it(qsm):
    """Gymnasium 1.x: `terminated` (a true terminal state) gives mask 0, `truncated` (the time limit) mask 1. Reading
    the two as one (CleanRL's SAC once did) would zero the bootstrap at every time limit."""
    env = qsm.GymEnv("Hopper-v5", seed=0)
    env.env = gym.make("Hopper-v5", max_episode_steps=5)  # the time limit after 5 steps of a hopper still healthy
    env.env.reset(seed=0)
    transitions = [env.step(np.zeros(3)) for _ in range(5)]
    assert [(mask, done) for _, _, mask, done in transitions] == [(1.0, False)] * 4 + [(1.0, True)]
    env.env = gym.make("Hopper-v5", healthy_z_range=(10.0, 20.0))  # unhealthy at once: terminated at the first step
    env.env.reset(seed=0)
    _, _, mask, done = env.step(np.zeros(3))
    assert (mask, done) == (0.0, True)


def test_action_repeat_sums_rewards_and_stops_at_the_end(qsm):
    env = qsm.GymEnv("Hopper-v5", seed=0, action_repeat=3)
    env.env = gym.make("Hopper-v5", max_episode_steps=5)
    reference = gym.make("Hopper-v5", max_episode_steps=5)
    env.env.reset(seed=1)
    reference.reset(seed=1)
    rewards = [reference.step(np.full(3, 0.5))[1] for _ in range(5)]
    first, second = env.step(np.full(3, 0.5)), env.step(np.full(3, 0.5))  # 3 steps, then 2 of 3: the time limit
    assert first[1] == pytest.approx(sum(rewards[:3])) and not first[3]
    assert second[1] == pytest.approx(sum(rewards[3:])) and second[2:] == (1.0, True)


def test_actions_are_rescaled_to_the_task_bounds(qsm):
    env = qsm.GymEnv("Humanoid-v5", seed=0)  # bounds [-0.4, 0.4]
    np.testing.assert_allclose(env.action_low, -0.4)
    np.testing.assert_allclose(env.action_high, 0.4)
    action = np.tile([-1.0, 0.0, 1.0, 2.0, -3.0], 4)[:17]  # the last two out of the box: clipped
    np.testing.assert_allclose(env.rescale(action), np.tile([-0.4, 0.0, 0.4, 0.4, -0.4], 4)[:17], atol=1e-7)
    assert (env.obs_dim, env.action_dim) == (348, 17) and env.reset().shape == (348,)


def test_seeding_as_for_dm_control(qsm):
    """The training task from its seed; reset(seed) (each evaluation episode) the same start every time."""
    a, b, c = (qsm.GymEnv("Hopper-v5", seed=s) for s in (3, 3, 4))
    first = a.reset()
    np.testing.assert_array_equal(first, b.reset())
    assert not np.array_equal(first, c.reset())
    assert not np.array_equal(first, a.reset())  # later episodes draw on from the seeded RNG
    np.testing.assert_array_equal(a.reset(seed=10_001), c.reset(seed=10_001))
    assert isinstance(qsm.make_env("Hopper-v4", 0), qsm.GymEnv) and isinstance(
        qsm.make_env("hopper-hop", 0), qsm.DMCEnv
    )


@pytest.mark.parametrize(
    ("env_id", "expected"),
    [
        (
            "Hopper-v3",
            "--env-id Hopper-v3 needs mujoco-py (Gymnasium moved its v2/v3 MuJoCo tasks to gymnasium-robotics)",
        ),
        (
            "Walker2d-v2",
            "--env-id Walker2d-v2 needs mujoco-py (Gymnasium moved its v2/v3 MuJoCo tasks to gymnasium-robotics); "
            "use Walker2d-v5",
        ),
        (
            "Hoper-v5",
            "--env-id 'Hoper-v5' is neither a dm_control task nor a Gymnasium MuJoCo task; did you mean 'Hopper-v5'",
        ),
        ("Pendulum-v1", "--env-id 'Pendulum-v1' is neither a dm_control task nor a Gymnasium MuJoCo task"),
    ],
)
def test_bad_gymnasium_ids_are_one_line(qsm, env_id, expected):
    problem = qsm.env_id_problem(env_id)
    assert problem.startswith(expected) and "\n" not in problem, problem
    assert "Hopper-v5" in qsm.ENV_IDS and "Ant-v4" in qsm.ENV_IDS and qsm.env_id_problem("HalfCheetah-v5") is None


@pytest.mark.slow  # a subprocess
def test_a_v3_id_exits_2_before_anything_starts(tmp_path):
    result = run_script(["--env-id", "Hopper-v3"], tmp_path, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-3000:]
    assert result.stderr.startswith("error: --env-id Hopper-v3 needs mujoco-py") and "use Hopper-v5" in result.stderr
    assert not (tmp_path / "runs").exists()


GYM = ["--learning-starts", "400", "--eval-interval", "600", "--eval-episodes", "2", *SMALL]


@pytest.mark.slow  # runs of the script
@pytest.mark.parametrize("env_id", ["Hopper-v5", "Ant-v5"])  # Ant's reward reads a body's kinematics before the step
def test_a_gymnasium_run_resumes_bit_for_bit(tmp_path, env_id):
    """Stopped at step 700 and resumed to 1200, a run logs every value as the run that never stopped: the MuJoCo state,
    its kinematics, the time-limit counter and the task's RNG are in the checkpoint."""
    straight_dir, cut_dir = tmp_path / "straight", tmp_path / "cut"
    straight_dir.mkdir(), cut_dir.mkdir()
    straight = run_script(["--env-id", env_id, *GYM, "--total-timesteps", "1200"], straight_dir)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = run_script(["--env-id", env_id, *GYM, "--total-timesteps", "700", "--checkpoint-interval", "500"], cut_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_script(["--resume", str(only_run_dir(cut_dir)), "--total-timesteps", "1200"], cut_dir)
    assert resumed.returncode == 0 and "resumed" in resumed.stderr, resumed.stderr[-3000:]
    logged = [
        {tag: v for tag, v in read_scalars(only_run_dir(d)).items() if tag != "charts/SPS"}
        for d in (straight_dir, cut_dir)
    ]
    assert len(logged[0]["charts/episodic_return"]) >= 3  # episodes ended (terminated) on both sides of the cut
    assert [step for step, _ in logged[0]["eval/episodic_return"]] == [600, 1200]
    assert logged[1] == logged[0]


@pytest.mark.slow  # a subprocess
def test_capture_video_on_a_gymnasium_task(egl, tmp_path):
    """Gymnasium's own renderer films the first evaluation episode; its GL context is freed before the exit, so the
    run ends without the viewer's late-free traceback on stderr."""
    args = ["--env-id", "Hopper-v5", "--total-timesteps", "500", "--learning-starts", "400", "--eval-interval", "500"]
    result = run_script([*args, "--eval-episodes", "1", *SMALL, "--capture-video"], tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (video,) = (tmp_path / "videos").glob("Hopper-v5__*/step_500.mp4")
    assert video.read_bytes()[4:8] == b"ftyp"
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr[-3000:]
