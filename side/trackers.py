"""--report-to tensorboard,mlflow: the rows of metrics.jsonl, as they are written, also go to TensorBoard and MLflow.

check_report_to   the option's value, and each named package installed (one message with the pip command)
open_trackers     rank 0's trackers for a run: TensorBoard under OUT/tensorboard, MLflow at MLFLOW_TRACKING_URI or
    in OUT/mlruns (an SQLite database; artifacts beside it); --resume continues the same TensorBoard run (later
    steps of the killed run purged) and the same MLflow run (its id kept in OUT/mlflow_run.json)
Each tracker: log(row) a metrics.jsonl row; close() at the end of training; publish(paths) the run's report files
as artifacts, then the run is finished. side/logs.py's TrainLog owns them: train() sees one log object.
"""
import json
import os
import time
from pathlib import Path

from side import files
from side.failures import WriteFailed

PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny")}  # import, pip
RUN_CONTROL = ("resume", "overwrite", "config")  # how a run was started, not what it is: no MLflow parameter
ROW_KEYS = ("kind", "step", "metric")  # a row's bookkeeping, not a metric


def tracker_names(report_to):
    names = [] if report_to in ("", "none") else [name.strip() for name in report_to.split(",")]
    return list(dict.fromkeys(names))  # tensorboard,tensorboard: one writer, not two into one folder


def report_to_problem(report_to):
    """None, or why --report-to cannot be honoured: an unknown name, or a package that is not installed."""
    names = tracker_names(report_to)
    unknown = [n for n in names if n not in PACKAGES]
    if unknown:
        return f"--report-to {report_to!r}: {', '.join(unknown)} unknown; give none, or tensorboard, mlflow or both"
    import importlib.util
    missing = [PACKAGES[n][1] for n in names if importlib.util.find_spec(PACKAGES[n][0]) is None]
    if missing:
        return f"--report-to {report_to}: pip install {' '.join(missing)}"
    return None


def check_report_to(report_to):
    problem = report_to_problem(report_to)
    if problem:
        raise SystemExit(problem)


def open_trackers(report_to, out_dir, run_options, resumed_at):
    """The trackers --report-to names; resumed_at: the step a resumed run goes on from, None for a new run."""
    opened = {"tensorboard": TensorBoard, "mlflow": MLflow}
    return [opened[name](out_dir, run_options, resumed_at) for name in tracker_names(report_to)]


def scalars(row):
    """A metrics.jsonl row's numbers, named train/... or eval/... as TensorBoard and MLflow show them."""
    return {f"{row['kind']}/{key}": float(value) for key, value in row.items()
            if key not in ROW_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool)}


class TensorBoard:
    def __init__(self, out_dir, run_options, resumed_at):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: TensorBoard hides what a killed run logged after the step this one resumes from (all of it
        # when this run starts from step 0)
        purge = 0 if resumed_at is None else resumed_at + 1
        self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=purge)
        if resumed_at is None:
            rows = "\n".join(f"| {k} | {v!r} |" for k, v in run_options.items())
            self.writer.add_text("options", "| option | value |\n| --- | --- |\n" + rows, 0)

    def log(self, row):
        for name, value in scalars(row).items():
            self.writer.add_scalar(name, value, row["step"])
        if row["kind"] == "eval":
            self.writer.flush()

    def close(self):
        self.writer.close()

    def publish(self, paths):
        pass  # the event files are the run; the report sits beside them in OUT


class MLflow:
    """An MLflow run through its client (no global active run): a new run for a new training run, the same run
    again for --resume."""

    def __init__(self, out_dir, run_options, resumed_at):
        import logging

        from mlflow.tracking import MlflowClient
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its database set-up notes
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.id_path = os.path.join(out_dir, "mlflow_run.json")
        here = os.path.abspath(os.path.join(out_dir, "mlruns"))
        uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + os.path.join(here, "mlflow.db")
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            os.makedirs(here, exist_ok=True)
        try:
            self.client = MlflowClient(uri)
            self.start(out_dir, run_options, resumed_at, uri, here)
        except WriteFailed:
            raise  # mlflow_run.json could not be written: train.py's message for a failed write
        except Exception as e:  # a server that cannot be reached, a database that cannot be opened
            raise SystemExit(f"--report-to mlflow: cannot log to {uri} ({type(e).__name__}: {e}); check "
                             "MLFLOW_TRACKING_URI, or leave mlflow out of --report-to") from None

    def start(self, out_dir, run_options, resumed_at, uri, here):
        """A new MLflow run with the options as parameters, or the resumed training run's own run."""
        saved = self.saved_run(uri) if resumed_at is not None else None
        if saved:
            self.run_id = saved
            self.client.update_run(saved, status="RUNNING")
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "train.py")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            name, artifact_location=None if os.environ.get("MLFLOW_TRACKING_URI") else
            Path(here, "artifacts").as_uri())
        self.run_id = self.client.create_run(experiment_id, run_name=os.path.basename(os.path.abspath(out_dir)),
                                             tags={"out_dir": os.path.abspath(out_dir)}).info.run_id
        from mlflow.entities import Param
        params = [Param(k, str(v)) for k, v in run_options.items() if k not in RUN_CONTROL]
        for first in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
            self.client.log_batch(self.run_id, params=params[first:first + 100])
        files.write_json(self.id_path, {"tracking_uri": uri, "run_id": self.run_id}, "the MLflow run's id")

    def saved_run(self, uri):
        """The run a resumed training run logged to, if it logged to MLflow at this tracking URI."""
        try:
            with open(self.id_path) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            return None
        return saved.get("run_id") if saved.get("tracking_uri") == uri else None

    def log(self, row):
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, row["step"]) for name, value in scalars(row).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self):
        pass  # the run ends in publish, once the report is written

    def publish(self, paths):
        for path in paths:
            if os.path.isfile(path):
                self.client.log_artifact(self.run_id, path)
        self.client.set_terminated(self.run_id, "FINISHED")
