"""
Which of a checkpoint's layers carries your labels, before any fine-tuning: each hidden state (the embeddings, then
every layer's output) is pooled over each text's tokens, frozen, and fit by logistic regression on train.py's split
of the training file; the table gives each layer's validation and test micro- and macro-F1. A layer below the top
that scores higher says the top layers moved away from what the labels need (docs/results.md, the layer study).

    pip install scikit-learn
    python scripts/layer_probe.py --train-file ../shared/data/roco_radiology/train.csv \
        --test-file ../shared/data/roco_radiology/test.csv --max-length 128

Multi-label data: one-vs-rest, one decision threshold tuned on the held-out share, as linear_baseline.py does.
ModernBERT's states pass through its final norm, as its last one does (the states train.py --layer-mix mixes).
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from side import signals  # noqa: E402
signals.quiet_start(__name__)  # from here a Ctrl-C or SIGTERM ends with one line, not a traceback
from data import TextEncoder, make_batch  # noqa: E402
from linear_baseline import read_split  # noqa: E402
from metrics import compute_metrics, tune_thresholds  # noqa: E402
from model import EncoderClassifier, pool_tokens  # noqa: E402
from side import files, options  # noqa: E402


@torch.no_grad()
def hidden_states(model, encoder, texts, pooling, batch_size=64):
    """[states, texts, H]: each state's pooled vector of each text (state 0: the embeddings; ModernBERT's each
    through its final norm, as train.py --layer-mix reads them)."""
    seqs, pooled = encoder.encode(texts), []
    for start in range(0, len(seqs), batch_size):
        batch = make_batch(seqs[start:start + batch_size], None, encoder.pad_id)
        states = model.encode(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], all_states=True)
        pooled.append(torch.stack([pool_tokens(h, pooling, batch["attention_mask"]) for h in states]))
    return torch.cat(pooled, dim=1).numpy()


def probe(train, val, test, multi_label):
    """Fit on train's features, tune on val (multi-label threshold), score val and test."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler
    (x, y), (vx, vy), (tx, ty) = train, val, test
    scale = StandardScaler().fit(x)
    x, vx, tx = scale.transform(x), scale.transform(vx), scale.transform(tx)
    linear = LogisticRegression(C=1.0, max_iter=1000)
    if not multi_label:
        fit = linear.fit(x, y)
        return [compute_metrics(fit.decision_function(f), t, multi_label=False) for f, t in ((vx, vy), (tx, ty))]
    present = y.sum(axis=0) > 0
    fit = OneVsRestClassifier(linear).fit(x, y[:, present])

    def logits(features):  # labels absent from training: never predicted
        out = np.full((len(features), y.shape[1]), -30.0)
        out[:, present] = fit.decision_function(features)
        return out
    threshold = tune_thresholds(logits(vx), vy, per_label=False, average="micro")
    return [compute_metrics(logits(f), t, multi_label=True, threshold=threshold) for f, t in ((vx, vy), (tx, ty))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help='checkpoint folder; "" = all-MiniLM-L6-v2 (as train.py)')
    p.add_argument("--train-file", default="example_data/medical_abstracts/train.csv")
    p.add_argument("--test-file", default="example_data/medical_abstracts/test.csv")
    p.add_argument("--val-file", default="")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="")
    p.add_argument("--task", choices=("auto", "single", "multi"), default="auto")
    p.add_argument("--label-sep", default=";")
    p.add_argument("--unknown-labels", choices=("error", "ignore"), default="ignore")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0, help="the split's seed, as train.py --seed")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--pooling", choices=("mean", "max", "cls"), default="mean")
    p.add_argument("--out", default="", help="also write the table (markdown) here")
    args = p.parse_args(argv)
    reads = {"--train-file": args.train_file, "--val-file": args.val_file, "--test-file": args.test_file,
             "--model folder": args.model}
    if problem := files.out_file_problem(args.out, reads):
        p.error(problem)

    (train_x, train_y), (val_x, val_y), (test_x, test_y), labels = read_split(args)
    model_dir = options.resolve_model(args.model)
    model = EncoderClassifier.from_pretrained(model_dir, num_labels=2, verbose=False).eval()
    encoder = TextEncoder(model_dir, args.max_length)
    states = [hidden_states(model, encoder, texts, args.pooling) for texts in (train_x, val_x, test_x)]
    header = "| state | val micro-F1 | val macro-F1 | test micro-F1 | test macro-F1 |\n| --- | --- | --- | --- | --- |"
    print(header)
    rows = []
    for layer in range(states[0].shape[0]):
        val, test = probe(*[(s[layer], y) for s, y in zip(states, (train_y, val_y, test_y))], labels.multi_label)
        name = "embeddings" if layer == 0 else f"layer {layer}"
        rows.append(f"| {name} | {val['micro_f1']:.4f} | {val['macro_f1']:.4f} | {test['micro_f1']:.4f} | "
                    f"{test['macro_f1']:.4f} |")
        print(rows[-1], flush=True)
    if args.out:
        try:
            files.write_text(args.out, "\n".join([header, *rows]) + "\n", "the table")
        except files.WriteFailed as e:
            raise SystemExit(str(e)) from None

if __name__ == "__main__":
    with signals.stopping("Run the same command again (nothing was written)"):  # Ctrl-C, SIGTERM, | head
        main()
