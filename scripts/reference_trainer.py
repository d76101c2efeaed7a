"""
The reference recipe: the same data, weights and hyperparameters through transformers' Trainer, scored with
our metrics.py (which equals scikit-learn). For side-by-side quality checks of train.py; not used at run time.

    pip install transformers accelerate
    python scripts/reference_trainer.py                                  # medical abstracts, like train.py
    python scripts/reference_trainer.py --train-file ../shared/data/roco_radiology/train.csv \
        --test-file ../shared/data/roco_radiology/test.csv --lr 1e-4     # the plain multi-label recipe

It trains on the same 90% of the training file that train.py trains on (train.py's split, same seed), and
scores the model at the end of training (no model selection) on the test file at threshold 0.5.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import LabelEncoder, read_table, train_val_split  # noqa: E402
from metrics import compute_metrics, format_table  # noqa: E402
from train import resolve_model  # noqa: E402


class Encoded(torch.utils.data.Dataset):
    def __init__(self, encodings, targets):
        self.encodings, self.targets = encodings, targets

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return {**{k: v[i] for k, v in self.encodings.items()}, "labels": self.targets[i]}


@torch.no_grad()
def predict_in_order(model, dataset, collate, batch_size=64):
    """Test logits in the dataset's order. Not trainer.predict(): with group_by_length the Trainer reorders
    the test set too, and its predictions come back without their row indices."""
    model.eval()
    device = next(model.parameters()).device
    logits = []
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        logits.append(model(**batch).logits.float().cpu().numpy())
    return np.concatenate(logits)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="")
    p.add_argument("--train-file", default="example_data/medical_abstracts/train.csv")
    p.add_argument("--test-file", default="example_data/medical_abstracts/test.csv")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--epochs", type=float, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampling", default="random", choices=["random", "group_by_length"],
                   help="group_by_length batches texts of similar length, as train.py does: far less padding")
    p.add_argument("--out", default="runs/reference")
    args = p.parse_args()
    import transformers as T
    model_dir = resolve_model(args.model)
    train, test = read_table(args.train_file), read_table(args.test_file)
    labels = LabelEncoder.fit(train.labels, train.multi_label)
    rows, _ = train_val_split(train.labels, 0.1, args.seed, stratify=not train.multi_label)
    tok = T.AutoTokenizer.from_pretrained(model_dir)

    def dataset(texts, raw):
        targets = labels.encode(raw, unknown="ignore")
        keep = np.ones(len(texts), bool) if train.multi_label else targets >= 0
        enc = tok([t for t, k in zip(texts, keep) if k], truncation=True, max_length=args.max_length)
        return Encoded(enc, list(targets[keep]))

    train_set = dataset([train.texts[i] for i in rows], [train.labels[i] for i in rows])
    test_set = dataset(test.texts, test.labels)
    T.set_seed(args.seed)
    model = T.AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=labels.num_labels,
        problem_type="multi_label_classification" if train.multi_label else "single_label_classification")
    training_args = T.TrainingArguments(
        output_dir=args.out, learning_rate=args.lr, num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64, warmup_steps=0.1,  # a ratio (transformers 5)
        weight_decay=0.01, seed=args.seed, train_sampling_strategy=args.sampling, save_strategy="no", report_to=[], logging_steps=50,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    trainer = T.Trainer(model=model, args=training_args, train_dataset=train_set,
                        data_collator=T.DataCollatorWithPadding(tok))
    trainer.train()
    logits = predict_in_order(trainer.model, test_set, T.DataCollatorWithPadding(tok))
    targets = np.stack(test_set.targets)
    metrics = compute_metrics(logits, targets, train.multi_label)
    print(format_table(metrics))
    os.makedirs(args.out, exist_ok=True)
    np.save(os.path.join(args.out, "test_logits.npy"), logits)  # to rescore without retraining
    with open(os.path.join(args.out, "test_metrics.json"), "w") as f:
        json.dump({"args": vars(args), "test": metrics}, f, indent=2)


if __name__ == "__main__":
    main()
