"""
Inference speed of a teacher and its smaller student, each in fp32 and in int8 (predict.py --int8), on one
file: the model time predict.py reports (tokenizing apart), timed order-fair. Each of the four models scores
64 texts to warm up; then every round scores the whole file with all four, in one order and the next round
in the reverse order, so that load from other jobs falls on all of them alike.

    python scripts/student_speed.py --teacher out/teacher --student out/student \
        --input ../shared/data/medical_abstracts/test.csv --rounds 4
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import read_table  # noqa: E402
from predict import Predictor  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="the full model's folder")
    parser.add_argument("--student", required=True, help="the smaller model's folder")
    parser.add_argument("--input", required=True, help="a file of texts (CSV, TSV, JSONL or TXT)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    texts = read_table(args.input, args.text_column, []).texts
    models = {}
    for name, folder in (("teacher", args.teacher), ("student", args.student)):
        for int8 in (False, True):
            predictor = Predictor(folder, device="cpu", int8=int8)
            seqs = predictor.encoder.encode(texts)
            predictor.score(seqs[:64])
            models[f"{name} {'int8' if int8 else 'fp32'}"] = (predictor, seqs)
    seconds = {name: [] for name in models}
    for r in range(args.rounds):
        for name in list(models)[::1 if r % 2 == 0 else -1]:
            predictor, seqs = models[name]
            start = time.perf_counter()
            predictor.score(seqs)
            seconds[name].append(time.perf_counter() - start)
    teacher = sum(seconds["teacher fp32"])
    print(f"{len(texts)} texts of {args.input}, {args.rounds} rounds; texts/s per round and overall")
    for name, times in seconds.items():
        rates = ", ".join(f"{len(texts) / t:.0f}" for t in times)
        print(f"{name:13s} {len(texts) * len(times) / sum(times):8.1f} texts/s  {teacher / sum(times):.2f}x the "
              f"teacher in fp32  (rounds: {rates})")
    return seconds


if __name__ == "__main__":
    main()
