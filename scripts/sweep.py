"""
Tune a train.py job with Optuna: each trial is an ordinary train.py run whose options are drawn from the search
space below (TPE), scored by its best validation metric, the one train.py selects its checkpoint on. Trials that
fall behind the others' median at the same epoch are stopped early (pruned). The test set is never read.

    pip install optuna
    python scripts/sweep.py --trials 16 --out-dir runs/sweep -- --max-length 128     # the default job
    python train.py --config runs/sweep/best.toml                                    # the best options, in full

Everything after `--` goes to train.py, run as `train.py <options> <drawn options> --test-file "" --out-dir
<out-dir>/trial-K` with its output in <out-dir>/trial-K.log; options in the search space cannot be given there.

The study lives in <out-dir>/study.db (SQLite) unless --storage names another database (a URL such as
postgresql://user@host/db). Run the same command again with a larger --trials to add trials; a trial stopped by
Ctrl-C, a kill or a lost machine is run again (continued from its last evaluation) by the next run, or by any
other process working on the study (a kill -9 is noticed once its heartbeat is --heartbeat x 2 seconds old).
Several processes (one per GPU, or SLURM jobs with a database URL) can run the same command at once: each draws
trials until the study holds --trials finished ones (pruned ones count).

At the end of each run, and when a run is stopped (Ctrl-C, SIGTERM): <out-dir>/best.toml (the best trial's
options, the job's own included; its out_dir is <out-dir>/best) and <out-dir>/trials.md (every trial, best
first). A finished trial's last/ (the resume state) is deleted to save disk; its best checkpoint stays.

The search space (--space FILE replaces it: a TOML file in this form; `[multi_label]` is added for multi-label
data). Kinds: log (log-uniform), float (uniform), int (whole numbers, both ends included), choice.
"""
import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import train  # noqa: E402
from folds import training_table  # noqa: E402
from side import files, options, signals  # noqa: E402

SEARCH_SPACE = """\
lr = {log = [1e-5, 1e-4]}
head_lr = {log = [1e-5, 3e-3]}
epochs = {int = [2, 6]}
batch_size = {choice = [16, 32]}
warmup_ratio = {float = [0.0, 0.2]}
weight_decay = {float = [0.0, 0.1]}

[multi_label]
pooling = {choice = ["label_attention", "mean", "cls"]}
num_layers = {choice = [0, 4, 3]}
"""
KINDS = ("log", "float", "int", "choice")
SWEEP_SETS = ("out_dir", "test_file", "resume", "overwrite", "config")  # options each trial's command sets
PRUNER = {"n_startup_trials": 4, "n_warmup_steps": 0}  # prune from the first evaluation once 4 trials finished
NOT_IN_BEST = ("out_dir", "resume", "overwrite", "config")  # best.toml sets its own out_dir
TRIAL_SETS = ("--out-dir", "--resume", "--no-resume", "--overwrite", "--no-overwrite")
STEPS_PER_EPOCH = 100  # intermediate values are reported at hundredths of an epoch: trials meet at the same epochs


def parse_args(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, train_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__ + "\n" + SEARCH_SPACE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, required=True, help="finished trials the study should hold (pruned count)")
    p.add_argument("--out-dir", required=True, help="the study, each trial's run, best.toml and trials.md")
    p.add_argument("--timeout", type=float, help="start no new trial after this many seconds")
    p.add_argument("--storage", help="a database URL for the study (default: sqlite:///<out-dir>/study.db)")
    p.add_argument("--study-name", default="sweep", help="the study's name in the database (default: sweep)")
    p.add_argument("--space", help="a TOML file with the search space, replacing the one shown above")
    p.add_argument("--sampler-seed", type=int, help="seed TPE's draws (give each process of a study its own; "
                   "a process joining a study goes on from the trials it holds)")
    p.add_argument("--heartbeat", type=float, default=60, help="seconds between a trial's signs of life; one "
                   "silent for twice this is taken as killed and run again (default: 60)")
    args = p.parse_args(ours)
    if args.trials < 1 or (args.timeout is not None and args.timeout <= 0) or args.heartbeat <= 0:
        p.error("--trials must be >= 1, --timeout and --heartbeat > 0")
    return args, train_args


# ----------------------------------------------------------------------------- the search space

def read_space(path, multi_label):
    """{option: (kind, values)} from the TOML text (the built-in space, or --space's file), checked against
    train.py's options: a misspelt option or a value train.py refuses ends the sweep before any trial."""
    try:
        text = SEARCH_SPACE if path is None else open(path, encoding="utf-8").read()
        table = tomllib.loads(text)
    except OSError as e:
        raise SystemExit(f"--space {path}: cannot read it ({e.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"--space {path}: not valid TOML ({e})") from None
    extra = table.pop("multi_label", {})
    space = {**table, **(extra if multi_label else {})}
    where = path or "the built-in search space"
    fields = {f.name for f in dataclasses.fields(train.TrainConfig)}
    checked = {}
    for name, entry in space.items():
        option = name.replace("-", "_")
        if option not in fields or option in SWEEP_SETS:
            raise SystemExit(f"{where}: {name!r} is not a train.py option a trial can draw")
        if not (isinstance(entry, dict) and len(entry) == 1 and next(iter(entry)) in KINDS):
            raise SystemExit(f"{where}: {name} = {entry!r}: write {name} = {{KIND = [...]}} with KIND one of {KINDS}")
        kind, values = next(iter(entry.items()))
        if not isinstance(values, list) or not values or (kind != "choice" and not (
                len(values) == 2 and all(isinstance(v, (int, float)) for v in values) and values[0] < values[1])):
            raise SystemExit(f"{where}: {name}: {kind} takes [low, high] with low < high; choice a list of values")
        if kind == "int" and not all(isinstance(v, int) for v in values):
            raise SystemExit(f"{where}: {name}: int takes whole numbers")
        if kind == "log" and values[0] <= 0:
            raise SystemExit(f"{where}: {name}: a log scale starts above 0")
        checked[option] = (kind, values)
    for values in corners(checked):
        try:
            options.check_options(train.TrainConfig(**values))
        except SystemExit as e:
            raise SystemExit(f"{where}: {e}") from None
    return checked


def corners(space):
    """Option values at each end of every range (and each choice), to let train.py's own checks judge them."""
    for option, (kind, values) in space.items():
        for value in values:
            yield {option: int(value) if kind == "int" else value}


def draw(trial, space):
    """The trial's options from the space (a rerun trial gets the values it had)."""
    drawn = {}
    for option, (kind, values) in space.items():
        if kind == "choice":
            drawn[option] = trial.suggest_categorical(option, values)
        elif kind == "int":
            drawn[option] = trial.suggest_int(option, int(values[0]), int(values[1]))
        else:
            drawn[option] = trial.suggest_float(option, float(values[0]), float(values[1]), log=kind == "log")
    return drawn


def as_flags(values):
    """train.py's command-line form of option values."""
    flags = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        flags += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    return flags


# ----------------------------------------------------------------------------- one trial

def start_trial_process(command, log_path):
    """train.py in a process of its own, its output appended to log_path. On Linux it is ended with the sweep
    even by a kill -9 (else it would run on and write into a folder the study gives to the trial's rerun)."""
    def die_with_parent():
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C at a terminal reaches the whole group
        try:
            import ctypes
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    with open(log_path, "a") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)


def evaluations(path):
    """The evaluation rows metrics.jsonl holds so far (a line still being written is left for the next look)."""
    try:
        with open(path) as f:
            lines = f.readlines()
    except FileNotFoundError:
        return []
    return [row for row in (json.loads(line) for line in lines if line.endswith("\n")) if row["kind"] == "eval"]


def stop(process):
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Objective:
    """A trial: train.py on the drawn options, each evaluation reported to Optuna as it lands in metrics.jsonl,
    stopped when the pruner says so. Returns the best validation metric."""

    def __init__(self, args, train_args, space, maximize, poll_seconds=1.0):
        self.args, self.train_args, self.space, self.maximize = args, train_args, space, maximize
        self.poll_seconds = poll_seconds

    def __call__(self, trial):
        import optuna
        drawn = draw(trial, self.space)
        folder = trial.user_attrs.get("folder") or f"trial-{trial.number}"  # a rerun continues its folder
        trial.set_user_attr("folder", folder)
        out = os.path.join(self.args.out_dir, folder)
        resume = os.path.isfile(os.path.join(out, "last", "state.pt"))
        if not resume and os.path.isfile(os.path.join(out, "metrics.jsonl")):
            os.remove(os.path.join(out, "metrics.jsonl"))  # an earlier try's evaluations must not be reported
        command = [sys.executable, os.path.join(ROOT, "train.py"), *self.train_args, *as_flags(drawn),
                   "--test-file", "", "--out-dir", out, "--resume" if resume else "--overwrite"]
        note = f" (continues {folder})" if resume else ""
        shown = " ".join(as_flags({k: cell(v) for k, v in drawn.items()}))
        print(f"trial {trial.number}: {shown}{note} (log: {out}.log)", flush=True)
        process = start_trial_process(command, out + ".log")
        reported, started = set(), time.time()
        try:
            while True:
                finished = process.poll() is not None
                for row in evaluations(os.path.join(out, "metrics.jsonl")):
                    step = round(row["epoch"] * STEPS_PER_EPOCH)
                    if step in reported:
                        continue
                    reported.add(step)
                    trial.report(row[row["metric"]], step)
                    if trial.should_prune():
                        stop(process)
                        message = f"pruned at epoch {row['epoch']:.2f}: {row['metric']} {row[row['metric']]:.4f}"
                        trial.set_user_attr("note", message)
                        print(f"trial {trial.number}: {message}, behind the median of the trials before it",
                              flush=True)
                        remove_resume_state(out)
                        raise optuna.TrialPruned(message)
                if finished:
                    break
                time.sleep(self.poll_seconds)
        except KeyboardInterrupt:
            stop(process)
            rerun_later(trial)
            raise
        if process.returncode != 0:
            trial.set_user_attr("note", f"train.py failed (exit code {process.returncode}): see {out}.log")
            print(f"trial {trial.number}: train.py failed (exit code {process.returncode}); the end of {out}.log:\n"
                  f"{tail(out + '.log')}", flush=True)
            raise TrialFailed(trial.user_attrs["note"])
        scores = [row[row["metric"]] for row in evaluations(os.path.join(out, "metrics.jsonl"))]
        best = max(scores) if self.maximize else min(scores)
        remove_resume_state(out)
        print(f"trial {trial.number}: validation {best:.4f} in {(time.time() - started) / 60:.1f} min", flush=True)
        return best


class TrialFailed(Exception):
    pass


def rerun_later(trial):
    """A trial stopped by Ctrl-C or SIGTERM: queued to run again, with its options and folder, by the next run."""
    trial.study.enqueue_trial(trial.params, user_attrs={**trial.user_attrs, "rerun_of": trial.number})
    trial.set_user_attr("note", "stopped; queued to run again")
    print(f"\ntrial {trial.number} stopped: it runs again (continuing {trial.user_attrs['folder']}) when this "
          "command is run again", flush=True)


def remove_resume_state(out):
    shutil.rmtree(os.path.join(out, "last"), ignore_errors=True)  # a finished trial is never resumed


def tail(path, lines=8):
    try:
        return "".join(open(path, errors="replace").readlines()[-lines:])
    except OSError:
        return "(no log)"


# ----------------------------------------------------------------------------- the study

def open_study(args, direction, job):
    """The study, created or loaded; a study made for another job or direction is refused, not mixed."""
    import optuna
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: experimental since 2.8
    url = args.storage or "sqlite:///" + os.path.abspath(os.path.join(args.out_dir, "study.db"))
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    # a trial whose process was killed is queued again with its options (Optuna 4.9 renamed the callback)
    if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
        retry = {"heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)}
    else:
        retry = {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=3)}
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=max(1, int(args.heartbeat)),
                                             grace_period=max(2, int(2 * args.heartbeat)), **retry)
    except Exception as e:  # a bad URL, a database that cannot be reached or opened
        raise SystemExit(f"cannot open the study's database {url}: {type(e).__name__}: {e}") from None
    study = optuna.create_study(storage=storage, study_name=args.study_name, direction=direction,
                                pruner=optuna.pruners.MedianPruner(**PRUNER), load_if_exists=True)
    trials_so_far = len(study.get_trials(deepcopy=False))
    study.sampler = optuna.samplers.TPESampler(seed=continued_seed(args.sampler_seed, trials_so_far))
    saved = study.user_attrs.get("job")
    if saved is None:
        study.set_user_attr("job", job)
    elif saved != job or study.direction.name.lower() != direction:
        raise SystemExit(f"{url} holds the study {args.study_name!r} of another job ({saved['train_options']}, "
                         f"space {saved['space']}): pass another --out-dir or --study-name")
    return study


def continued_seed(seed, trials_so_far):
    """The sampler's seed for a process that joins a study holding trials_so_far: a fixed seed alone would draw the
    same options as the seed's first process did, trials the study has already run."""
    if seed is None:
        return None
    import numpy as np
    return int(np.random.SeedSequence([seed, trials_so_far]).generate_state(1)[0])


def finished(study):
    from optuna.trial import TrialState
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def keep_going(total):
    """Optuna callback: stop this process once the study holds `total` finished trials (all processes count)."""
    def check(study, trial):
        if finished(study) >= total:
            study.stop()
    return check


def stop_after_a_broken_job(study, trial):
    """A failed trial in a study where none ever finished: the job itself is broken, not the drawn options."""
    from optuna.trial import TrialState
    if trial.state == TrialState.FAIL and not finished(study) and "rerun_of" not in trial.user_attrs:
        study.stop()


def open_sweep(args, train_args, space, metric, maximize):
    """The study, new or continued, and a line on how far it is."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own lines say what happened to each trial
    job = {"train_options": train_args, "space": {k: [kind, v] for k, (kind, v) in space.items()}, "metric": metric}
    study = open_study(args, "maximize" if maximize else "minimize", job)
    print(f"study {args.study_name}: {finished(study)} of {args.trials} trials finished; selecting on validation "
          f"{metric}", flush=True)
    return study


def run(study, args, train_args, space, maximize):
    """Trials until the study holds args.trials finished ones (or --timeout)."""
    objective = Objective(args, train_args, space, maximize)
    if finished(study) < args.trials:
        study.optimize(objective, timeout=args.timeout, catch=(TrialFailed,),
                       callbacks=[keep_going(args.trials), stop_after_a_broken_job])


# ----------------------------------------------------------------------------- what a sweep leaves

def write_beside(path, text):
    """Written beside, then renamed (side/files.py): a kill leaves the old file or the new one, never half of one;
    processes of one study that end at once each write theirs whole."""
    files.write_text(path, text, "the sweep's table")


def toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else {math.inf: "inf", -math.inf: "-inf"}.get(value, "nan")
    if isinstance(value, int):
        return str(value)
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string


def best_options(cfg, params, out_dir):
    """The job's own options that differ from train.py's defaults, then the best trial's; paths made absolute
    (the file works from any folder), out_dir <out-dir>/best."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    values = {name: value for name, value in dataclasses.asdict(cfg).items()
              if value != defaults[name] and value is not None and name not in NOT_IN_BEST}
    values.update(params)
    for name in ("model", "train_file", "val_file", "test_file", "teacher"):
        if values.get(name) and os.path.exists(values[name]):
            values[name] = os.path.abspath(values[name])
    values["out_dir"] = os.path.abspath(os.path.join(out_dir, "best"))
    return values


def write_best(path, values, trial, metric):
    lines = [f"# trial {trial.number} of the sweep in {os.path.dirname(os.path.abspath(path))}: validation "
             f"{metric} {trial.value:.4f}", "# python train.py --config " + path]
    lines += [f"{name} = {toml_value(value)}" for name, value in values.items()]
    write_beside(path, "\n".join(lines) + "\n")


def trial_order(trials, maximize):
    """Finished trials by value, then pruned ones by their last reported value, then the rest."""
    from optuna.trial import TrialState
    sign = -1 if maximize else 1

    def key(t):
        if t.state == TrialState.COMPLETE:
            return (0, sign * t.value)
        if t.state == TrialState.PRUNED and t.intermediate_values:
            return (1, sign * t.intermediate_values[t.last_step])
        return (2, t.number)
    return sorted(trials, key=key)


def trials_table(study, space, metric, maximize):
    from optuna.trial import TrialState
    names = list(space)
    header = ["trial", "state", f"validation {metric}", *names, "minutes", "note"]
    rows = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for t in trial_order(study.get_trials(deepcopy=False), maximize):
        value = (t.value if t.state == TrialState.COMPLETE else
                 t.intermediate_values[t.last_step] if t.intermediate_values else None)
        minutes = (t.datetime_complete - t.datetime_start).total_seconds() / 60 if t.datetime_complete and \
            t.datetime_start else None
        note = t.user_attrs.get("note", "")
        if "rerun_of" in t.user_attrs or t.system_attrs.get("failed_trial") is not None:
            note = (note + "; " if note else "") + "a rerun of a stopped trial"
        cells = [str(t.number), t.state.name.lower(), "-" if value is None else f"{value:.4f}",
                 *(cell(t.params.get(n)) for n in names), "-" if minutes is None else f"{minutes:.1f}", note]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def cell(value):
    return "-" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def write_results(study, cfg, args, space, metric, maximize, stopped=False):
    """trials.md, and best.toml once a trial finished. stopped: the sweep was stopped (Ctrl-C, SIGTERM) and this
    is what it has so far."""
    from optuna.trial import TrialState
    write_beside(os.path.join(args.out_dir, "trials.md"), trials_table(study, space, metric, maximize) + "\n")
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        failed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                  if t.user_attrs.get("note", "").startswith("train.py failed")]
        if failed and not finished(study) and not stopped:  # stop_after_a_broken_job stopped the sweep
            raise SystemExit(f"no trial finished: trial {failed[-1].number}'s {failed[-1].user_attrs['note']}; fix "
                             "the job and run the same command again")
        print(f"no trial finished yet: no best.toml; the trials so far in {args.out_dir}/trials.md")
        return None
    best = study.best_trial
    path = os.path.join(args.out_dir, "best.toml")
    write_best(path, best_options(cfg, best.params, args.out_dir), best, metric)
    pruned = len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))
    print(f"{len(complete)} trials complete, {pruned} pruned; the best, trial {best.number}: validation {metric} "
          f"{best.value:.4f}\nwritten to {path} and {args.out_dir}/trials.md; next:\n"
          f"  python train.py --config {path}")
    return best


# ----------------------------------------------------------------------------- the job

def check_job(train_args):
    """train.py's options as it reads them: a classifier, with no option the sweep sets."""
    cfg = train.parse_config(train_args)
    options.check_options(cfg)
    if cfg.task == "mlm":
        raise SystemExit("sweep.py tunes a classifier on its validation metric: no --task mlm")
    if options.no_validation(cfg):
        raise SystemExit(f"sweep.py tunes a classifier on its validation metric, and --val-fraction "
                         f"{cfg.val_fraction} without a --val-file leaves no validation data: give --val-fraction > 0 "
                         "or a --val-file")
    return cfg


def main(argv=None):
    args, train_args = parse_args(argv)
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise SystemExit("sweep.py needs Optuna: pip install optuna") from None
    cfg = check_job(train_args)
    set_here = [a for a in train_args if a.split("=")[0] in TRIAL_SETS]
    if set_here:
        raise SystemExit(f"{', '.join(set_here)}: sweep.py sets --out-dir (pass it before the `--`), --resume and "
                         "--overwrite for each trial")
    try:
        table = training_table(cfg)
    except train.DataError as e:
        raise SystemExit(f"data error: {e}") from None
    space = read_space(args.space, table.multi_label)
    given = sorted({a.split("=")[0] for a in train_args if a.startswith("--")} &
                   {"--" + n.replace("_", "-") for n in space})
    if given:
        raise SystemExit(f"{', '.join(given)}: in the search space, drawn for each trial; leave it out of the job "
                         "or give a --space without it")
    if table.labels is None:
        raise SystemExit(f"{cfg.train_file}: no label column (looked for 'label' and 'labels'); name it with "
                         "--label-column")
    metric = options.selection_metric(cfg.metric, table.multi_label)
    maximize = options.greater_is_better(cfg.greater_is_better, metric)
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise SystemExit(f"--out-dir {args.out_dir} is a file, not a folder")
    os.makedirs(args.out_dir, exist_ok=True)
    study = open_sweep(args, train_args, space, metric, maximize)
    try:
        run(study, args, train_args, space, maximize)
    except KeyboardInterrupt:  # a stopped sweep still leaves the table and the best so far; then the stop's line
        with signals.held():
            try:
                write_results(study, cfg, args, space, metric, maximize, stopped=True)
            except files.WriteFailed as e:  # said, then the stop's own line: the study is whole in its database
                print(f"{e}; the next run writes the tables", file=sys.stderr, flush=True)
        raise
    try:
        return write_results(study, cfg, args, space, metric, maximize)
    except files.WriteFailed as e:
        raise SystemExit(f"{e}. The trials are whole in the study's database: run the same command again to write "
                         "the tables") from None


if __name__ == "__main__":
    # Ctrl-C and SIGTERM (a scheduler's kill): one line; the running trial is stopped and runs again next time
    with signals.stopping("Run the same command again to go on: the stopped trial runs again"):
        main()
