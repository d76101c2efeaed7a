"""
One train.py job once per seed, then a table of every test metric per seed with its mean, standard deviation and
min-max, beside the linear baseline (scripts/linear_baseline.py) fit on each seed's split of the same data.

    python scripts/seeds.py --seeds 0,1,2 --out-dir runs/abstracts          # the default job (medical abstracts)
    python scripts/seeds.py --seeds 0,1,2 --out-dir runs/roco -- --train-file ../shared/data/roco_radiology/train.csv \\
        --test-file ../shared/data/roco_radiology/test.csv --max-length 128

Everything after `--` goes to train.py, run as `train.py <options> --seed N --out-dir <out-dir>/seed-N` with its
output in <out-dir>/seed-N.log. The seed sets the validation split, the new head's weights and the batch order.
Seeds run one after another; on a machine with several GPUs (--devices, default every visible one) one per GPU at a
time, each process seeing only its own (CUDA_VISIBLE_DEVICES); without a GPU, --jobs N runs N at a time, each with
its share of the cores (OMP_NUM_THREADS, unless you set it).

Interrupted? Run the same command again: a seed whose run finished (test_metrics.json) is skipped, one with a saved
state (last/state.pt) continues with train.py --resume, one killed before its first evaluation starts again.

The table: <out-dir>/seeds.md (markdown) and seeds.json; standard deviations are the sample's (n - 1). The baseline
(needs scikit-learn; --no-baseline skips it) is cached per seed in <out-dir>/baseline-seed-N.json.

K-fold cross-validation: --folds K cuts the training file into K folds (stratified by label; multi-label data needs
`pip install iterative-stratification`, scripts/folds.py) and runs the job once per fold and seed, in
<out-dir>/fold-k-seed-N, training on the other folds (validation split off them as usual, or --val-file) and
testing on fold k; the table has a column per run and the baseline on the same folds. The job's --test-file is not
used. python scripts/seeds.py --folds 5 --seeds 0 --out-dir runs/abstracts-5fold
"""
import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from side import signals  # noqa: E402
signals.quiet_start(__name__)  # before numpy and torch load: a Ctrl-C or SIGTERM then ends with one line
import numpy as np  # noqa: E402
import train  # noqa: E402
from side import files  # noqa: E402

SEEDS_SETS = ("--seed", "--out-dir", "--resume", "--overwrite")  # train.py options this script sets per seed
# a run ended by Ctrl-C or SIGTERM (train.py's own message: 128 + the signal; or the signal itself: negative) is
# not a failure: it keeps its last checkpoint, and the same command continues it
STOPPED_CODES = (128 + 2, 128 + 15, -2, -15)


def parse_args(argv):
    """(this script's arguments, train.py's options): the two sides of `--`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, train_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--out-dir", default="runs/seeds", help="each seed's run goes to <out-dir>/seed-N")
    p.add_argument("--devices", help="GPUs to run on, one seed per GPU at a time (e.g. 0,1); default: every "
                   "visible GPU, none on a machine without one")
    p.add_argument("--jobs", type=int, default=1, help="without a GPU: runs at a time, each with its share of the "
                   "cores (default 1)")
    p.add_argument("--no-baseline", action="store_true", help="leave the linear baseline out of the table")
    p.add_argument("--folds", type=int, default=0, help="K-fold cross-validation over the training file: fold k's "
                   "rows are that run's test set (default 0: no folds, the job's --test-file)")
    p.add_argument("--fold-seed", type=int, default=0, help="the seed that deals rows into folds (default 0)")
    args = p.parse_args(ours)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: give whole numbers separated by commas, such as 0,1,2")
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        p.error(f"--seeds {args.seeds}: give distinct seeds >= 0")
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: give 1 or more")
    if args.folds == 1 or args.folds < 0:
        p.error(f"--folds {args.folds}: give 2 or more (or 0 for none)")
    taken = [a for a in train_args if a.split("=")[0] in SEEDS_SETS]
    if taken:
        p.error(f"{', '.join(taken)}: seeds.py sets --seed and --out-dir for each run (and --resume when it "
                "continues one); pass --out-dir before the `--`")
    return args, train_args


def check_job(train_args, folds=0):
    """train.py's options as it reads them; the job must be a classifier with a test file (or folds)."""
    cfg = train.parse_config(train_args)
    if cfg.task == "mlm" or not (cfg.test_file or folds):
        raise SystemExit("seeds.py tabulates a classifier's test metrics: it needs a --test-file and no --task mlm")
    return cfg


def seed_state(folder):
    """done (its test report is there), resume (a saved state to continue from), again (killed before its first
    evaluation: it left outputs but no state) or new."""
    if os.path.isfile(os.path.join(folder, "test_metrics.json")):
        return "done"
    if os.path.isfile(os.path.join(folder, "last", "state.pt")):
        return "resume"
    return "again" if os.path.isdir(folder) else "new"


def seed_command(train_args, seed, folder, state):
    extra = {"resume": ["--resume"], "again": ["--overwrite"]}.get(state, [])
    return [sys.executable, os.path.join(ROOT, "train.py"), *train_args, "--seed", str(seed), "--out-dir", folder,
            *extra]


def visible_gpus():
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them; [None] (no pinning) without any."""
    import torch
    count = torch.cuda.device_count()
    if not count:
        return [None]
    named = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return named[:count] if len(named) >= count else [str(i) for i in range(count)]


def cpu_count():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def start_process(command, log_path, device, threads=None):
    """train.py in a process of its own, its output appended to log_path; pinned to one GPU when device is set, and
    held to `threads` threads when set (several runs sharing a CPU: each would start one per core and fight over
    them). It runs in this process's folder, so relative paths mean what they meant to the caller (and to the
    baseline)."""
    env = dict(os.environ)
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    if threads and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log_path, "a") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def run_jobs(jobs, devices, start=start_process, poll_seconds=0.5):
    """jobs: (seed, command, log path), run at most one per device at a time, in order. {seed: exit code}."""
    waiting, running, free, codes = list(jobs), {}, list(devices), {}
    try:
        while waiting or running:
            while waiting and free:
                seed, command, log_path = waiting.pop(0)
                device = free.pop(0)
                print(f"{run_name(seed)}: running{f' on GPU {device}' if device is not None else ''} "
                      f"(log: {log_path})", flush=True)
                running[seed] = (start(command, log_path, device), device)
            time.sleep(poll_seconds)
            for seed, (process, device) in list(running.items()):
                if process.poll() is not None:
                    codes[seed] = process.returncode
                    free.append(device)
                    del running[seed]
                    print(f"{run_name(seed)}: {outcome(codes[seed])}", flush=True)
    finally:  # stopped (Ctrl-C, a kill): its runs stop too, so a second seeds.py never writes beside them
        for process, _ in running.values():
            process.terminate()
            process.wait()
    return codes


def run_slots(args):
    """(devices, start): one slot per GPU, or without a GPU --jobs slots sharing the cores."""
    devices = args.devices.split(",") if args.devices else visible_gpus()
    if devices != [None]:
        if args.jobs > 1:
            raise SystemExit(f"--jobs {args.jobs} is for a machine without a GPU; with GPUs, runs go one per GPU "
                             "(--devices)")
        return devices, start_process
    return [None] * args.jobs, functools.partial(start_process, threads=max(1, cpu_count() // args.jobs))


def outcome(code):
    if code == 0:
        return "done"
    if code in STOPPED_CODES:
        return (f"stopped by a signal (exit code {code}): it continues from its last checkpoint when this command is "
                "run again")
    return f"failed (exit code {code})"


def run_name(key):
    """A run's name in messages and the table: its seed (`seed 3`), or with --folds its fold and seed."""
    return f"seed {key}" if isinstance(key, int) else key


def planned_runs(args, train_args, cfg):
    """[(key, seed, folder, train.py options, the job's options for the baseline)]: one per seed, or with --folds
    one per fold and seed on that fold's files (written first, by scripts/folds.py)."""
    if not args.folds:
        return [(s, s, os.path.join(args.out_dir, f"seed-{s}"), train_args, cfg) for s in args.seeds]
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import folds
    try:
        paths, multi = folds.write_folds(cfg, args.folds, args.fold_seed, args.out_dir)
    except train.DataError as e:
        raise SystemExit(f"data error: {e}") from None
    runs = []
    for k, (train_file, test_file) in enumerate(paths):
        on_fold = {"train_file": os.path.abspath(train_file), "test_file": os.path.abspath(test_file),
                   "task": "multi" if multi else "single"}
        fold_args = [*train_args, *(x for name, v in on_fold.items() for x in ("--" + name.replace("_", "-"), v))]
        for s in args.seeds:
            key = f"fold {k} seed {s}" if len(args.seeds) > 1 else f"fold {k}"
            runs.append((key, s, os.path.join(args.out_dir, f"fold-{k}-seed-{s}"), fold_args,
                         dataclasses.replace(cfg, **on_fold)))
    return runs


def baseline_metrics(cfg, seed, path):
    """linear_baseline.py's test metrics on this seed's split, computed once and cached at path; None without
    scikit-learn."""
    if os.path.isfile(path):
        return json.load(open(path))
    try:
        import sklearn  # noqa: F401
    except ImportError:
        print("scikit-learn is not installed: no linear baseline in the table (pip install scikit-learn)")
        return None
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import linear_baseline
    args = SimpleNamespace(train_file=cfg.train_file, val_file=cfg.val_file, test_file=cfg.test_file,
                           text_column=cfg.text_column, label_column=cfg.label_column, task=cfg.task,
                           label_sep=cfg.label_sep, val_fraction=cfg.val_fraction, seed=seed, C=10.0, jobs=1,
                           unknown_labels=cfg.unknown_labels)
    metrics = linear_baseline.fit_and_score(args)
    files.write_json(path, metrics, "the baseline's metrics")
    return metrics


def flatten(metrics, prefix=""):
    """Scalar metrics, nested ones (by_label_frequency, validation) named a.b.c; lists (thresholds) left out."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix + key] = value
    return out


def spread(values):
    """Mean, sample standard deviation (None for one value), min and max (counts stay whole numbers)."""
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"mean": float(np.mean(values)), "std": std, "min": min(values), "max": max(values)}


def summarise(per_seed, baselines):
    """{metric: {per_seed: {seed: value}, mean, std, min, max, baseline: the same over the baseline's seeds}}."""
    runs = {seed: flatten(m) for seed, m in per_seed.items()}
    lines = {seed: flatten(m) for seed, m in baselines.items() if m is not None}
    names = list(dict.fromkeys(name for m in runs.values() for name in m))
    table = {}
    for name in names:
        values = {seed: m[name] for seed, m in runs.items() if name in m}
        table[name] = {"per_seed": values, **spread(list(values.values()))}
        base = {seed: m[name] for seed, m in lines.items() if name in m}
        if base:
            table[name]["baseline"] = {"per_seed": base, **spread(list(base.values()))}
    return table


def number(value):
    return "-" if value is None else str(value) if isinstance(value, int) else f"{value:.4f}"


def markdown(table, seeds):
    """The table as markdown: a row per metric, a column per seed, mean ± std, min-max, the baseline's mean ± std."""
    header = ["metric", *map(run_name, seeds), "mean ± std", "min-max", "baseline mean ± std"]
    rows = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, row in table.items():
        base = row.get("baseline")
        cells = [name, *(number(row["per_seed"].get(s)) for s in seeds),
                 f"{number(row['mean'])} ± {number(row['std'])}", f"{number(row['min'])}-{number(row['max'])}",
                 f"{number(base['mean'])} ± {number(base['std'])}" if base else "-"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_tables(args, train_args, done):
    """seeds.json and seeds.md (and each run's baseline) from the finished runs' test metrics."""
    per_seed = {key: json.load(open(os.path.join(folder, "test_metrics.json"))) for key, _, folder, _ in done}
    baselines = {} if args.no_baseline else {
        key: baseline_metrics(job, seed, os.path.join(args.out_dir, f"baseline-{os.path.basename(folder)}.json"))
        for key, seed, folder, job in done}
    table = summarise(per_seed, baselines)
    names = [key for key, _, _, _ in done]
    files.write_json(os.path.join(args.out_dir, "seeds.json"), {"seeds": names, "folds": args.folds,
                                                              "train_options": train_args, "metrics": table},
                     "the table")
    text = markdown(table, names)
    files.write_text(os.path.join(args.out_dir, "seeds.md"), text + "\n", "the table")
    return table, text


def main(argv=None):
    args, train_args = parse_args(argv)
    cfg = check_job(train_args, args.folds)
    os.makedirs(args.out_dir, exist_ok=True)
    runs = planned_runs(args, train_args, cfg)
    jobs = []
    for key, seed, folder, run_args, _ in runs:
        state = seed_state(folder)
        print(f"{run_name(key)}: " + {"done": "finished before, skipped", "resume": "interrupted, continues (--resume)",
                                      "again": "killed before its first evaluation, starts again",
                                      "new": "to run"}[state])
        if state != "done":
            jobs.append((key, seed_command(run_args, seed, folder, state), folder + ".log"))
    devices, start = run_slots(args)
    codes = run_jobs(jobs, devices, start)
    done = [(key, seed, folder, job) for key, seed, folder, _, job in runs if seed_state(folder) == "done"]
    names = [key for key, _, _, _ in done]
    table = None
    if done:
        try:
            table, text = write_tables(args, train_args, done)
        except files.WriteFailed as e:  # the runs are whole: a rerun skips them and writes the tables
            raise SystemExit(f"{e}. Once that is fixed, run the same command again: the finished runs are skipped")
        print(f"\n{text}\n\nwritten to {args.out_dir}/seeds.md and seeds.json")
    else:  # an empty table would replace the one a run of other seeds in this folder wrote
        print(f"\nno run has finished: no table written ({args.out_dir}/seeds.md, if any, is as it was)")
    stopped = [run_name(key) for key, code in codes.items() if code in STOPPED_CODES]
    failed = [run_name(key) for key, code in codes.items() if code != 0 and code not in STOPPED_CODES]
    problems = []
    if failed:
        problems.append(f"{', '.join(failed)} failed: see their logs in {args.out_dir}")
    if stopped:
        problems.append(f"{', '.join(stopped)} stopped by a signal: run the same command again to continue")
    if problems:
        raise SystemExit("; ".join(problems) + f"; the table holds {', '.join(map(run_name, names)) or 'no run'}")
    return table


if __name__ == "__main__":
    # Ctrl-C and SIGTERM: one message; run_jobs' finally stops the runs, each of which keeps its last checkpoint
    with signals.stopping("Run the same command again: finished seeds are skipped, an interrupted one continues "
                          "from its last checkpoint (--resume)"):
        main()
