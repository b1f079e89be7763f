"""Never lose a run: exact resume, crash-safe checkpoints, signals, the NaN guard and offline tracking."""

import os
import shutil
import signal
import time

import numpy as np
import pytest
import torch
from helpers import BASE, SCRIPT, edited_copy, only_run_dir, read_scalars, run_script, start_script, wait_for_file

pytestmark = pytest.mark.slow  # runs of the script in subprocesses


def logged(run_dir):
    """Every scalar the run logged, wall-clock rates aside."""
    return {tag: values for tag, values in read_scalars(run_dir).items() if tag != "charts/SPS"}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The reference: 1,200 steps in one go."""
    cwd = tmp_path_factory.mktemp("straight")
    result = run_script([*BASE, "--total-timesteps", "1200"], cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return logged(only_run_dir(cwd))


@pytest.mark.parametrize("first_total", [700, 600])  # 600: the checkpoint falls on an evaluation step
def test_resume_with_raised_total_timesteps_is_bit_exact(straight, tmp_path, first_total):
    first = run_script([*BASE, "--total-timesteps", str(first_total), "--checkpoint-interval", "500"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    resumed = run_script(["--resume", str(run_dir), "--total-timesteps", "1200"], tmp_path)  # flags from the checkpoint
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed {run_dir} at step {first_total}" in resumed.stderr
    assert "note:" not in resumed.stderr  # nothing changed but the length
    assert len(straight["losses/qf1_loss"]) == 8 and [s for s, _ in straight["eval/episodic_return"]] == [600, 1200]
    assert logged(run_dir) == straight  # every logged value, bit for bit


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_writes_a_checkpoint_exits_128_plus_the_signal_and_resumes_exactly(straight, tmp_path, signum):
    proc = start_script([*BASE, "--total-timesteps", "1200", "--checkpoint-interval", "500"], tmp_path)
    wait_for_file(tmp_path, "runs/*/checkpoint.pt", proc)  # step 500: in the learning phase
    time.sleep(0.5)  # then at an arbitrary step
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, stderr[-3000:]  # not done: as a shell reports a signal
    run_dir = only_run_dir(tmp_path)
    stopped_at = torch.load(run_dir / "checkpoint.pt", weights_only=True)["global_step"]
    assert 500 <= stopped_at < 1200
    relative = run_dir.relative_to(tmp_path)
    assert (
        f"{signal.Signals(signum).name} at step {stopped_at}: checkpoint written to {relative}/checkpoint.pt" in stderr
    )
    assert stderr.rstrip().endswith(f"qsm_continuous.py --resume {run_dir}")  # absolute: it works from anywhere
    resumed = run_script(["--resume", str(run_dir)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert logged(run_dir) == straight


def test_kill_9_leaves_a_loadable_checkpoint(tmp_path):
    proc = start_script([*BASE, "--total-timesteps", "5000", "--checkpoint-interval", "20"], tmp_path)
    wait_for_file(tmp_path, "runs/*/checkpoint.pt", proc)
    time.sleep(3.0)  # checkpoints every 20 steps: the kill lands at an arbitrary point, maybe inside a write
    proc.kill()
    proc.communicate()
    run_dir = only_run_dir(tmp_path)
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    step = state["global_step"]
    assert state["buffer"]["added"] == step and state["buffer"]["rows"].shape[0] == step
    assert torch.isfinite(state["buffer"]["rows"]).all()
    resumed = run_script(["--resume", str(run_dir), "--total-timesteps", str(step + 100)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]  # also: kill -9 freed the run directory's lock
    assert f"at step {step}" in resumed.stderr


def test_planted_nan_stops_the_run_naming_step_quantity_and_checkpoint(tmp_path):
    # M_q = 1e39 overflows float32: the score target, and the actor loss with it, is infinite from the first update
    result = run_script([*BASE, "--total-timesteps", "1000", "--checkpoint-interval", "200", "--M-q", "1e39"], tmp_path)
    assert result.returncode == 2
    run_dir = only_run_dir(tmp_path).relative_to(tmp_path)
    assert result.stderr.startswith("error: non-finite losses/actor_loss (inf)")
    assert f"by step 400; the last good checkpoint is {run_dir}/checkpoint.pt (step 400)" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    state = torch.load(tmp_path / run_dir / "checkpoint.pt", weights_only=True)
    assert state["global_step"] == 400  # no checkpoint was written after the NaN
    assert all(torch.isfinite(p).all() for p in state["critic"].values())


@pytest.mark.parametrize("cause", ["the NaN guard", "a crash"])
def test_an_error_during_training_starts_on_its_own_line(tmp_path, cause):
    """With the progress bar on stderr, as a user runs it: the NaN guard's one line (M_q = 1e39 overflows from the first
    update) or a crash's traceback (an exception raised in the loop of a copy of the file) starts a line of its own,
    after the bar's, and comes once; before, it was written on the bar's line (`40%|...|error: ...`)."""
    script = SCRIPT
    flags = [*BASE, "--total-timesteps", "1000", "--checkpoint-interval", "200"]
    if cause == "a crash":
        anchor = "            rb.add(obs, action, reward, next_obs, mask)\n"
        crash = f'{anchor}            if global_step == 450:\n                raise RuntimeError("boom")\n'
        script = edited_copy(tmp_path, (anchor, crash))
    else:
        flags += ["--M-q", "1e39"]
    result = run_script(flags, tmp_path, script=script, progress_bar=True)
    first = "error: non-finite losses/actor_loss" if cause == "the NaN guard" else "Traceback (most recent call last):"
    assert result.returncode == (2 if cause == "the NaN guard" else 1), result.stderr[-3000:]
    assert "step/s]" in result.stderr  # the bar was drawn
    assert result.stderr.count(first) == 1
    assert f"\n{first}" in result.stderr, result.stderr[-1000:]  # the line starts after a newline, not after the bar


PLANTS = {  # a NaN planted right after the update of step 499, in a copy of the file: no loss can see it before 500
    "parameter": 'agent.denoiser.out.bias.data[0] = float("nan")',
    "optimiser state": 'agent.actor_optimizer.state[agent.denoiser.out.bias]["exp_avg_sq"][0] = float("nan")',
}


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_a_nan_in_what_a_checkpoint_saves_stops_the_run_before_it_is_saved(tmp_path, plant):
    anchor = "                    agent.actor_scheduler.step()\n"
    script = edited_copy(
        tmp_path, (anchor, f"{anchor}                    if global_step == 499:\n{' ' * 24}{PLANTS[plant]}\n")
    )
    result = run_script([*BASE, "--total-timesteps", "1000", "--checkpoint-interval", "100"], tmp_path, script=script)
    assert result.returncode == 2
    run_dir = only_run_dir(tmp_path).relative_to(tmp_path)
    assert result.stderr == (
        f"error: non-finite parameters or Adam state by step 499; the last good checkpoint "
        f"is {run_dir}/checkpoint.pt (step 400) (--resume it with, e.g., a lower --critic-lr)\n"
    )
    state = torch.load(tmp_path / run_dir / "checkpoint.pt", weights_only=True)
    assert state["global_step"] == 400
    tensors = [*state["critic"].values(), *state["critic_target"].values(), *state["denoiser"].values()]
    tensors += [
        v for opt in ("critic_optimizer", "actor_optimizer") for s in state[opt]["state"].values() for v in s.values()
    ]
    assert all(torch.isfinite(t).all() for t in tensors)


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("checkpointed")
    result = run_script([*BASE, "--total-timesteps", "450", "--save-model"], cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return only_run_dir(cwd)


def _snapshot(directory):
    return {path: (path.stat().st_size, path.stat().st_mtime_ns) for path in directory.rglob("*")}


@pytest.mark.parametrize(
    ("damage", "args", "expected"),
    [
        ("truncate", [], "no readable checkpoint or --save-model file at"),
        ("model-file", [], "qsm_continuous.pt is a --save-model file, not a checkpoint; use runs/RUN/checkpoint.pt"),
        (
            None,
            ["--env-id", "walker-walk"],
            "was trained with --env-id cartpole-swingup, this run asks for walker-walk",
        ),
        (
            None,
            ["--critic-hidden-dims", "32", "32"],
            "was trained with --critic-hidden-dims 64 64, this run asks for 32",
        ),
        (None, ["--total-timesteps", "300"], "the checkpoint is at step 450, its --total-timesteps is 300: nothing"),
        (None, ["--total-timesteps", "450"], "the checkpoint is at step 450, its --total-timesteps is 450: nothing"),
    ],
)
def test_bad_checkpoints_give_one_line_and_touch_nothing(checkpointed, tmp_path, damage, args, expected):
    run_dir = checkpointed
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    if damage == "truncate":
        state = copy / "checkpoint.pt"
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    before = _snapshot(copy)
    resume = copy / "qsm_continuous.pt" if damage == "model-file" else copy
    result = run_script(["--resume", str(resume), *args], tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --resume") and expected in result.stderr, result.stderr
    assert damage != "truncate" or "checkpoint.pt (RuntimeError)" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert _snapshot(copy) == before  # nothing written, nothing overwritten


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU")
def test_a_cudagraphs_checkpoint_without_a_gpu_names_the_flag_to_pass(checkpointed, tmp_path):
    """--cudagraphs comes from the checkpoint, not from the user: the one line names the flag that resumes it."""
    copy = tmp_path / checkpointed.name
    shutil.copytree(checkpointed, copy)
    state = torch.load(copy / "checkpoint.pt", weights_only=True)
    torch.save(state | {"args": state["args"] | {"cudagraphs": True}}, copy / "checkpoint.pt")
    refused = run_script(["--resume", str(copy), "--total-timesteps", "500"], tmp_path, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr == "error: --cudagraphs needs a CUDA device (--cuda); on the CPU, run with --no-cudagraphs\n"
    resumed = run_script(["--resume", str(copy), "--no-cudagraphs", "--total-timesteps", "500"], tmp_path)
    assert resumed.returncode == 0 and f"resumed {copy} at step 450" in resumed.stderr, resumed.stderr[-3000:]


def test_resume_from_nowhere(tmp_path):
    result = run_script(["--resume", str(tmp_path / "nothing")], tmp_path, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert f"no readable checkpoint or --save-model file at {tmp_path}/nothing (FileNotFoundError)" in result.stderr


def test_checkpoint_restores_a_wrapped_ring_buffer_agent_and_task(qsm, tmp_path):
    """One checkpoint file holds everything: the buffer's filled rows in ring order, the networks, the task's state."""
    args = qsm.Args(env_id="cartpole-balance", critic_hidden_dims=(16,), actor_hidden_dims=(16,), cuda=False)

    def fresh(seed):
        torch.manual_seed(seed)
        env = qsm.DMCEnv(args.env_id, seed)
        env.reset()
        return qsm.build_agent(env.obs_dim, env.action_dim, args, "cpu"), qsm.ReplayBuffer(10, 5, 1), env

    agent, rb, env = fresh(0)
    for i in range(13):  # rows 0..9, then around the ring: 0, 1, 2
        rb.add(np.full(5, i, np.float32), np.full(1, i, np.float32), float(i), np.full(5, i + 1, np.float32), 1.0)
    env.step(np.ones(1))
    episode = (np.arange(5, dtype=np.float32), 1.5, 7, 2.5)
    qsm.save_atomic(str(tmp_path / "checkpoint.pt"), qsm.training_state(agent, args, rb, env, 13, episode))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert not list(tmp_path.glob("*.tmp"))

    restored_agent, restored_rb, restored_env = fresh(1)
    obs, *rest = qsm.restore(str(tmp_path / "checkpoint.pt"), state, restored_agent, args, restored_rb, restored_env)
    assert (restored_rb.added, restored_rb.pos, restored_rb.size) == (13, 3, 10)
    assert torch.equal(restored_rb.rows, rb.rows)
    assert restored_rb.gather(torch.arange(10)).rewards.tolist() == [10, 11, 12, 3, 4, 5, 6, 7, 8, 9]
    assert np.array_equal(obs, episode[0]) and rest == [1.5, 7, 2.5]
    for module in ("critic", "critic_target", "denoiser"):
        for p, q in zip(getattr(agent, module).parameters(), getattr(restored_agent, module).parameters(), strict=True):
            assert torch.equal(p, q)
    step, restored_step = env.step(np.full(1, -0.5)), restored_env.step(np.full(1, -0.5))
    assert np.array_equal(step[0], restored_step[0]) and step[1:] == restored_step[1:]


def test_track_without_network_falls_back_to_offline(tmp_path):
    env = {"WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    old = {key: os.environ.get(key) for key in [*env, "WANDB_MODE", "WANDB_API_KEY"]}
    os.environ.update(env)
    os.environ.pop("WANDB_MODE", None), os.environ.pop("WANDB_API_KEY", None)
    try:
        result = run_script([*BASE, "--total-timesteps", "450", "--track"], tmp_path, timeout=300)
    finally:
        for key, value in old.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wandb: no network; logging offline to ./wandb (to upload: wandb sync --sync-all)" in result.stderr
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_a_checkpoint_with_a_flag_removed_since_still_loads(qsm, tmp_path):
    """Files saved before a flag was removed (the no-op --torch-deterministic) load with today's Args."""
    state = {"args": vars(qsm.Args(env_id="walker-walk", cuda=False)) | {"torch_deterministic": True}}
    torch.save(state, tmp_path / "old.pt")
    file, loaded = qsm.load_checkpoint(str(tmp_path / "old.pt"), "--evaluate-model")
    assert file == str(tmp_path / "old.pt") and loaded["args"].env_id == "walker-walk"
