"""The script as a user runs it: end to end in a subprocess, seeding, bad input and --help."""

import math

import events
import pytest
import torch
from helpers import SCRIPT, SMALL, only_run_dir, read_scalars, run_script


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """cheetah-run for 2,000 steps, updates from step 500 on, two evaluations, then --save-model."""
    cwd = tmp_path_factory.mktemp("e2e")
    args = ["--env-id", "cheetah-run", "--total-timesteps", "2000", "--learning-starts", "500"]
    args += ["--eval-interval", "1000", "--eval-episodes", "2", "--save-model", *SMALL]
    result = run_script(args, cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(cwd)
    return result, run_dir, read_scalars(run_dir)


@pytest.mark.slow  # a subprocess
def test_end_to_end_logs_finite_losses_and_eval_returns(trained):
    _, _, scalars = trained
    for tag in ["losses/qf1_loss", "losses/qf2_loss", "losses/qf1_values", "losses/actor_loss", "losses/q_grad_norm"]:
        steps = [step for step, _ in scalars[tag]]
        assert steps[0] >= 500 and len(steps) == 15, (tag, steps)  # every 100 steps of the learning phase
        assert all(math.isfinite(v) for _, v in scalars[tag]), tag
    qf1 = [v for _, v in scalars["losses/qf1_loss"]]
    assert len(set(qf1)) > 1  # the critic loss changes: updates happen
    assert [step for step, _ in scalars["eval/episodic_return"]] == [1000, 2000]
    first, second = (v for _, v in scalars["eval/episodic_return"])  # the same eval seeds: only the policy changed
    assert math.isfinite(first) and first != second  # a stale or fixed policy would score the same twice
    assert [step for step, _ in scalars["charts/episodic_return"]] == [999, 1999]
    assert all(v == 1000 for _, v in scalars["charts/episodic_length"])
    assert all(0 <= v <= 1 for _, v in scalars["charts/action_saturation"])
    lrs = [v for _, v in scalars["charts/actor_lr"]]
    assert lrs[0] <= 3e-4 * (1 + 1e-6) and lrs == sorted(lrs, reverse=True) and lrs[-1] < lrs[0]  # cosine decay
    assert len(scalars["charts/SPS"]) == 14 and all(v > 0 for _, v in scalars["charts/SPS"])


@pytest.mark.slow  # a subprocess
def test_eval_logs_the_action_distribution_at_a_fixed_state(trained):
    _, run_dir, _ = trained
    acc = events.load_run(run_dir)
    assert sorted(acc.Tags()["histograms"]) == [f"eval/action_dim_{i}" for i in range(6)]  # cheetah: 6 actions
    for event in acc.Histograms("eval/action_dim_0"):
        assert event.histogram_value.num == 1000
        assert -1 <= event.histogram_value.min <= event.histogram_value.max <= 1
    assert [event.step for event in acc.Histograms("eval/action_dim_0")] == [1000, 2000]


@pytest.mark.slow  # a subprocess
def test_saved_model_loads_and_acts(trained, qsm):
    result, run_dir, _ = trained
    path = run_dir / "qsm_continuous.pt"
    assert f"model saved to runs/{run_dir.name}/qsm_continuous.pt" in result.stdout
    assert not list(run_dir.glob("*.tmp"))
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["args"]["env_id"] == "cheetah-run" and ckpt["global_step"] == 2000
    # exactly one critic step and one score step per environment step after learning_starts
    assert ckpt["critic_optimizer"]["state"][0]["step"] == 1500
    assert ckpt["actor_optimizer"]["state"][0]["step"] == 1500
    den = qsm.Denoiser(17, 6, (64, 64), 5)
    den.load_state_dict(ckpt["denoiser"])
    critic = qsm.TwinCritic(17, 6, (64, 64))
    critic.load_state_dict(ckpt["critic"])
    obs = torch.as_tensor(qsm.DMCEnv("cheetah-run", seed=0).reset()).unsqueeze(0)
    action = qsm.ddpm_sample(den, qsm.DiffusionSchedule("vp", 5), obs)
    assert action.shape == (1, 6) and action.abs().max() <= 1
    assert torch.isfinite(critic(obs, action)).all()


@pytest.mark.slow  # a subprocess
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_compile_and_cudagraphs_end_to_end(tmp_path):
    """The fastest GPU path as a user runs it: every update after the warm-up replayed from a graph, and counted."""
    args = ["--env-id", "cheetah-run", "--total-timesteps", "1500", "--learning-starts", "500", "--cuda"]
    args += ["--compile", "--cudagraphs", "--eval-interval", "1000", "--eval-episodes", "2", "--save-model", *SMALL]
    result = run_script(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    scalars = read_scalars(run_dir)
    qf1 = [v for _, v in scalars["losses/qf1_loss"]]
    assert len(qf1) == 10 and all(math.isfinite(v) for v in qf1) and len(set(qf1)) > 1
    assert [step for step, _ in scalars["eval/episodic_return"]] == [1000, 1500]
    ckpt = torch.load(next(run_dir.glob("*.pt")), weights_only=True)
    assert ckpt["critic_optimizer"]["state"][0]["step"] == 1000  # one real update per step, replays included
    assert ckpt["actor_optimizer"]["state"][0]["step"] == 1000
    lrs = [v for _, v in scalars["charts/actor_lr"]]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < lrs[0]


@pytest.mark.slow  # subprocesses
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_recommended_mode_resumes_under_cudagraphs(tmp_path):
    """The README's GPU mode, --compile --cudagraphs --bf16, with --best-of-n 4 inside the acting graph: cut at its
    checkpoint and resumed in a new process, the run trains on to its last step, one real update per step."""
    args = ["--env-id", "cheetah-run", "--learning-starts", "500", "--eval-interval", "1000", "--eval-episodes", "2"]
    args += ["--cuda", "--compile", "--cudagraphs", "--bf16", "--best-of-n", "4", "--checkpoint-interval", "1000"]
    first = run_script([*args, *SMALL, "--total-timesteps", "2000"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    resumed = run_script(["--resume", str(run_dir), "--cuda", "--total-timesteps", "3000"], tmp_path)
    assert resumed.returncode == 0 and f"resumed {run_dir} at step 2000" in resumed.stderr, resumed.stderr[-3000:]
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert state["global_step"] == 3000 and state["args"]["cudagraphs"] and state["args"]["bf16"]
    assert state["critic_optimizer"]["state"][0]["step"] == 2500 == state["actor_optimizer"]["state"][0]["step"]
    assert [step for step, _ in read_scalars(run_dir)["eval/episodic_return"]] == [1000, 2000, 3000]


def _loss_curves(cwd, seed, extra=()):
    args = ["--env-id", "cartpole-swingup", "--total-timesteps", "1000", "--learning-starts", "500", "--seed", seed]
    args += ["--eval-interval", "1000", "--eval-episodes", "1", *SMALL, *extra]
    result = run_script(args, cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    scalars = read_scalars(only_run_dir(cwd))
    return {tag: values for tag, values in scalars.items() if tag != "charts/SPS"}  # SPS is wall time


@pytest.mark.slow  # a subprocess
def test_same_seed_logs_identical_values(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "c").mkdir()
    first = _loss_curves(tmp_path / "a", "3")
    second = _loss_curves(tmp_path / "b", "3")
    other = _loss_curves(tmp_path / "c", "4")
    assert "losses/qf1_loss" in first and "eval/episodic_return" in first
    assert first == second
    assert first["losses/qf1_loss"] != other["losses/qf1_loss"]


@pytest.mark.slow  # a subprocess
def test_variants_train_save_and_evaluate_end_to_end(tmp_path):
    """Every opt-in variant at once: real updates, finite losses (3 critics), evaluations, --evaluate-model."""
    variants = ["--score-target", "denoising", "--normalize-q-grad", "--sampler-clip", "x0_hat", "--best-of-n", "4"]
    variants += ["--num-q", "3"]
    curves = _loss_curves(tmp_path, "1", [*variants, "--save-model"])
    assert len(set(v for _, v in curves["losses/actor_loss"])) > 1 and "losses/qf3_loss" in curves
    assert all(math.isfinite(v) for tag in curves for _, v in curves[tag])
    assert [step for step, _ in curves["eval/episodic_return"]] == [1000]
    model = only_run_dir(tmp_path) / "qsm_continuous.pt"
    result = run_script(["--evaluate-model", str(model), "--eval-episodes", "1"], tmp_path, timeout=300)
    assert result.returncode == 0 and "cartpole-swingup: eval return" in result.stdout, result.stderr[-3000:]


@pytest.mark.slow  # a subprocess
def test_utd_ratio_performs_that_many_updates(tmp_path):
    args = ["--env-id", "cartpole-balance", "--total-timesteps", "700", "--learning-starts", "600", "--utd-ratio", "3"]
    result = run_script([*args, "--eval-interval", "100000", "--save-model", *SMALL], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    assert [step for step, _ in read_scalars(run_dir)["eval/episodic_return"]] == [700]  # the final evaluation
    ckpt = torch.load(next(run_dir.glob("*.pt")), weights_only=True)
    assert ckpt["critic_optimizer"]["state"][0]["step"] == 300
    assert ckpt["actor_optimizer"]["state"][0]["step"] == 300


@pytest.mark.slow  # a subprocess
def test_action_repeat_counts_environment_steps(tmp_path):
    args = ["--env-id", "cartpole-balance", "--total-timesteps", "2000", "--learning-starts", "1800"]
    args += ["--action-repeat", "4", "--eval-interval", "1000", "--eval-episodes", "1", *SMALL]
    result = run_script(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    scalars = read_scalars(only_run_dir(tmp_path))
    assert [step for step, _ in scalars["charts/episodic_length"]] == [996, 1996]
    assert all(v == 1000 for _, v in scalars["charts/episodic_length"])
    assert [step for step, _ in scalars["eval/episodic_return"]] == [1000, 2000]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--env-id", "cheetah_run"],
            "--env-id 'cheetah_run' is neither a dm_control task nor a Gymnasium MuJoCo task; "
            "did you mean 'cheetah-run'?",
        ),
        (["--T", "0"], "--T must be positive, got 0"),
        (["--batch-size", "512", "--buffer-size", "100"], "--batch-size 512 exceeds --buffer-size 100"),
        (["--M-q", "-1"], "--M-q must be positive, got -1.0"),
        (["--critic-hidden-dims"], "--critic-hidden-dims needs one or more positive sizes"),
        (["--no-cuda", "--cudagraphs"], "--cudagraphs needs a CUDA device (--cuda); on the CPU, run with --no-"),
        (["--seed", "-1"], "--seed must be in [0, 2^32 - 20000), got -1"),
        (["--seed", "4294967290"], "--seed must be in [0, 2^32 - 20000), got 4294967290"),
        (["--exploration-noise", "nan"], "--exploration-noise must be finite, got nan"),
        (["--gamma", "1.5"], "--gamma must be in [0, 1], got 1.5"),
        (["--critic-lr", "inf"], "--critic-lr must be finite, got inf"),
        (["--num-q", "0"], "--num-q must be positive, got 0"),
        (["--best-of-n", "0"], "--best-of-n must be positive, got 0"),
        (
            ["--learning-starts", "1000", "--total-timesteps", "1000"],
            "--learning-starts 1000 is not below --total-time",
        ),
    ],
)
def test_bad_input_is_named_in_one_line(qsm, args, expected):
    """check_args, which the script calls before anything starts: the first problem, one line naming the flag."""
    import tyro

    problem = qsm.check_args(tyro.cli(qsm.Args, args=args))
    assert problem.startswith(expected) and "\n" not in problem, problem


def test_compile_without_a_compiler_names_the_flag_to_pass(qsm, monkeypatch):
    """--compile on the CPU (typed, or from a checkpoint) where inductor finds no C++ compiler for its kernels."""
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    problem = qsm.check_args(qsm.Args(compile=True, cuda=False))
    assert (
        problem == "--compile on the CPU needs a C++ compiler (/nonexistent/g++); install one or run with --no-compile"
    )
    assert qsm.check_args(qsm.Args(compile=False, cuda=False)) is None


def test_cuda_request_without_cuda(qsm):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert qsm.check_args(qsm.Args(cuda=True)).startswith("--cuda was given but torch sees no CUDA")


@pytest.mark.slow  # a subprocess
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--env-id", "cheetah_run"],
            "--env-id 'cheetah_run' is neither a dm_control task nor a Gymnasium MuJoCo task; "
            "did you mean 'cheetah-run'?",
        ),
        (["--buffer-size", "1000000000000"], "--buffer-size 1000000000000: the replay buffer needs 156462.2 GiB"),
        (  # a run that could make no update is refused, not trained as the random policy
            ["--learning-starts", "5000", "--total-timesteps", "2000"],
            "--learning-starts 5000 is not below --total-timesteps 2000: the run would make no update",
        ),
    ],
)
def test_bad_input_exits_2_in_one_line_before_anything_starts(tmp_path, args, expected):
    """The script as a user runs it: check_args' line (or, for memory, the buffer's own) on stderr, exit 2, and no
    run directory."""
    result = run_script(args, tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {expected}")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing was started


@pytest.mark.parametrize(
    ("flag", "value", "choices"),
    [
        ("--score-target", "Paper", "paper, denoising"),
        ("--sampler-clip", "X_T", "x_t, x0_hat, final"),
        ("--beta-schedule", "sigmoid", "vp, cosine, linear"),
    ],
)
def test_a_choice_outside_its_literal_is_refused_by_tyro(qsm, capsys, flag, value, choices):
    """The choices are Literal types: tyro refuses any other value (a wrong case too) in its own error box, listing
    them, before anything starts (exit 2)."""
    import tyro

    with pytest.raises(SystemExit) as exit_:
        tyro.cli(qsm.Args, args=[flag, value])
    assert exit_.value.code == 2
    text = " ".join(capsys.readouterr().err.replace("│", " ").split())  # the box's text, unwrapped
    assert f"invalid choice '{value}' for argument '{flag}'" in text
    assert all(f"'{choice}'" in text for choice in choices.split(", "))


@pytest.mark.slow  # a subprocess
def test_help_documents_every_flag(qsm, tmp_path):
    import dataclasses

    result = run_script(["--help"], tmp_path, timeout=120)
    assert result.returncode == 0
    for field in dataclasses.fields(qsm.Args):
        assert f"--{field.name.replace('_', '-')}" in result.stdout, field.name
    assert "the QSM scale alpha" in result.stdout and "diffusion steps" in result.stdout


@pytest.mark.slow  # subprocesses
def test_capture_video_resumes_and_evaluates_a_saved_model(egl, tmp_path):
    """Only the first run names --capture-video (MUJOCO_GL=egl); the resume takes it from the checkpoint and the
    evaluation from its flag, both started with MUJOCO_GL=disable: the script restarts itself with EGL."""
    args = ["--env-id", "cartpole-swingup", "--total-timesteps", "400", "--learning-starts", "300", "--action-repeat"]
    args += ["4", "--eval-interval", "400", "--eval-episodes", "1", "--capture-video", *SMALL]  # 250 frames, on CPU
    first = run_script(args, tmp_path, gl="egl")
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    resumed = run_script(["--resume", str(run_dir), "--total-timesteps", "800", "--save-model"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stderr and "step 800: eval return" in resumed.stdout
    videos = tmp_path / "videos" / run_dir.name
    for name in ("step_400.mp4", "step_800.mp4"):  # step 800's: by the resumed run
        data = (videos / name).read_bytes()
        assert data[4:8] == b"ftyp" and len(data) > 10_000  # an MP4 of a 250-frame episode
    model = run_dir / "qsm_continuous.pt"
    evaluated = run_script(["--evaluate-model", str(model), "--eval-episodes", "2", "--capture-video"], tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert evaluated.stdout.startswith("cartpole-swingup: eval return") and "over 2 episodes" in evaluated.stdout
    assert (videos / "evaluate.mp4").read_bytes()[4:8] == b"ftyp"
    assert not list((tmp_path / "runs").glob("*/events*2"))  # evaluating trains nothing and logs nothing
    assert len(list((tmp_path / "runs").iterdir())) == 1


@pytest.mark.slow  # a subprocess
def test_a_renderer_that_cannot_load_is_one_line(tmp_path):
    """MUJOCO_GL naming a renderer this machine lacks (here one that exists nowhere) ends before anything starts."""
    result = run_script(["--capture-video"], tmp_path, timeout=120, gl="no-such-renderer")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-3000:]
    assert result.stderr.startswith("error: MuJoCo cannot load the renderer MUJOCO_GL=no-such-renderer (RuntimeError)")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # a subprocess
def test_evaluate_model_rejects_a_non_model(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    result = run_script(["--evaluate-model", str(tmp_path / "junk.pt")], tmp_path, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith(
        f"error: --evaluate-model {tmp_path}/junk.pt: no readable checkpoint or --save-model file at {tmp_path}/junk.pt"
    )
    assert result.stderr.count("\n") == 1


def test_no_function_reads_a_name_that_only_the_main_block_defines():
    """Every global name a function or method reads is defined outside `if __name__ == "__main__":` (a builtin, an
    import, a def or an assignment), so importing the module and calling its functions works as running it does."""
    import builtins
    import symtable

    source = SCRIPT.read_text().split('\nif __name__ == "__main__":')[0]
    module = symtable.symtable(source, str(SCRIPT), "exec")
    defined = {s.get_name() for s in module.get_symbols() if s.is_assigned() or s.is_imported()}

    def functions(table):
        for child in table.get_children():
            if child.get_type() == "function":  # a str, or a StrEnum from Python 3.13 on
                yield child
            yield from functions(child)

    missing = {(f.get_name(), name) for f in functions(module) for name in f.get_globals()}
    defined |= {"__file__"}  # every module loaded from a file has it, imported or run
    missing = {(f, name) for f, name in missing if name not in defined and not hasattr(builtins, name)}
    assert not missing, missing
