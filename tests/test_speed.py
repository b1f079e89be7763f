"""bash benchmark.sh speed (benchmarks/speed.py): bad input, a real short timing, and its ratio columns."""

import re

import pytest
from helpers import ROOT, bench


@pytest.mark.slow  # a subprocess
@pytest.mark.parametrize(
    "args, message",
    [
        (["--modes", "fast"], "--modes 'fast' is unknown"),
        (["--modes", "compile+cudagraphs"], "needs --cuda"),
        (["--steps", "100"], "--steps must be at least 500"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--env-ids", "cheetah-walk"], "valid ids: acrobot-swingup"),
        (["--scripts", "nowhere.py"], "--scripts 'nowhere.py': no such file"),
    ],
)
def test_speed_bad_input_is_one_line(args, message):
    result = bench("speed", *args, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1  # bad input: argparse's status, one line
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


@pytest.mark.slow  # a subprocess
def test_speed_table_from_a_real_short_run():
    """The speed subcommand trains the real script and times the pieces, here twice (--repeats 2): one row of medians,
    every figure positive, the range of the two training runs' steps/s. Small networks (a mode of flags): the
    mechanics, not the paper's sizes, are under test."""
    mode = "critic-hidden-dims=64+actor-hidden-dims=64"
    result = bench(
        "speed", "--env-ids", "cartpole-balance", "--modes", mode, "--steps", "500", "--repeats", "2", timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"round 1/2: qsm_continuous.py cartpole-balance {mode}" in result.stderr
    assert f"round 2/2: qsm_continuous.py cartpole-balance {mode}" in result.stderr
    assert f"| vs {mode} |" in result.stdout and "the median of 2 rounds" in result.stdout
    (row,) = [line for line in result.stdout.splitlines() if f"| cartpole-balance | {mode} |" in line]
    assert row.startswith("| qsm_continuous.py |")
    cells = [cell.strip() for cell in row.strip("|").split("|")[3:]]
    train, low, high = (float(x) for x in re.fullmatch(r"([\d.]+) \(([\d.]+)-([\d.]+)\)", cells[0]).groups())
    assert 0 < low <= train <= high, row
    assert len(cells) == 6 and all(float(x) > 0 for x in cells[1:5]), row  # (the ratio columns: the test below)


def test_speed_ratios_are_medians_of_same_round_ratios(capsys):
    """Each ratio column divides a row's training steps/s by its reference's in the same round, then takes the median
    over rounds: a round where the machine ran slow for everything cancels out."""
    import speed

    opts = speed.parse(
        [
            "--env-ids",
            "cheetah-run",
            "--modes",
            "eager",
            "compile",
            "--repeats",
            "3",
            "--scripts",
            str(ROOT / "qsm_continuous.py"),
            str(ROOT / "benchmark.sh"),
        ]
    )
    old, new = opts.scripts[0], opts.scripts[1]
    per_round = {
        (old, "eager"): [10, 20, 10],
        (old, "compile"): [12, 24, 13],
        (new, "eager"): [11, 19, 10],
        (new, "compile"): [13, 25, 12],
    }
    runs = {(s, "cheetah-run", m): [(v, 1.0, 1.0, 1.0, 1.0) for v in values] for (s, m), values in per_round.items()}
    speed.print_table(runs, opts, {old: "old.py", new: "new.py"})
    lines = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith(("| old", "| new"))]
    rows = {tuple(c.strip() for c in cells[1:4]): [c.strip() for c in cells[4:-1]] for cells in lines}
    assert rows["old.py", "cheetah-run", "compile"][0] == "13.0 (12.0-24.0)"
    assert rows["old.py", "cheetah-run", "compile"][-2:] == ["1.20x", "1.00x"]  # vs eager: 1.2, 1.2, 1.3
    assert rows["new.py", "cheetah-run", "eager"][-2:] == ["1.00x", "1.00x"]  # vs old: 1.1, 0.95, 1.0
    assert rows["new.py", "cheetah-run", "compile"][-2:] == ["1.20x", "1.04x"]  # 1.18, 1.32, 1.2; 1.08, 1.04, 0.92
