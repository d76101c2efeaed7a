"""Poolings beyond the reference's (mean for BERT, max, label attention) and the head's own learning rate.
The reference's own poolings are checked against transformers in test_model.py."""
import pytest
import torch

from data import pack_batch
from make_golden import padded_batch
from model import EncoderClassifier
from side import options
from side.hf import BertConfig, ModernBertConfig

LABELS = 4


def tiny(arch, pooling, seed=0):
    torch.manual_seed(seed)
    common = dict(vocab_size=99, hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=37,
                  max_position_embeddings=64, num_labels=LABELS, classifier_pooling=pooling,
                  problem_type="multi_label_classification")
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


def test_label_attention_saves_loads_and_is_new_when_missing(tmp_path):
    model = tiny("bert", "label_attention")
    model.save_pretrained(tmp_path / "la")
    again = EncoderClassifier.from_pretrained(tmp_path / "la", verbose=False).eval()
    assert again.pooling == "label_attention" and not again.fresh_head
    ids, mask = padded_batch(4)
    with torch.no_grad():
        assert torch.equal(again(ids, mask)[0], model(ids, mask)[0])

    as_mean = EncoderClassifier.from_pretrained(tmp_path / "la", overrides={"classifier_pooling": "mean"},
                                                verbose=False)  # the queries are left behind, not an error
    assert as_mean.pooling == "mean" and not hasattr(as_mean, "label_attention")
    tiny("bert", "cls").save_pretrained(tmp_path / "cls")
    new = EncoderClassifier.from_pretrained(tmp_path / "cls", overrides={"classifier_pooling": "label_attention"},
                                            verbose=False)
    assert new.fresh_head  # queries initialised, the rest of the head kept
    assert torch.equal(new.head.classifier.weight, EncoderClassifier.from_pretrained(
        tmp_path / "cls", verbose=False).head.classifier.weight)


def test_windows_attention_refuses_label_attention():
    config = BertConfig(vocab_size=99, hidden_size=24, num_hidden_layers=1, num_attention_heads=3,
                        intermediate_size=37, classifier_pooling="label_attention",
                        long_document={"strategy": "windows_attention", "max_length": 16, "stride": 7})
    with pytest.raises(ValueError, match="use windows_max or windows_mean"):
        EncoderClassifier(config)


def test_head_lr_applies_to_everything_above_the_encoder():
    model = tiny("bert", "label_attention")
    optimizer = model.configure_optimizers(0.01, 1e-4, head_lr=3e-3)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
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
    assert options.with_task_defaults(cfg, multi_label=False) == cfg
    multi = options.with_task_defaults(cfg, multi_label=True)
    assert (multi.pooling, multi.head_lr) == (options.MULTI_LABEL_RECIPE["pooling"], options.MULTI_LABEL_RECIPE["head_lr"])
    chosen = train.TrainConfig(pooling="max", head_lr=2e-4)
    assert options.with_task_defaults(chosen, multi_label=True) == chosen
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
