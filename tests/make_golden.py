"""Writes tests/golden/: tiny random checkpoints in the reference layout, inputs, and the reference's
logits (and, for the masked-LM heads, loss), so parity is still checked where `transformers` is not installed.

    python tests/make_golden.py      # needs transformers; rerun only when the cases change
"""
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "golden")


def tiny_reference_model(arch, seed, pooling="cls", problem_type="single_label_classification", num_labels=3,
                         hidden=42, heads=3, layers=4, vocab=99, global_every=2):
    """A random transformers classifier; ModernBERT with a window (8) shorter than the test sequences and a global
    layer every `global_every` layers."""
    import transformers as T
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=37, num_labels=num_labels, problem_type=problem_type, max_position_embeddings=64)
    if arch == "bert":
        return T.BertForSequenceClassification(T.BertConfig(**common))
    config = T.ModernBertConfig(**common, local_attention=8, global_attn_every_n_layers=global_every,
                                classifier_pooling=pooling, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                cls_token_id=1, sep_token_id=2)
    return T.ModernBertForSequenceClassification(config)


def tiny_reference_mlm(arch, seed, hidden=42, heads=3, layers=4, vocab=99, **options):
    """A random transformers masked LM (BertForMaskedLM / ModernBertForMaskedLM), its biases and norms random too
    (the reference initialises them to 0 and 1, which would hide a bias or norm applied in the wrong place)."""
    import transformers as T
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=37, max_position_embeddings=64, **options)
    if arch == "bert":
        model = T.BertForMaskedLM(T.BertConfig(**common))
    else:
        model = T.ModernBertForMaskedLM(T.ModernBertConfig(**common, local_attention=8, global_attn_every_n_layers=2,
                                                           pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                                           cls_token_id=1, sep_token_id=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(torch.randn_like(p) * 0.1)
    return model


def masked_labels(ids, mask, seed, rate=0.3):
    """MLM labels for a padded batch: a random `rate` of the real tokens are to be predicted, -100 elsewhere."""
    chosen = (torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed)) < rate) & mask.bool()
    return torch.where(chosen, ids, -100)


def save_reference(model, out_dir):
    """save_pretrained, with ModernBERT's config.json rewritten in answerdotai/ModernBERT-base's layout."""
    model.save_pretrained(out_dir)
    if model.config.model_type != "modernbert":
        return
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        hf = json.load(f)
    rope = hf.pop("rope_parameters")
    layer_types = hf.pop("layer_types")
    hf["global_attn_every_n_layers"] = next(i for i, t in enumerate(layer_types[1:], 1) if t == "full_attention")
    hf["global_rope_theta"] = rope["full_attention"]["rope_theta"]
    hf["local_rope_theta"] = rope["sliding_attention"]["rope_theta"]
    with open(path, "w") as f:
        json.dump(hf, f, indent=2)


def padded_batch(seed, vocab=99, lengths=(20, 13, 5, 9)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    return ids, mask


def main():
    import transformers
    transformers.logging.set_verbosity_error()
    os.makedirs(GOLDEN, exist_ok=True)
    for name, arch, pooling in [("bert", "bert", "cls"), ("modernbert", "modernbert", "mean")]:
        model = tiny_reference_model(arch, seed=123, pooling=pooling, hidden=32, heads=4, layers=2 + 2 * (arch != "bert"))
        model.eval()
        out_dir = os.path.join(GOLDEN, name)
        save_reference(model, out_dir)
        ids, mask = padded_batch(7)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        torch.save({"input_ids": ids, "attention_mask": mask, "logits": logits}, os.path.join(out_dir, "expected.pt"))
        print(f"wrote {out_dir} (transformers {transformers.__version__})")
    for arch in ("bert", "modernbert"):
        model = tiny_reference_mlm(arch, seed=321, hidden=32, heads=4, layers=2 + 2 * (arch != "bert")).eval()
        out_dir = os.path.join(GOLDEN, f"{arch}_mlm")
        save_reference(model, out_dir)
        ids, mask = padded_batch(8)
        labels = masked_labels(ids, mask, 8)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
        torch.save({"input_ids": ids, "attention_mask": mask, "labels": labels, "logits": out.logits, "loss": out.loss},
                   os.path.join(out_dir, "expected.pt"))
        print(f"wrote {out_dir} (transformers {transformers.__version__})")


if __name__ == "__main__":
    sys.exit(main())
