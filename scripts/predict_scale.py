"""
predict.py at scale, on synthetic notes made from the shipped texts (example_data/medical_abstracts: each note two
of the abstracts' sentences drawn at random, with a note_id): texts/s and peak memory against the number of rows,
as one process and as `torchrun --nproc_per_node N` on the CPU; and the checks that a long run needs: kill -9 at
about half then --resume, and --shard K/N merged, each against one uninterrupted process by sha256.

    python scripts/predict_scale.py --model out --rows 10000 100000 --procs 1 2     # speed and memory
    python scripts/predict_scale.py --model out --rows 20000 --kill-resume --shards 2   # byte-for-byte checks

Peak RSS: all the processes of a run together (torchrun's agent and its ranks), sampled from /proc every 0.1 s,
and the largest single process. texts/s: rows over the wall time of the whole command (the model's loading
included). Every process gets OMP_NUM_THREADS=1 unless --threads says otherwise.
"""
import argparse
import csv
import gzip
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from side.files import replacing  # noqa: E402
from side.signals import stopping  # noqa: E402
SHIPPED = os.path.join(ROOT, "example_data", "medical_abstracts", "train.csv")


def make_notes(path, rows, seed=0):
    """rows notes of two sentences each from the shipped abstracts, with ids; written as CSV (gzip for .gz), or
    the file already there (the same seed writes the same notes)."""
    if os.path.exists(path):
        return path
    with open(SHIPPED, newline="", encoding="utf-8") as f:
        sentences = [s for r in csv.DictReader(f) for s in re.split(r"(?<=\.) ", r["text"]) if len(s) > 20]
    rng = random.Random(seed)
    opener = gzip.open if path.endswith(".gz") else open
    # written beside and renamed: notes cut short by a Ctrl-C would be taken as made by the next run
    with replacing(path, "the notes") as tmp, opener(tmp, "wt", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["note_id", "text"])
        for i in range(rows):
            writer.writerow([f"N{i:08d}", " ".join(rng.sample(sentences, 2))])
    return path


def tree_rss(root_pid):
    """(sum, largest) resident bytes of a process and all its descendants, from /proc."""
    children, rss = {}, {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/statm") as f:
                rss[int(name)] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(name))
    tree, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    sizes = [rss.get(pid, 0) for pid in tree]
    return sum(sizes), max(sizes)


def measure(command, env, kill_when=None):
    """Run command; (seconds, peak total RSS, peak largest RSS, exit status). kill_when(): checked as it runs;
    when true, the whole process group gets SIGKILL."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True, text=True)
    peaks = [0, 0]
    stderr = []
    reader = threading.Thread(target=lambda: stderr.append(process.stderr.read()), daemon=True)
    reader.start()
    try:
        while process.poll() is None:
            total, largest = tree_rss(process.pid)
            peaks = [max(peaks[0], total), max(peaks[1], largest)]
            if kill_when and kill_when():
                os.killpg(process.pid, signal.SIGKILL)
            time.sleep(0.1)
    finally:  # Ctrl-C, SIGTERM: the command runs in a session of its own, which the terminal's Ctrl-C misses
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
    reader.join()
    return time.perf_counter() - start, peaks[0], peaks[1], process.returncode, "".join(stderr)


def predict_command(args, notes, output, procs, *extra):
    job = ["--model", args.model, "--input", notes, "--output", output, "--progress-every", "60", *args.extra, *extra]
    if procs == 1:
        return [sys.executable, os.path.join(ROOT, "predict.py"), *job]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
            str(29500 + os.getpid() % 1000), os.path.join(ROOT, "predict.py"), *job]


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def scale(args, env):
    """The speed and memory table: every --rows with every --procs."""
    results = []
    for rows in args.rows:
        notes = make_notes(os.path.join(args.work, f"notes_{rows}.csv{'.gz' * args.gzip}"), rows)
        hashes = set()
        for procs in args.procs:
            output = os.path.join(args.work, f"labels_{rows}_{procs}.csv")
            seconds, total, largest, status, err = measure(predict_command(args, notes, output, procs), env)
            if status != 0:
                raise SystemExit(f"{rows} rows, {procs} process(es): exit status {status}\n{err[-2000:]}")
            hashes.add(sha256(output))
            results.append({"rows": rows, "procs": procs, "seconds": round(seconds, 1),
                            "texts_per_s": round(rows / seconds, 1), "peak_rss_mb": round(total / 2**20),
                            "largest_process_mb": round(largest / 2**20)})
            print(json.dumps(results[-1]), flush=True)
            os.remove(output)
        print(f"{rows} rows: {'the same bytes' if len(hashes) == 1 else 'DIFFERENT bytes'} from "
              f"{', '.join(map(str, args.procs))} process(es)", flush=True)
    print("\n| rows | processes | seconds | texts/s | peak RSS, all processes (MB) | largest process (MB) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['rows']:,} | {r['procs']} | {r['seconds']} | {r['texts_per_s']} | {r['peak_rss_mb']} | "
              f"{r['largest_process_mb']} |")


def kill_resume(args, env, notes, whole):
    """kill -9 when about half the chunks are complete, then --resume: the same sha256 as the uninterrupted run."""
    output = os.path.join(args.work, "killed.csv")
    rows = args.rows[0]
    chunk_rows = int(args.extra[args.extra.index("--chunk-rows") + 1]) if "--chunk-rows" in args.extra else 4096
    half = -(-rows // chunk_rows) // 2

    def half_done():
        try:
            with open(output + ".resume.json") as f:
                return json.load(f)["chunks"] >= half
        except (OSError, ValueError):
            return False

    *_, status, _ = measure(predict_command(args, notes, output, 1), env, kill_when=half_done)
    with open(output + ".resume.json") as f:
        state = json.load(f)
    print(f"killed (status {status}) after {state['chunks']} of {-(-rows // chunk_rows)} chunks "
          f"({state['rows']} rows written); {output} exists: {os.path.exists(output)}", flush=True)
    seconds, *_, status, err = measure(predict_command(args, notes, output, 1, "--resume"), env)
    same = sha256(output) == sha256(whole)
    print(f"--resume: exit status {status} in {seconds:.0f} s; sha256 {sha256(output)[:16]}... "
          f"{'equal to' if same else 'DIFFERENT from'} the uninterrupted run's", flush=True)


def shards(args, env, notes, whole):
    """--shard K/N for every K, concatenated in order: the same sha256 as one process."""
    parts = [os.path.join(args.work, f"part{k}.csv") for k in range(args.shards)]
    for k, part in enumerate(parts):
        *_, status, err = measure(predict_command(args, notes, part, 1, "--shard", f"{k}/{args.shards}"), env)
        if status != 0:
            raise SystemExit(f"--shard {k}/{args.shards}: exit status {status}\n{err[-2000:]}")
    merged = os.path.join(args.work, "merged.csv")
    subprocess.run(f"cat {' '.join(parts)} > {merged}", shell=True, check=True)
    same = sha256(merged) == sha256(whole)
    print(f"--shard 0/{args.shards} ... {args.shards - 1}/{args.shards}, cat: sha256 {sha256(merged)[:16]}... "
          f"{'equal to' if same else 'DIFFERENT from'} one process's", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a classifier folder (train.py's output)")
    p.add_argument("--rows", type=int, nargs="+", default=[10000, 100000])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="1 = one process; N = torchrun N")
    p.add_argument("--work", default="/tmp/predict_scale", help="where the notes and outputs go")
    p.add_argument("--gzip", action="store_true", help="notes as .csv.gz")
    p.add_argument("--threads", default="1", help="OMP_NUM_THREADS of every process")
    p.add_argument("--kill-resume", action="store_true", help="kill -9 at about half, then --resume (first --rows)")
    p.add_argument("--shards", type=int, default=0, help="--shard K/N for every K, merged with cat (first --rows)")
    p.add_argument("extra", nargs="*", help="after --: more predict.py options (e.g. -- --chunk-rows 1024)")
    args = p.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": args.threads, "PYTHONPATH": ROOT}
    if not (args.kill_resume or args.shards):
        return scale(args, env)
    notes = make_notes(os.path.join(args.work, f"check_{args.rows[0]}.csv{'.gz' * args.gzip}"), args.rows[0])
    whole = os.path.join(args.work, "whole.csv")
    seconds, *_, status, err = measure(predict_command(args, notes, whole, 1), env)
    print(f"uninterrupted: {args.rows[0]} rows in {seconds:.0f} s, sha256 {sha256(whole)[:16]}...", flush=True)
    if args.kill_resume:
        kill_resume(args, env, notes, whole)
    if args.shards:
        shards(args, env, notes, whole)


if __name__ == "__main__":
    with stopping("Run the same command again (the notes made so far are kept)"):
        main()
