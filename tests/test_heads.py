"""Poolings beyond the reference's (mean for BERT, max, label attention), the layer mix, and the head's own learning
rate. The reference's own poolings are checked against transformers in test_model.py (the layer mix, in
test_export.py)."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from data import pack_batch
from make_golden import padded_batch
from model import EncoderClassifier, MaskedLM, pool_tokens
from side import options
from side.hf import BertConfig, ModernBertConfig

LABELS = 4


def tiny(arch, pooling, seed=0, layer_mix=False):
    torch.manual_seed(seed)
    common = dict(vocab_size=99, hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=37,
                  max_position_embeddings=64, num_labels=LABELS, classifier_pooling=pooling,
                  problem_type="multi_label_classification", layer_mix=layer_mix)
    if arch == "bert":
        config = BertConfig(**common)
    else:
        config = ModernBertConfig(**common, local_attention=8, pad_token_id=0,
                                  layer_types=["full_attention", "sliding_attention"])
    model = EncoderClassifier(config).eval()
    with torch.no_grad():  # a trained head, not the zero biases of a new one
        for p in model.head.parameters():
            p.normal_(0, 0.5)
        if pooling == "label_attention":
            model.label_attention.weight.normal_(0, 1.0)
        if layer_mix:  # last: the other weights are those of the same model without a mix
            model.layer_mix.weights.normal_(0, 1.0)
            model.layer_mix.scale.uniform_(0.5, 2.0)
    return model


def pooled_by_hand(model, hidden, length):
    """One text's pooled input to the head, from its first `length` token vectors, as README defines it."""
    tokens = hidden[:length]
    if model.pooling == "cls":
        return tokens[0]
    if model.pooling == "mean":
        return tokens.mean(0)
    if model.pooling == "max":
        return tokens.max(0).values
    weights = torch.softmax(tokens @ model.label_attention.weight.T, dim=0)  # [T, L]: each label over the tokens
    return weights.T @ tokens  # [L, H]


@pytest.mark.parametrize("arch", ["bert", "modernbert"])
@pytest.mark.parametrize("pooling", ["cls", "mean", "max", "label_attention"])
def test_pooling_is_its_definition_padded_left_padded_and_packed(arch, pooling):
    """Each pooling as README defines it, from the last layer's token vectors (encode), also for left-padded texts,
    packed texts and a sliding window (ModernBERT's second layer)."""
    model = tiny(arch, pooling)
    ids, mask = padded_batch(1)  # rows of 20, 13, 5 and 9 tokens
    lengths = mask.sum(1).tolist()
    with torch.no_grad():
        logits, _ = model(ids, mask)
        hidden = model.encode(ids, mask)
        expected = torch.stack([model.head(pooled_by_hand(model, h, n)[None])[0] for h, n in zip(hidden, lengths)])
        assert (logits - expected).abs().max() <= 1e-5

        left_ids, left_mask = torch.zeros_like(ids), torch.zeros_like(mask)  # the same texts, padded on the left
        for row, n in enumerate(lengths):
            left_ids[row, -n:], left_mask[row, -n:] = ids[row, :n], 1
        position_ids = (left_mask.cumsum(1) - 1).clamp(min=0)
        left, _ = model(left_ids, left_mask, position_ids=position_ids)
        assert (left - logits).abs().max() <= 1e-5

        packed = pack_batch([ids[row, :n].tolist() for row, n in enumerate(lengths)])
        packed.pop("token_type_ids")
        packed_logits, _ = model(**packed)
        assert (packed_logits - logits).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ["bert", "modernbert"])
def test_label_attention_starts_as_mean_pooling_when_its_queries_are_zero(arch):
    """Equal weights on every token: each label's vector is the text's mean, scored by that label's row."""
    attention, mean = tiny(arch, "label_attention"), tiny(arch, "mean")
    mean.load_state_dict({k: v for k, v in attention.state_dict().items() if not k.startswith("label_attention")})
    torch.nn.init.zeros_(attention.label_attention.weight)
    ids, mask = padded_batch(2)
    with torch.no_grad():
        assert (attention(ids, mask)[0] - mean(ids, mask)[0]).abs().max() <= 1e-5


def test_bert_pooler_serves_cls_pooling_only():
    """The pooler was pretrained on [CLS] (next-sentence prediction): mean, max and label attention skip it."""
    ids, mask = padded_batch(3)
    for pooling, uses_pooler in [("cls", True), ("mean", False), ("max", False), ("label_attention", False)]:
        model = tiny("bert", pooling)
        with torch.no_grad():
            before = model(ids, mask)[0]
            model.head.pooler.weight.normal_()
            changed = (model(ids, mask)[0] - before).abs().max() > 1e-3
        assert changed == uses_pooler, pooling


def test_the_prior_bias_starts_a_new_classifier_only(tmp_path):
    """A trained multi-label classifier that gains a layer mix or label queries keeps its biases (train.py's prior
    bias would overwrite them); one for another number of labels is new."""
    from train import classifier_is_new
    tiny("bert", "cls").save_pretrained(tmp_path / "trained")
    for overrides in ({"layer_mix": True}, {"classifier_pooling": "label_attention"}):
        grown = EncoderClassifier.from_pretrained(tmp_path / "trained", overrides=overrides, verbose=False)
        assert grown.fresh_weights and not classifier_is_new(grown), overrides
    other = EncoderClassifier.from_pretrained(tmp_path / "trained", num_labels=LABELS + 1, verbose=False)
    assert classifier_is_new(other)


def test_label_attention_saves_loads_and_is_new_when_missing(tmp_path, capsys):
    model = tiny("bert", "label_attention")
    model.save_pretrained(tmp_path / "la")
    again = EncoderClassifier.from_pretrained(tmp_path / "la", verbose=False).eval()
    assert again.pooling == "label_attention" and not again.fresh_weights
    ids, mask = padded_batch(4)
    with torch.no_grad():
        assert torch.equal(again(ids, mask)[0], model(ids, mask)[0])

    capsys.readouterr()
    as_mean = EncoderClassifier.from_pretrained(tmp_path / "la", overrides={"classifier_pooling": "mean"})
    assert as_mean.pooling == "mean" and not hasattr(as_mean, "label_attention")  # left behind, not an error
    assert ("la's label_attention.weight left behind: this model pools otherwise (--pooling label_attention keeps "
            "it)") in capsys.readouterr().out
    tiny("bert", "cls").save_pretrained(tmp_path / "cls")
    new = EncoderClassifier.from_pretrained(tmp_path / "cls", overrides={"classifier_pooling": "label_attention"},
                                            verbose=False)
    assert new.fresh_weights  # queries initialised, the rest of the head kept
    assert torch.equal(new.head.classifier.weight, EncoderClassifier.from_pretrained(
        tmp_path / "cls", verbose=False).head.classifier.weight)


def test_windows_attention_refuses_label_attention():
    config = BertConfig(vocab_size=99, hidden_size=24, num_hidden_layers=1, num_attention_heads=3,
                        intermediate_size=37, classifier_pooling="label_attention",
                        long_document={"strategy": "windows_attention", "max_length": 16, "stride": 7})
    with pytest.raises(ValueError, match="use windows_max or windows_mean"):
        EncoderClassifier(config)


def test_head_lr_applies_to_everything_above_the_encoder():
    model = tiny("bert", "label_attention", layer_mix=True)
    optimizer = model.configure_optimizers(0.01, 1e-4, head_lr=3e-3)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    assert lr_of[id(model.layer_mix.weights)] == lr_of[id(model.layer_mix.scale)] == (3e-3, 0.0)
    for name, p in model.named_parameters():
        lr, decay = lr_of[id(p)]
        assert lr == (1e-4 if name.startswith("encoder.") else 3e-3), name
        assert decay == (0.01 if p.dim() >= 2 else 0.0), name
    same = model.configure_optimizers(0.01, 1e-4)
    assert {g["lr"] for g in same.param_groups} == {1e-4}


@pytest.mark.parametrize("argv,message", [
    (["--pooling", "attention"], "--pooling 'attention' must be auto, cls, mean, max or label_attention"),
    (["--pooling", "label_attention", "--long-docs", "windows_attention"], "not with --long-docs windows_attention"),
    (["--head-lr", "0"], "--head-lr 0.0 must be a number > 0"),
])
def test_head_options_are_checked_before_anything_loads(tmp_path, argv, message):
    import train
    with pytest.raises(SystemExit, match=message):
        train.main(["--out-dir", str(tmp_path / "out"), *argv])
    assert not (tmp_path / "out").exists()


def test_multi_label_defaults_resolve_to_the_recipe_and_single_label_keeps_the_reference():
    import train
    cfg = train.TrainConfig()
    assert options.with_task_defaults(cfg, multi_label=False) == dataclasses.replace(cfg, layer_mix=False)
    multi = options.with_task_defaults(cfg, multi_label=True)
    assert (multi.pooling, multi.head_lr, multi.layer_mix) == tuple(
        options.MULTI_LABEL_RECIPE[k] for k in ("pooling", "head_lr", "layer_mix"))
    chosen = train.TrainConfig(pooling="max", head_lr=2e-4, layer_mix=False)
    assert options.with_task_defaults(chosen, multi_label=True) == chosen
    assert options.with_task_defaults(train.TrainConfig(layer_mix=True), multi_label=False).layer_mix is True
    windows = options.with_task_defaults(train.TrainConfig(long_docs="windows_attention"), multi_label=True)
    assert windows.pooling == "auto"


def test_asymmetric_loss_is_its_formula_and_bce_without_its_asymmetry():
    import torch.nn.functional as F
    from model import asymmetric_loss
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(6, 5, generator=g) * 3, (torch.rand(6, 5, generator=g) < 0.3).float()
    p = torch.sigmoid(logits.double())
    shifted = (p - 0.05).clamp(min=0)
    by_hand = -(targets * torch.log(p) + (1 - targets) * shifted ** 4 * torch.log(1 - shifted)).mean()
    assert abs(asymmetric_loss(logits, targets).item() - by_hand.item()) <= 1e-6
    plain = asymmetric_loss(logits, targets, gamma_neg=0.0, margin=0.0)
    assert abs(plain.item() - F.binary_cross_entropy_with_logits(logits, targets).item()) <= 1e-5
    easy = torch.full((1, 5), -10.0)  # every label confidently absent: no loss and no gradient from them
    easy.requires_grad_(True)
    asymmetric_loss(easy, torch.zeros(1, 5)).backward()
    assert easy.grad.abs().max() == 0


def test_loss_option_reaches_the_model_and_single_label_refuses_asl(tmp_path):
    import train
    model = tiny("bert", "mean")
    model.config.multi_label_loss = "asl"
    logits, labels = torch.randn(3, LABELS), (torch.rand(3, LABELS) < 0.5).float()
    from model import asymmetric_loss
    assert torch.equal(model.loss(logits, labels), asymmetric_loss(logits, labels))
    with pytest.raises(SystemExit, match="--loss asl is for multi-label data"):
        train.main(["--out-dir", str(tmp_path / "out"), "--loss", "asl", "--max-steps", "1"])
    assert not (tmp_path / "out" / "model.safetensors").exists()


# ----------------------------------------------------------------------------- the layer mix (--layer-mix)

POOLINGS = ["cls", "mean", "max", "label_attention"]


def packed_logits(model, ids, mask):
    packed = pack_batch([row[:n].tolist() for row, n in zip(ids, mask.sum(1).tolist())])
    packed.pop("token_type_ids")
    return model(**packed)[0]


@pytest.mark.parametrize("arch", ["bert", "modernbert"])
@pytest.mark.parametrize("pooling", POOLINGS)
def test_layer_mix_on_the_last_state_alone_is_the_model_without_it(arch, pooling):
    plain, mixed = tiny(arch, pooling), tiny(arch, pooling, layer_mix=True)
    shared = {k: v for k, v in mixed.state_dict().items() if not k.startswith("layer_mix.")}
    assert shared.keys() == plain.state_dict().keys()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in shared.items())
    ids, mask = padded_batch(1)
    with torch.no_grad():
        assert (mixed(ids, mask)[0] - plain(ids, mask)[0]).abs().max() > 1e-3  # a random mix: another model
        mixed.layer_mix.weights.copy_(torch.tensor([-1e4, -1e4, 0.0]))  # all on the last layer's output
        mixed.layer_mix.scale.fill_(1.0)
        assert (mixed(ids, mask)[0] - plain(ids, mask)[0]).abs().max() <= 1e-6


@pytest.mark.parametrize("arch", ["bert", "modernbert"])
@pytest.mark.parametrize("pooling", POOLINGS)
def test_layer_mix_is_its_definition_padded_and_packed(arch, pooling):
    """The pooling reads scale * sum_l softmax(weights)_l * state_l over the embedding output and each layer's output
    (ModernBERT: each through its final norm); packed texts give the padded logits."""
    model = tiny(arch, pooling, layer_mix=True)
    ids, mask = padded_batch(1)  # rows of 20, 13, 5 and 9 tokens: ModernBERT's window (8) is shorter
    e = model.encoder
    with torch.no_grad():
        states = model.encode(ids, mask, all_states=True)
        assert len(states) == 3 and torch.equal(states[-1], model.encode(ids, mask))
        if arch == "bert":
            first = e.embed_norm(e.word(ids) + e.token_type(torch.zeros_like(ids)) + e.position.weight[:ids.shape[1]])
        else:
            first = e.final_norm(e.embed_norm(e.word(ids)))
        assert (states[0] - first).abs().max() <= 1e-6
        weights = model.layer_mix.weights.softmax(0)
        mixed = model.layer_mix.scale * sum(w * state for w, state in zip(weights, states))
        pooled = pool_tokens(mixed, pooling, mask, label_attention=getattr(model, "label_attention", None))
        expected = model.head(pooled)
        logits = model(ids, mask)[0]
        assert (logits - expected).abs().max() <= 1e-5
        assert (packed_logits(model, ids, mask) - logits).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ["bert", "modernbert"])
def test_layer_mix_learns_with_and_without_grad_checkpointing(arch):
    model = tiny(arch, "mean", layer_mix=True)
    ids, mask = padded_batch(2)
    labels = (torch.rand(4, LABELS, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.encoder.grad_checkpointing = checkpointing
        model(ids, mask, labels=labels)[1].backward()
        grads.append({name: p.grad.clone() for name, p in model.layer_mix.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.isfinite(grad).all() and grad.abs().min() > 0, name  # each state's weight and the scale
        assert (grads[1][name] - grad).abs().max() <= 1e-6 * grad.abs().max(), name


def test_layer_mix_with_long_documents_read_as_windows():
    model = tiny("bert", "mean", layer_mix=True)
    windows = dataclasses.replace(model.config, long_document={"strategy": "windows_max", "max_length": 20})
    windowed = EncoderClassifier(windows).eval()
    windowed.load_state_dict(model.state_dict())
    ids, mask = padded_batch(3)  # four windows: the first two of one document, the last two of another
    with torch.no_grad():
        rows = model(ids, mask)[0]
        docs = windowed(ids, mask, doc_index=torch.tensor([0, 0, 1, 1]), num_docs=2)[0]
    assert torch.equal(docs, torch.stack([rows[:2].amax(0), rows[2:].amax(0)]))


def test_layer_mix_saves_reloads_starts_fresh_and_is_not_dropped_silently(tmp_path, capsys):
    model = tiny("modernbert", "label_attention", layer_mix=True)
    model.save_pretrained(tmp_path / "mix")
    assert json.load(open(tmp_path / "mix" / "config.json"))["layer_mix"] is True
    tensors = load_file(tmp_path / "mix" / "model.safetensors")
    assert torch.equal(tensors["layer_mix.weights"], model.layer_mix.weights)
    assert torch.equal(tensors["layer_mix.scale"], model.layer_mix.scale)
    again = EncoderClassifier.from_pretrained(tmp_path / "mix", verbose=False).eval()
    assert not again.fresh_weights
    ids, mask = padded_batch(4)
    with torch.no_grad():
        assert torch.equal(again(ids, mask)[0], model(ids, mask)[0])

    tiny("modernbert", "label_attention").save_pretrained(tmp_path / "plain")
    capsys.readouterr()
    new = EncoderClassifier.from_pretrained(tmp_path / "plain", overrides={"layer_mix": True})
    fresh = "a new classifier head initialised for this run (layer_mix.weights, layer_mix.scale)"
    assert fresh in capsys.readouterr().out
    assert new.fresh_weights and torch.equal(new.layer_mix.weights, torch.zeros(3))  # equal weights, scale 1
    assert torch.equal(new.layer_mix.scale, torch.ones(1))

    dropped = EncoderClassifier.from_pretrained(tmp_path / "mix", overrides={"layer_mix": False})
    assert ("mix's layer_mix.scale, layer_mix.weights left behind: this model has no layer mix "
            "(train.py --layer-mix keeps it)") in capsys.readouterr().out
    assert not hasattr(dropped, "layer_mix") and not dropped.fresh_weights
    MaskedLM.from_pretrained(tmp_path / "mix", verbose=False)  # an MLM leaves the mix behind as the classifier

    student = EncoderClassifier.from_pretrained(tmp_path / "mix", num_layers=1, verbose=False)
    assert torch.equal(student.layer_mix.weights, model.layer_mix.weights[:2])  # the embeddings' and layer 0's


def test_layer_mix_is_read_from_config_json_and_absent_means_off(tmp_path):
    tiny("bert", "mean").save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    hf = json.load(open(path))
    assert hf["layer_mix"] is False
    del hf["layer_mix"]  # a folder saved before the option
    path.write_text(json.dumps(hf))
    assert not hasattr(EncoderClassifier.from_pretrained(tmp_path / "m", verbose=False), "layer_mix")
    path.write_text(json.dumps({**hf, "layer_mix": "yes"}))
    with pytest.raises(ValueError, match="layer_mix 'yes' in config.json must be true or false"):
        EncoderClassifier.from_pretrained(tmp_path / "m", verbose=False)


def test_layer_mix_option_trains_the_mix_and_saves_it(tmp_path, capsys):
    import train
    from test_robustness import tiny_checkpoint, write_texts
    out = tmp_path / "out"
    train.main(["--model", tiny_checkpoint(tmp_path / "model"), "--train-file", write_texts(tmp_path / "t.csv", 12, 0),
                "--val-file", write_texts(tmp_path / "v.csv", 6, 1), "--test-file", "", "--out-dir", str(out),
                "--max-length", "32", "--batch-size", "4", "--max-steps", "2", "--eval-every", "2", "--layer-mix"])
    assert "for this run (layer_mix.weights, layer_mix.scale)" in capsys.readouterr().out  # the checkpoint's head kept
    saved = EncoderClassifier.from_pretrained(out, verbose=False)
    assert saved.config.layer_mix and json.load(open(out / "train_config.json"))["layer_mix"] is True
    assert saved.layer_mix.weights.shape == (saved.config.num_hidden_layers + 1,)
    assert saved.layer_mix.weights.abs().min() > 0 and saved.layer_mix.scale != 1  # trained
