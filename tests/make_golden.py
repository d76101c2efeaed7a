"""Writes tests/golden/: tiny random checkpoints in the reference layout, inputs, and the reference's
logits, so parity is still checked where `transformers` is not installed.

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


if __name__ == "__main__":
    sys.exit(main())
