"""Reports and plots of a grid or a study, from its runs (events.py) and their statistics (stats.py).

summarize(DIR): DIR/runs/* -> DIR/results.md, results.csv, curves.csv, probes.csv, curves.png and actions_{run}.png
(per task the eval return over seeds at each evaluation and at the last step every seed reached, SAC at the same step,
the aggregate IQM, the probe state's share near the bounds and its modes; reruns in DIR/rerun/runs/ against their
originals). summarize_study(DIR): DIR/VARIANT/runs/* -> DIR/study.md, study.csv, study_curves.png and
DIR/VARIANT/actions_{run}.png, one row per variant and task, each variant named by the flags its runs recorded (or by
DIR/VARIANT/flags.txt, in today's terms, where the script changed since its runs).
"""

import ast
import csv
import glob
import itertools
import math
import os
import statistics
import sys

import events
import numpy as np
import stats
from stats import MODE_BANDWIDTH, MODE_PROMINENCE, NEAR_BOUND

# SAC at equal steps: the eval return of seeds 1, 2, 3 every 100k environment steps in TD-MPC2's published
# results/sac/{task}.csv (github.com/nicklashansen/tdmpc2): at 0 and 100k, and to 1M for the tasks of the 1M runs.
SAC = {
    "cheetah-run": {
        0: (0.1, 0.1, 0.1),
        100_000: (362.4, 236.9, 331.1),
        200_000: (573.9, 573.5, 573.6),
        300_000: (644.9, 635.6, 562.9),
        400_000: (697.0, 641.9, 617.5),
        500_000: (716.1, 671.0, 396.5),
        600_000: (700.4, 603.6, 31.9),
        700_000: (723.2, 663.3, 679.1),
        800_000: (592.7, 685.3, 687.3),
        900_000: (734.0, 731.6, 6.4),
        1_000_000: (733.7, 727.5, 729.1),
    },
    "walker-walk": {0: (21.9, 21.7, 18.6), 100_000: (917.8, 509.6, 697.1)},
    "walker-run": {0: (21.4, 21.2, 18.2), 100_000: (367.8, 355.7, 295.2)},
    "quadruped-walk": {0: (51.5, 209.6, 198.4), 100_000: (59.6, 19.6, 86.5)},
    "hopper-hop": {
        0: (0.1, 0.0, 0.0),
        100_000: (0.0, 0.0, 0.0),
        200_000: (0.0, 0.0, 0.0),
        300_000: (26.2, 0.6, 0.0),
        400_000: (44.8, 2.0, 0.0),
        500_000: (46.5, 65.6, 0.4),
        600_000: (0.0, 117.2, 0.0),
        700_000: (0.0, 175.6, 0.0),
        800_000: (0.0, 189.5, 0.0),
        900_000: (0.0, 188.0, 0.0),
        1_000_000: (0.0, 211.5, 0.0),
    },
    "humanoid-walk": {0: (0.9, 0.8, 0.8), 100_000: (0.9, 1.4, 1.0)},
    "pendulum-swingup": {0: (0.0, 0.0, 1.5), 100_000: (0.0, 100.0, 188.1)},  # issue 31's check (docs/pendulum)
    # Gymnasium's tasks: the 10 seeds of Tianshou's MuJoCo benchmark (github.com/thu-ml/tianshou at 39acf20,
    # examples/mujoco/benchmark/{task}-v3/sac/test_rew_10seeds.csv; 10 episodes an evaluation) at 0, 50k and 100k.
    "HalfCheetah-v5": {
        0: (-1.1, -1.5, -2.7, -3.5, -1.2, -2.3, -1.3, -2.0, -2.1, -2.5),
        50_000: (4800.5, 4863.5, 4642.2, 4911.8, 4477.1, 5449.6, 4271.5, 4848.5, 4985.8, 4221.8),
        100_000: (5628.6, 7288.5, 6417.8, 6397.9, 6371.8, 7151.6, 7201.4, 6062.1, 6477.3, 6149.3),
    },
    "Hopper-v5": {
        0: (17.9, 21.6, 56.9, 12.3, 15.7, 95.4, 12.2, 67.4, 56.1, 119.1),
        50_000: (744.8, 383.6, 1300.2, 601.2, 494.5, 1008.8, 1460.4, 893.2, 1240.1, 385.0),
        100_000: (2989.4, 420.4, 3206.6, 901.0, 2967.4, 3429.8, 3061.8, 3018.7, 3132.4, 3007.1),
    },
    "Walker2d-v5": {
        0: (7.8, 3.4, -5.9, -4.9, 3.9, 41.2, 3.3, 7.5, 11.2, -3.1),
        50_000: (744.8, 412.2, 425.1, 403.2, 859.6, 443.8, 1827.6, 525.0, 840.5, 471.9),
        100_000: (518.8, 509.8, 612.0, 1573.4, 2684.0, 850.1, 1436.2, 2595.5, 1715.3, 557.2),
    },
}
# Whose SAC each task's is, where not TD-MPC2's (the curves' legend; GYM_SOURCES says what Tianshou ran).
SAC_SOURCE = dict.fromkeys(("HalfCheetah-v5", "Hopper-v5", "Walker2d-v5"), "Tianshou, v3 tasks")
# The best published eval return at 100k and at 1M, from the methods' own result files (README; docs/horizon.md).
BEST = {
    "cheetah-run": {100_000: "648 (MR.Q)", 1_000_000: "920 (SimbaV2)"},
    "walker-walk": {100_000: "967 (BRO)", 1_000_000: "980 (TD-MPC2)"},
    "walker-run": {100_000: "723 (TD-MPC2)", 1_000_000: "849 (DIME)"},
    "quadruped-walk": {100_000: "906 (SimbaV2)", 1_000_000: "966 (SimbaV2)"},
    "hopper-hop": {100_000: "176 (SimbaV2)", 1_000_000: "445 (BRO)"},
    "humanoid-walk": {100_000: "34 (SimbaV2)", 1_000_000: "909 (BRO)"},
}
# TD3 at 500k and 1M: the mean over 8 seeds of a public Spinning Up benchmark on DMC (action repeat 1; the curves).
TD3 = {
    "cheetah-run": {500_000: 542, 1_000_000: 596},
    "walker-run": {500_000: 486, 1_000_000: 531},
    "quadruped-walk": {500_000: 361, 1_000_000: 362},
    "hopper-hop": {500_000: 15, 1_000_000: 17},
    "finger-spin": {500_000: 766, 1_000_000: 784},
}
SOURCES = "SAC: TD-MPC2's published result files (3 seeds); best published: the methods' own result files"
TD3_SOURCE = "TD3 (the curves): a public Spinning Up benchmark on DMC (the mean of 8 seeds, action repeat 1)"
GYM_SOURCES = (
    "SAC on Gymnasium's tasks: Tianshou's MuJoCo benchmark (10 seeds, 10 episodes an evaluation), run on gym 0.17.3's "
    "v3 tasks: v5's models and rewards but for Walker2d-v5's right foot (friction 0.9 -> 1.9, the left's) and v5's "
    "healthy reward of Hopper and Walker2d, no longer paid on the step that ends an episode"
)
# At the study's step counts (the saturation issue): SAC at 100k (TD-MPC2's files), the best published at 100k/30k.
EARLY_REFERENCES = {
    "cheetah-run": {"SAC @100k": 310, "MR.Q @100k": 648},
    "walker-walk": {"SAC @100k": 708, "BRO @100k": 967},
    "cartpole-swingup": {"MR.Q/BRO @25-30k": 414},
}


def fail(message):
    """Bad input to a benchmark.sh subcommand: one line on stderr and exit 2, as the script's own."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def summarize(out):
    """DIR/runs/*: per task the eval return over seeds at each evaluation and at the last step every seed reached,
    SAC at the same step, the IQM over the tasks with 3+ seeds, and the probe state's share near +-1 and modes."""
    runs, probes, machines = {}, [], {}
    for run_dir, env_id, seed in events.run_dirs(out):
        acc = events.load_run(run_dir)
        machines.setdefault(env_id, set()).add(events.machine(acc))
        evals, sps = dict(events.scalar(acc, "eval/episodic_return")), events.scalar(acc, "charts/SPS")
        if not evals:
            continue
        step, points = events.probe(acc)
        shares, modes = [stats.near_bounds(*p) for p in points], [stats.count_modes(*p) for p in points]
        runs.setdefault(env_id, {})[seed] = (evals, [v for _, v in sps], shares, modes)
        probes += [
            {"env_id": env_id, "seed": seed, "step": step, "action_dim": dim, "near_bounds": share, "modes": n}
            for dim, (share, n) in enumerate(zip(shares, modes, strict=True))
        ]
        plot_actions(out, run_dir, acc)
    if not runs:
        fail(f"no runs with evaluations under {out}/runs/")
    rows, curves = [], []
    for env_id, seeds in sorted(runs.items()):
        steps, finals = stats.last_common_step([evals for evals, *_ in seeds.values()])
        common = stats.common_steps(evals for evals, *_ in seeds.values())
        for step in common:
            mean, std = stats.mean_std([evals[step] for evals, *_ in seeds.values()])
            curves.append({"env_id": env_id, "step": step, "seeds": len(seeds), "mean": mean, "std": std})
        sac = SAC.get(env_id, {}).get(steps)
        modes = [n for *_, ms in seeds.values() for n in ms]
        final_mean, final_std = stats.mean_std(finals)
        sac_mean, sac_std = stats.mean_std(sac) if sac else (math.nan, math.nan)
        rows.append(
            {
                "env_id": env_id,
                "seeds": " ".join(map(str, sorted(seeds))),
                "steps": steps,
                "final_mean": final_mean,
                "final_std": final_std,
                "sac_mean": sac_mean,
                "sac_std": sac_std,
                "best_published": BEST.get(env_id, {}).get(steps, "-"),
                "near_bounds": statistics.fmean(s for *_, shares, _ in seeds.values() for s in shares or [math.nan]),
                "modes_mean": statistics.fmean(modes) if modes else math.nan,
                "multimodal": sum(n > 1 for n in modes) / len(modes) if modes else math.nan,
                "sps": stats.median_sps([sps for _, sps, *_ in seeds.values()]),
            }
        )
    write_csv(os.path.join(out, "results.csv"), rows)
    write_csv(os.path.join(out, "curves.csv"), curves)
    if probes:
        write_csv(os.path.join(out, "probes.csv"), probes)
    labelled = any(m != "?" for ms in machines.values() for m in ms)  # runs that recorded their cores and threads
    lines = [
        "| task | seeds | steps | QSM eval return | SAC, same step | best published, same step | probe: near ±1 | "
        f"probe: modes per action | components with 2+ modes | train steps/s{' (cores x threads)' * labelled} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sac = f"{r['sac_mean']:.0f} ± {r['sac_std']:.0f}" if not math.isnan(r["sac_mean"]) else "-"
        known = sorted(machines[r["env_id"]] - {"?"})  # cores x threads, where the runs recorded them
        sps = f"{r['sps']:.1f}" + (f" ({' '.join(known)})" if known else "")
        lines.append(
            f"| {r['env_id']} | {r['seeds']} | {r['steps']} | {r['final_mean']:.1f} ± {r['final_std']:.1f} | "
            f"{sac} | {r['best_published']} | {r['near_bounds']:.0%} | {r['modes_mean']:.2f} | "
            f"{r['multimodal']:.0%} | {sps} |"
        )
    lines += ["", aggregate_line(runs, rows), "", "Learning curves, mean ± std over seeds:", ""]
    steps = sorted({c["step"] for c in curves})
    lines += [
        "| task | " + " | ".join(f"{s // 1000}k" if s % 1000 == 0 else str(s) for s in steps) + " |",
        "|---|" + "---|" * len(steps),
    ]
    for env_id in sorted(runs):
        at = {c["step"]: f"{c['mean']:.0f} ± {c['std']:.0f}" for c in curves if c["env_id"] == env_id}
        lines.append(f"| {env_id} | " + " | ".join(at.get(s, "") for s in steps) + " |")
    references = [SOURCES] + [GYM_SOURCES] * bool(SAC_SOURCE.keys() & runs.keys())
    references += [TD3_SOURCE] * any(up_to_last_evaluation(TD3.get(e, {}), seeds) for e, seeds in runs.items())
    lines += [
        "",
        "Eval return: mean ± std (population) over seeds at the last step that every seed of the task "
        "reached (5 episodes per evaluation by default). Probe: 1,000 actions sampled at the task's fixed "
        f"initial state at each run's last evaluation; near ±1: within {NEAR_BOUND} of a bound; modes: local "
        f"maxima of a Gaussian kernel density estimate (bandwidth {MODE_BANDWIDTH}) with a prominence of at "
        f"least {MODE_PROMINENCE:.0%} of the highest, per action component, averaged over components and seeds.",
        f"References: {'; '.join(references)}.",
        "",
    ]
    lines += rerun_lines(out, runs)
    write_markdown(os.path.join(out, "results.md"), lines)
    plot(out, runs)
    print(*lines, f"wrote {out}/results.md, results.csv, curves.csv, probes.csv, curves.png, actions_*.png", sep="\n")


def aggregate_line(runs, rows):
    """The IQM of the normalised score (return / 1000) over the dm_control tasks with 3+ seeds, at their common last
    step, with its 95% confidence interval, and SAC's on the same tasks at the same step. rliable takes a (runs x
    tasks) matrix: each task gives as many seeds as the one with the fewest, its lowest-numbered; the line names any
    left out, Gymnasium's tasks too (their returns have no bound to divide by)."""
    final = {r["env_id"]: r["steps"] for r in rows}
    gym_tasks = [env_id for env_id in sorted(runs) if not bounded(env_id)]
    note = f" Left out of it: {', '.join(gym_tasks)} (Gymnasium's returns have no bound: return / 1000 means nothing)."
    note = note if gym_tasks else ""
    tasks = [env_id for env_id, seeds in sorted(runs.items()) if len(seeds) >= 3 and bounded(env_id)]
    if not tasks or len({final[env_id] for env_id in tasks}) > 1:
        return "Aggregate: needs a dm_control task with 3 or more seeds (every such task at the same last step)." + note
    step, n = final[tasks[0]], min(len(runs[env_id]) for env_id in tasks)
    used = {env_id: sorted(runs[env_id])[:n] for env_id in tasks}
    qsm = [[runs[env_id][used[env_id][i]][0][step] / 1000 for env_id in tasks] for i in range(n)]
    left_out = [f"{env_id} seed {seed}" for env_id in tasks for seed in sorted(runs[env_id])[n:]]
    line = f"Aggregate at step {step} over {', '.join(tasks)} ({n} seeds each"
    line += f"; left out: {', '.join(left_out)})" if left_out else ")"
    line += ": IQM of the normalised score (return / 1000) QSM {:.3f} [{:.3f}, {:.3f}]".format(*stats.iqm_ci(qsm))
    if all(step in SAC.get(env_id, {}) for env_id in tasks):
        sac = [[SAC[env_id][step][i] / 1000 for env_id in tasks] for i in range(3)]
        line += ", SAC (3 seeds each) {:.3f} [{:.3f}, {:.3f}]".format(*stats.iqm_ci(sac))
    return line + " (95% stratified-bootstrap confidence intervals, rliable)." + note


def bounded(env_id):
    """A dm_control task: its return lies in [0, 1000] (Gymnasium's have no bound)."""
    return env_id in events.script().DMC_IDS


def rerun_lines(out, runs):
    """DIR/rerun/runs/*: each rerun's curve gap to its original, against the gaps between every two of the task's
    seeds; within seed noise when it is no larger than the largest of them (a coarse test with 3 seeds)."""
    lines = []
    for run_dir, env_id, seed in events.run_dirs(os.path.join(out, "rerun")):
        evals, task = dict(events.scalar(events.load_run(run_dir), "eval/episodic_return")), runs.get(env_id, {})
        if seed not in task or len(task) < 2 or not evals:
            continue
        original, seeds = task[seed][0], [curve for curve, *_ in task.values()]
        gap, pairs = (
            stats.curve_gap(evals, original),
            [stats.curve_gap(a, b) for a, b in itertools.combinations(seeds, 2)],
        )
        last = max(set(evals) & set(original))
        lines.append(
            f"| {env_id} | {seed} | {last} | {evals[last]:.0f} | {original[last]:.0f} | {gap:.0f} | "
            f"{min(pairs):.0f}-{max(pairs):.0f} | {'yes' if gap <= max(pairs) else 'no'} |"
        )
    if not lines:
        return []
    return [
        "Reruns (rerun/runs/) against their originals: mean absolute gap between the eval curves, and between "
        "every two seeds of the task:",
        "",
        "| task | seed | last step | rerun | original | gap to the original | gaps between seeds | within |",
        "|---|---|---|---|---|---|---|---|",
        *lines,
        "",
    ]


def summarize_study(out):
    """DIR/VARIANT/runs/* for every variant: one table and one figure comparing the variants, task by task."""
    qsm = events.script()
    rows, curves, scripts, episodes = [], {}, {}, set()
    for variant_dir in sorted(d for d in glob.glob(os.path.join(out, "*")) if os.path.isdir(os.path.join(d, "runs"))):
        variant = os.path.basename(variant_dir)
        flags_file = os.path.join(variant_dir, "flags.txt")  # flags in today's terms, where the code changed since
        flags = open(flags_file).read().strip() if os.path.exists(flags_file) else None
        by_env = {}
        for run_dir, env_id, seed in events.run_dirs(variant_dir):
            acc = events.load_run(run_dir)
            flags = flags or events.recorded_flags(acc, qsm.Args, (*qsm.RUN_FIELDS, "env_id", "seed"))
            evals, sps = dict(events.scalar(acc, "eval/episodic_return")), events.scalar(acc, "charts/SPS")
            if not evals:
                continue
            saturation, points = events.scalar(acc, "charts/action_saturation"), events.probe(acc)[1]
            shares, modes = [stats.near_bounds(*p) for p in points], [stats.count_modes(*p) for p in points]
            name, text, digest = events.script_copy(run_dir)
            scripts.setdefault(variant, {})[digest] = (name, text)
            episodes.add(events.recorded_args(acc).get("eval_episodes", "?"))
            by_env.setdefault(env_id, []).append(
                (
                    seed,
                    evals,
                    [v for _, v in sps],
                    saturation[-1][1] if saturation else math.nan,
                    statistics.fmean(shares) if shares else math.nan,
                    modes,
                    events.machine(acc),
                )
            )
            plot_actions(variant_dir, run_dir, acc)
        for env_id, seeds in sorted(by_env.items()):
            steps, finals = stats.last_common_step([evals for _, evals, *_ in seeds])
            final_mean, final_std = stats.mean_std(finals)
            modes = [n for s in seeds for n in s[5]]
            rows.append(
                {
                    "variant": variant,
                    "env_id": env_id,
                    "seeds": " ".join(str(s[0]) for s in sorted(seeds)),
                    "steps": steps,
                    "final_mean": final_mean,
                    "final_std": final_std,
                    "saturation": statistics.fmean(s[3] for s in seeds),
                    "probe_saturation": statistics.fmean(s[4] for s in seeds),
                    "probe_modes": statistics.fmean(modes) if modes else math.nan,
                    "sps": stats.median_sps([s[2] for s in seeds]),
                    "machines": " ".join(sorted({s[6] for s in seeds})),
                    "flags": flags or "?",
                }
            )
            curves.setdefault(env_id, {})[variant] = [sorted(evals.items()) for _, evals, *_ in seeds]
    if not rows:
        fail(f"no runs with evaluations under {out}/*/runs/")
    write_csv(os.path.join(out, "study.csv"), rows)
    lines = [
        "| task | variant | seeds | steps | eval return | saturation (training) | probe state: near +-1 | "
        "probe: modes per action | train steps/s (cores x threads) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["env_id"], r["variant"])):
        returns = f"{r['final_mean']:.1f} ± {r['final_std']:.1f}"
        lines.append(
            f"| {r['env_id']} | {r['variant']} | {r['seeds']} | {r['steps']} | {returns} | "
            f"{r['saturation']:.0%} | {r['probe_saturation']:.0%} | {r['probe_modes']:.2f} | "
            f"{r['sps']:.1f} ({r['machines']}) |"
        )
    lines += [
        "",
        f"Eval return: mean ± std over seeds at the last step all seeds reached ({', '.join(sorted(episodes))} "
        "episodes each, as the runs recorded).",
        "Saturation (training): the share of action components at exactly -1 or +1 in the TD target's samples "
        f"at the last logged step. Probe state: the share within {NEAR_BOUND} of +-1 "
        "of 1,000 samples at the task's fixed initial state (the paper's Figure 4) at the last evaluation; "
        "modes per action component as in the results summary, averaged over components and seeds.",
        "",
    ]
    for env_id, variants in sorted(curves.items()):  # the variants at equal steps: those every seed reached
        common = {v: stats.common_steps(dict(run) for run in runs) for v, runs in variants.items()}
        steps = sorted(set().union(*common.values()))
        lines += [
            f"{env_id}, eval return at equal steps, mean ± std over seeds:",
            "",
            "| variant | " + " | ".join(f"{s // 1000}k" if s % 1000 == 0 else str(s) for s in steps) + " |",
            "|---|" + "---|" * len(steps),
        ]
        for variant, runs in sorted(variants.items()):
            at = {s: "{:.0f} ± {:.0f}".format(*stats.mean_std([dict(run)[s] for run in runs])) for s in common[variant]}
            lines.append(f"| {variant} | " + " | ".join(at.get(s, "") for s in steps) + " |")
        lines.append("")
    lines += speed_note(rows)
    baseline = baseline_of(out, sorted(scripts))
    lines += improvement_lines(curves, baseline)
    lines += [f"What each variant ran (the baseline: {baseline}):", "", "| variant | script | flags |", "|---|---|---|"]
    flags_of = dict(sorted({(r["variant"], r["flags"]) for r in rows}))
    for variant, copies in sorted(scripts.items()):
        lines.append(f"| {variant} | {script_cell(copies, scripts[baseline])} | `{flags_of.get(variant, '?')}` |")
    lines.append("")
    write_markdown(os.path.join(out, "study.md"), lines)
    plot_study(out, curves)
    print(*lines, f"wrote {out}/study.md, study.csv, study_curves.png and {out}/*/actions_*.png", sep="\n")


def speed_note(rows):
    """How far the study's steps/s compare variants: each run's cores and threads, and a warning where they differ."""
    machines = {m for r in rows for m in r["machines"].split()}
    note = (
        "Train steps/s: the median over seeds, with each run's cores x threads (? for runs made before the record); "
        "it compares variants only where their runs had the same cores and threads and did not share them."
    )
    if len(machines) > 1:
        note += f" Here they differ ({', '.join(sorted(machines))}): the steps/s are not a difference of the variants."
    return [note, ""]


def baseline_of(out, variants):
    """The variant the others are compared with: the first of DIR/variants.txt (the grid's --variants order), else
    `paper`, else the first by name."""
    listed = os.path.join(out, "variants.txt")
    if os.path.exists(listed):
        with open(listed) as f:
            first = f.read().split()
        if first and first[0] in variants:
            return first[0]
    return "paper" if "paper" in variants else variants[0]


def improvement_lines(curves, baseline, min_seeds=3):
    """Per task and over tasks, each variant's probability of improvement over the baseline (rliable) with its
    interval, and the IQM difference, at the last step that every seed of both reached; why not, with fewer seeds.
    Over tasks: the dm_control tasks only, as the aggregate (return / 1000 means nothing on Gymnasium's)."""
    lines = [
        f"Probability of improvement over {baseline}: P(variant > baseline) for a seed of each drawn at random (ties "
        "half; 0.5: no difference), with its 95% stratified-bootstrap interval (rliable, 2,000 resamples); IQM "
        f"difference: the variant's interquartile mean of the eval return minus the baseline's. Needs {min_seeds}+ "
        "seeds per variant; over tasks: the dm_control tasks, each at its own equal step, return / 1000, the seeds "
        "each task has in common.",
        "",
        "| task | variant | step | seeds (variant, baseline) | P(variant > baseline) | IQM difference |",
        "|---|---|---|---|---|---|",
    ]
    others = sorted({v for variants in curves.values() for v in variants} - {baseline})
    for variant in others:
        tasks = {}
        for env_id, variants in sorted(curves.items()):
            if variant not in variants or baseline not in variants:
                continue
            x_runs, y_runs = variants[variant], variants[baseline]
            counts = f"{len(x_runs)}, {len(y_runs)}"
            if min(len(x_runs), len(y_runs)) < min_seeds:
                lines.append(f"| {env_id} | {variant} | - | {counts} | needs {min_seeds}+ seeds of each | - |")
                continue
            step = stats.common_steps(dict(run) for run in x_runs + y_runs)[-1]
            x, y = [dict(run)[step] for run in x_runs], [dict(run)[step] for run in y_runs]
            p, low, high = stats.improvement_probability([[v] for v in x], [[v] for v in y])
            diff = stats.iqm(x) - stats.iqm(y)
            lines.append(
                f"| {env_id} | {variant} | {step} | {counts} | {p:.2f} [{low:.2f}, {high:.2f}] | {diff:+.1f} |"
            )
            if bounded(env_id):
                tasks[env_id] = (x, y)
        if len(tasks) > 1:
            n_x, n_y = min(len(x) for x, _ in tasks.values()), min(len(y) for _, y in tasks.values())
            x = np.array([x[:n_x] for x, _ in tasks.values()]).T / 1000
            y = np.array([y[:n_y] for _, y in tasks.values()]).T / 1000
            p, low, high = stats.improvement_probability(x, y)
            diff = stats.iqm(x) - stats.iqm(y)
            name = f"{len(tasks)} tasks"
            lines.append(
                f"| {name} | {variant} | equal | {n_x}, {n_y} | {p:.2f} [{low:.2f}, {high:.2f}] | {diff:+.3f} |"
            )
    return [*lines, ""]


def changed_definitions(source, baseline):
    """The top-level functions and classes whose text differs between two versions of the script (edited, added or
    removed): what an ablation's copy changed."""

    def definitions(text):
        nodes = [n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef | ast.ClassDef)]
        return {n.name: ast.get_source_segment(text, n) for n in nodes}

    mine, theirs = definitions(source), definitions(baseline)
    return [name for name in {**theirs, **mine} if mine.get(name) != theirs.get(name)]


def script_cell(copies, baseline_copies):
    """A variant's scripts: each copy's file name and digest, and what differs from the baseline's (first) script."""
    base_digest, (_, base_text) = next(iter(baseline_copies.items()))
    cells = []
    for digest, (name, text) in copies.items():
        if digest is None:
            cells.append("? (no copy in the run)")
        elif digest == base_digest:
            cells.append(f"{name} ({digest}, the baseline's)")
        else:
            changed = changed_definitions(text, base_text) if base_text else []
            shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
            cells.append(f"{name} ({digest}; differs from the baseline's in {shown or 'comments only'})")
    return "; ".join(cells)


def plot_study(out, curves):
    plt = pyplot()

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.8), squeeze=False)
    colors = {v: f"C{k}" for k, v in enumerate(sorted({v for variants in curves.values() for v in variants}))}
    for ax, (env_id, variants) in zip(axes[0], sorted(curves.items()), strict=True):
        for variant, runs in sorted(variants.items()):
            plot_seeds(ax, runs, colors[variant], f"{variant} ({len(runs)} seed(s))", alpha=0.15)
        for j, (name, value) in enumerate(EARLY_REFERENCES.get(env_id, {}).items()):
            ax.axhline(value, color="gray", linestyle=("--", ":")[j % 2], label=f"{name}: {value}")
        ax.set(
            title=env_id, xlabel="environment steps", ylabel="eval return", ylim=(0, 1000) if bounded(env_id) else None
        )
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("QSM variants: mean and min-max over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "study_curves.png"), dpi=120)
    plt.close(fig)


def plot_actions(out, run_dir, acc):
    """The policy's action distribution at the fixed probe state at the run's last evaluation (paper, Figure 4)."""
    step, points = events.probe(acc)
    if not points:
        return None
    plt = pyplot()

    cols = min(len(points), 6)  # rows of at most 6 components: 21 (humanoid) read as 4 rows
    rows = math.ceil(len(points) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(5.0, 2.2 * cols + 1), 1.9 * rows + 0.5), squeeze=False)
    for dim, (ax, (values, counts)) in enumerate(zip(axes.flat, points, strict=False)):
        ax.hist(values, bins=40, range=(-1.0, 1.0), weights=counts)  # re-binned on [-1, 1]
        ax.set(title=f"action {dim}", xlim=(-1.05, 1.05), yticks=[])
    for ax in list(axes.flat)[len(points) :]:
        ax.axis("off")
    name = os.path.basename(run_dir)
    fig.suptitle(f"{name}\n1,000 actions sampled at one initial state, step {step}", fontsize=7)
    fig.tight_layout()
    path = os.path.join(out, f"actions_{name}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_seeds(ax, runs, color, label, alpha):
    """Eval return over the steps every seed evaluated: the mean, and the min-max band over seeds."""
    steps = stats.common_steps(dict(evals) for evals in runs)
    values = [[dict(evals)[s] for s in steps] for evals in runs]
    ax.plot(steps, [statistics.fmean(v[i] for v in values) for i in range(len(steps))], color=color, label=label)
    low, high = ([f(v[i] for v in values) for i in range(len(steps))] for f in (min, max))
    ax.fill_between(steps, low, high, color=color, alpha=alpha)


def write_markdown(path, lines):
    """The report's lines to path (printed by the caller last: a closed pipe, `| head`, cannot cut the files short)."""
    with open(path, "w") as f:
        f.write("\n".join(lines))


def pyplot():
    """matplotlib.pyplot without a display (imported only when a summary draws)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def up_to_last_evaluation(points, seeds):
    """The published points ({step: returns}) at the steps up to the task's last evaluation by any seed."""
    last = max(max(evals) for evals, *_ in seeds.values())
    return {step: value for step, value in points.items() if step <= last}


def plot(out, runs):
    """Eval return against environment steps per task: QSM's mean and min-max band over seeds, SAC's seeds at the
    same steps (mean, min-max bar) and TD3's means."""
    plt = pyplot()

    n = len(runs)
    cols = min(n, 3)
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(5 * cols, 3.6 * math.ceil(n / cols)), squeeze=False)
    for ax, (env_id, seeds) in zip(axes.flat, sorted(runs.items()), strict=False):
        plot_seeds(
            ax, [sorted(evals.items()) for evals, *_ in seeds.values()], "C0", f"QSM, {len(seeds)} seed(s)", 0.25
        )
        sac = up_to_last_evaluation(SAC.get(env_id, {}), seeds)
        if sac:
            steps, values = list(sac), [np.array(v) for v in sac.values()]
            means = np.array([v.mean() for v in values])
            spread = np.clip([means - [v.min() for v in values], [v.max() for v in values] - means], 0.0, None)
            label = f"SAC, {len(values[0])} seeds ({SAC_SOURCE.get(env_id, 'TD-MPC2')})"
            ax.errorbar(steps, means, yerr=spread, fmt="s", color="C3", capsize=3, label=label)
        td3 = up_to_last_evaluation(TD3.get(env_id, {}), seeds)
        if td3:
            ax.plot(list(td3), list(td3.values()), "D", color="C2", label="TD3, mean of 8 seeds (Spinning Up)")
        ax.set(
            title=env_id, xlabel="environment steps", ylabel="eval return", ylim=(0, 1000) if bounded(env_id) else None
        )
        ax.legend(fontsize=7, loc="upper left")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("QSM: mean and min-max over seeds; SAC, TD3: published results at the same steps", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=120)
    plt.close(fig)
