"""How faithful each evidence method of side/explain.py is to the model: ERASER's comprehensiveness and sufficiency
(DeYoung et al., ACL 2020), against the same number of random tokens, and what each method costs.

    python scripts/faithfulness.py --model out --file ../shared/data/roco_radiology/test.csv --limit 200 \
        --methods attention,gradient,integrated_gradients,occlusion --out faithfulness.md

For each text and each predicted label (multi-label: each label at or over its threshold; a text with none is
skipped and counted), the method ranks the words the model reads; for k in 5, 10, 20% of those tokens, whole words
are taken in score order until k% of the tokens are covered (at least one), as the spans shown are whole words:
    comprehensiveness = p(label | text) - p(label | text without those tokens)     higher: the evidence mattered
    sufficiency       = p(label | text) - p(label | only those tokens)             lower: the evidence suffices
Tokens are deleted from the model's input, as ERASER does (special tokens stay; from each window in place). The
random columns do the same with as many tokens drawn at random (seeded, the mean of --draws draws). Cost: forward
and backward passes per text (counted as side/explain.py runs them) and seconds per text on this machine.
Writes the markdown table to stdout and --out, and the numbers as JSON (stdout, and --out's .json beside it).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import read_table  # noqa: E402
from metrics import sigmoid, softmax  # noqa: E402
from predict import Predictor  # noqa: E402
from side import files  # noqa: E402
from side.explain import (IG_STEPS, METHODS, documents, label_objects, method_problem,  # noqa: E402
                          model_input, scores, seen)

SHARES = (0.05, 0.1, 0.2)


def evidence_tokens(doc, word_scores, share):
    """The tokens of the best words (seen ones, in score order, ties by position) until `share` of the seen
    tokens are covered, at least one."""
    visible = seen(doc)
    budget = max(1, round(share * len(visible)))
    tokens_of = {}
    for token in visible:
        tokens_of.setdefault(doc.word_of[token], []).append(token)
    ranked = sorted(tokens_of, key=lambda w: (-np.nan_to_num(word_scores[w], nan=-np.inf), w))
    chosen = []
    for word in ranked:
        if len(chosen) >= budget:
            break
        chosen += tokens_of[word]
    return visible, set(chosen)


def variants(encoder, doc, word_scores, rng, draws):
    """Per share: (evidence removed, evidence kept, [random removed], [random kept]) as model inputs."""
    out = []
    for share in SHARES:
        visible, chosen = evidence_tokens(doc, word_scores, share)
        randoms = [set(rng.choice(visible, size=len(chosen), replace=False).tolist()) for _ in range(draws)]
        without = lambda drop: model_input(encoder, doc, [t for t in visible if t not in drop])
        only = lambda keep: model_input(encoder, doc, [t for t in visible if t in keep])
        out.append((without(chosen), only(chosen), [without(r) for r in randoms], [only(r) for r in randoms]))
    return out


def passes(method, doc, labels, steps):
    """(forward, backward) passes side/explain.py spends on one text and its labels (a batch of texts shares
    each pass: these count a text's share as one)."""
    if method == "attention":
        return 1, 0
    if method == "gradient":
        return 1, len(labels)
    if method == "integrated_gradients":
        return steps, steps * len(labels)
    return 1 + len({doc.word_of[t] for t in seen(doc)}), 0


def measure(predictor, texts, method, draws=3, seed=0, steps=IG_STEPS):
    """The faithfulness of method on texts: per share, the means over label decisions, with the counts and cost."""
    model, encoder = predictor.fp32 or predictor.model, predictor.encoder
    problem = method_problem(model, method)
    if problem:
        raise SystemExit(problem)
    index = {name: i for i, name in enumerate(predictor.names)}
    predicted = [label_objects(p) for p in predictor.predict(texts)]
    targets = [[index[x["label"]] for x in labels] for labels in predicted]
    explained = [i for i, labels in enumerate(targets) if labels]
    docs = documents(encoder, [texts[i] for i in explained])
    targets = [targets[i] for i in explained]
    start = time.perf_counter()
    found = scores(model, encoder, docs, targets, method, predictor.batch_size, predictor.amp, steps)
    seconds = time.perf_counter() - start
    rng = np.random.default_rng(seed)
    inputs, keys = [], []
    for d, (doc, labels) in enumerate(zip(docs, targets)):
        inputs.append(model_input(encoder, doc))
        keys.append((d, None, None, "full"))
        for label in labels:
            for share, (removed, kept, random_removed, random_kept) in zip(SHARES, variants(
                    encoder, doc, found[d][label], rng, draws)):
                for kind, group in (("comp", [removed]), ("suff", [kept]), ("comp_random", random_removed),
                                    ("suff_random", random_kept)):
                    inputs += group
                    keys += [(d, label, share, kind)] * len(group)
    probabilities = probability(predictor, model, inputs)
    return summary(method, keys, probabilities, targets, len(texts), seconds, docs, steps)


def probability(predictor, model, inputs):
    logits = predictor.score(inputs, model)
    return sigmoid(logits) if model.config.multi_label else softmax(logits)


def summary(method, keys, probabilities, targets, n_texts, seconds, docs, steps):
    full = {d: probabilities[i] for i, (d, _, _, kind) in enumerate(keys) if kind == "full"}
    sums = {}
    for i, (d, label, share, kind) in enumerate(keys):
        if kind != "full":
            sums.setdefault((share, kind, d, label), []).append(full[d][label] - probabilities[i][label])
    cost = np.array([passes(method, doc, labels, steps) for doc, labels in zip(docs, targets)]).reshape(-1, 2)
    decisions = sum(map(len, targets))
    rows = []
    for share in SHARES:
        row = {"method": method, "k": share, "texts": len(docs), "skipped": n_texts - len(docs),
               "decisions": decisions}
        for kind in ("comp", "comp_random", "suff", "suff_random"):
            row[kind] = float(np.mean([np.mean(v) for (s, k, _, _), v in sums.items() if s == share and k == kind]
                                      or [np.nan]))
        row.update(forward=float(cost[:, 0].mean()) if len(docs) else 0.0,
                   backward=float(cost[:, 1].mean()) if len(docs) else 0.0,
                   seconds=seconds / max(len(docs), 1))
        rows.append(row)
    return rows


def markdown(rows, title):
    lines = [f"{title}\n", "| method | k | comp | comp random | suff | suff random | texts (skipped) | label decisions "
             "| forward / text | backward / text | s / text |", "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['method']} | {r['k']:.0%} | {r['comp']:.4f} | {r['comp_random']:.4f} | {r['suff']:.4f} | "
                     f"{r['suff_random']:.4f} | {r['texts']} ({r['skipped']}) | {r['decisions']} | "
                     f"{r['forward']:.1f} | {r['backward']:.1f} | {r['seconds']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder (train.py's output)")
    p.add_argument("--file", required=True, help="texts to explain (CSV, TSV, JSONL or TXT with a text column)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--limit", type=int, help="the first N texts only")
    p.add_argument("--methods", help=f"comma-separated, of {', '.join(METHODS)}; default: all the model allows")
    p.add_argument("--steps", type=int, default=IG_STEPS, help="integrated gradients' interpolation steps")
    p.add_argument("--draws", type=int, default=3, help="random draws averaged for the random columns")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="write the markdown table here (and the numbers to its .json beside it)")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)  # the gradient methods turn it on for themselves
    predictor = Predictor(args.model, device=args.device)
    texts = read_table(args.file, args.text_column, label_column=[]).texts[:args.limit]
    model = predictor.fp32 or predictor.model
    methods = args.methods.split(",") if args.methods else [m for m in METHODS if not method_problem(model, m)]
    bad = [problem for problem in map(lambda m: method_problem(model, m), methods) if problem]
    if bad:
        raise SystemExit("; ".join(bad))
    rows = []
    for method in methods:  # a line per method on stderr: a long measurement shows where it is
        print(f"{method}: scoring and deleting words of {len(texts)} texts...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        rows += measure(predictor, texts, method, args.draws, args.seed, args.steps)
        print(f"{method}: done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    table = markdown(rows, f"Faithfulness of the evidence of {args.model} on {len(texts)} texts of {args.file}")
    print(table)
    print(json.dumps(rows))
    if args.out:
        files.write_text(args.out, table, "the table")
        files.write_json(os.path.splitext(args.out)[0] + ".json", rows, "the table", indent=1)
    return rows


if __name__ == "__main__":
    main()
