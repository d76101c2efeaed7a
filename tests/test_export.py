"""Taking a folder elsewhere (issue 39): transformers with the folder's own modeling code (side/remote_code.py) gives
our logits or refuses; scripts/export_onnx.py's graph gives them under ONNX Runtime; scripts/label_onnx.py labels a CSV
with neither torch nor transformers and agrees with predict.py."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from data import load_tokenizer
from make_golden import padded_batch, save_reference, tiny_reference_model
from model import EncoderClassifier
from predict import Predictor
from side.hf import BertConfig, ModernBertConfig
from test_model import minilm_dir

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [f"w{i}" for i in range(60)] + ["chest", "ct", "mri", "lesion", "normal", "liver", "spine", "mass"]
LABELS = ["C01", "C02", "C03", "C04"]


def tiny_folder(folder, arch, pooling, multi=True, temperature=None, long_docs=None, layer_mix=False):
    """A random tiny classifier saved by save_pretrained, with a WordPiece tokenizer over WORDS (vocab.txt,
    tokenizer.json and tokenizer_config.json: transformers' AutoTokenizer and ours read the same). layer_mix: with a
    random mix of the layers."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(SPECIAL + WORDS) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 64,
                   "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                   "mask_token": "[MASK]"}, f)
    load_tokenizer(folder).save(os.path.join(folder, "tokenizer.json"))
    torch.manual_seed(0)
    common = dict(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                  intermediate_size=37, max_position_embeddings=64, num_labels=len(LABELS), pad_token_id=0,
                  id2label=dict(enumerate(LABELS)), classifier_pooling=pooling,
                  problem_type="multi_label_classification" if multi else "single_label_classification",
                  long_document=long_docs and {"strategy": long_docs, "max_length": 16}, layer_mix=layer_mix)
    if arch == "bert":
        config = BertConfig(**common)
    else:
        config = ModernBertConfig(**common, local_attention=8, layer_types=["full_attention", "sliding_attention"])
    if multi:
        config.thresholds = [0.3, 0.5, 0.6, 0.45]
    if temperature is not None:
        config.hf["calibration_temperature"] = temperature
    model = EncoderClassifier(config).eval()
    with torch.no_grad():  # a trained head, not a new one's zero biases
        for p in model.head.parameters():
            p.normal_(0, 0.5)
        if pooling == "label_attention":
            model.label_attention.weight.normal_(0, 1.0)
        if layer_mix:
            randomise_mix(model)
    model.save_pretrained(folder)
    return str(folder)


def randomise_mix(model):
    """Unequal mix weights and a scale other than 1 (a fresh mix's equal weights would hide a state out of order);
    ModernBERT's final norm made affine, so that a state normalised twice, or not at all, changes the logits."""
    with torch.no_grad():
        model.layer_mix.weights.normal_(0, 1.0)
        model.layer_mix.scale.uniform_(0.5, 2.0)
        if hasattr(model.encoder, "final_norm"):
            model.encoder.final_norm.weight.normal_(1.0, 0.3)


def texts(n=7, seed=0):
    """Texts of several lengths (1 to 40 words, all within the 64 positions)."""
    rng = np.random.default_rng(seed)
    lengths = [1, 40, 5, 17, 3, 29, 9][:n]
    return [" ".join(rng.choice(WORDS, size=k)) for k in lengths]


REMOTE = [("bert", "label_attention", None), ("bert", "mean", [0.5, 2.0, 1.5, 0.8]), ("bert", "max", None),
          ("modernbert", "label_attention", 1.7), ("modernbert", "max", None)]


@pytest.mark.parametrize("arch,pooling,temperature", REMOTE)
def test_remote_code_gives_our_logits_in_transformers_and_pipeline(tmp_path, arch, pooling, temperature):
    folder = tiny_folder(tmp_path / "m", arch, pooling, temperature=temperature)
    config = json.load(open(os.path.join(folder, "config.json")))
    assert os.path.isfile(os.path.join(folder, "modeling_encoder_classify.py"))
    assert config["model_type"] not in transformers.CONFIG_MAPPING  # transformers must use the auto_map
    batch = texts()
    ours = Predictor(folder, device="cpu").logits(batch)  # our own loader reads the folder, temperature applied
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        theirs = model(**tokenizer(batch, padding=True, return_tensors="pt")).logits.numpy()
    assert np.abs(theirs - ours).max() <= 1e-5
    assert np.abs(ours).max() > 0.1  # logits, not zeros
    pipe = transformers.pipeline("text-classification", model=folder, trust_remote_code=True, device="cpu")
    scores = pipe(batch, function_to_apply="none", top_k=None)
    by_name = np.array([[next(s["score"] for s in row if s["label"] == name) for name in LABELS] for row in scores])
    assert np.abs(by_name - ours).max() <= 1e-5


@pytest.mark.parametrize("arch,pooling", [("bert", "label_attention"), ("modernbert", "max")])
def test_without_trust_remote_code_transformers_refuses(tmp_path, arch, pooling):
    folder = tiny_folder(tmp_path / "m", arch, pooling)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        transformers.AutoModelForSequenceClassification.from_pretrained(folder)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        transformers.pipeline("text-classification", model=folder, device="cpu")


@pytest.mark.parametrize("arch,pooling", [("bert", "cls"), ("modernbert", "mean")])
def test_standard_heads_stay_standard_folders(tmp_path, arch, pooling):
    folder = tiny_folder(tmp_path / "m", arch, pooling, multi=False)
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["model_type"] == arch and "auto_map" not in config
    assert not os.path.exists(os.path.join(folder, "modeling_encoder_classify.py"))
    batch = texts()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        theirs = model(**tokenizer(batch, padding=True, return_tensors="pt")).logits.numpy()
    assert np.abs(theirs - Predictor(folder, device="cpu").logits(batch)).max() <= 1e-5


def test_saving_a_standard_head_again_removes_stale_remote_code(tmp_path):
    folder = tiny_folder(tmp_path / "m", "bert", "mean")
    model = EncoderClassifier.from_pretrained(folder, overrides={"classifier_pooling": "cls"}, verbose=False)
    model.save_pretrained(folder)
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["model_type"] == "bert" and "auto_map" not in config
    assert not os.path.exists(os.path.join(folder, "modeling_encoder_classify.py"))


@pytest.mark.parametrize("arch,pooling,long_docs", [
    ("bert", "cls", "windows_mean"), ("bert", "mean", "windows_attention"), ("modernbert", "label_attention", "windows_max"),
    ("bert", "label_attention", "head_tail")])
def test_long_documents_are_cut_in_transformers_as_ours_cuts_them(tmp_path, arch, pooling, long_docs):
    """max_length 16: the 40- and 29-word texts become several windows (or are cut), the short ones stay whole."""
    folder = tiny_folder(tmp_path / "m", arch, pooling, long_docs=long_docs)
    if long_docs == "windows_attention":  # a trained window scorer, not a new one's zeros (equal weights)
        model = EncoderClassifier.from_pretrained(folder, verbose=False)
        with torch.no_grad():
            model.window_attention.weight.normal_(0, 1.0)
        model.save_pretrained(folder)
    batch = texts()
    predictor = Predictor(folder, device="cpu")
    if long_docs.startswith("windows"):
        assert max(len(windows) for windows in predictor.encode(batch)) > 1  # some texts are several windows
    ours = predictor.logits(batch)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():  # whole texts, padded: the model cuts them
        theirs = model(**tokenizer(batch, padding=True, return_tensors="pt")).logits.numpy()
    assert theirs.shape == ours.shape and np.abs(theirs - ours).max() <= 1e-5


@pytest.mark.parametrize("arch", ["bert", "modernbert"])
@pytest.mark.parametrize("pooling", ["cls", "mean", "label_attention"])
def test_a_layer_mix_gives_our_logits_in_transformers(tmp_path, arch, pooling):
    """Every head with a layer mix carries the modeling file (transformers' classes read the last layer only): its
    mix of transformers' hidden_states is ours."""
    folder = tiny_folder(tmp_path / "m", arch, pooling, layer_mix=True)
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["layer_mix"] is True and config["model_type"] == f"encoder_classify_{arch}"
    batch = texts()
    ours = Predictor(folder, device="cpu").logits(batch)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        theirs = model(**tokenizer(batch, padding=True, return_tensors="pt")).logits.numpy()
    assert np.abs(theirs - ours).max() <= 1e-5
    without = EncoderClassifier.from_pretrained(folder, overrides={"layer_mix": False}, verbose=False).eval()
    ids, mask = padded_batch(0, vocab=config["vocab_size"])
    with torch.no_grad():  # the mix matters: the same folder read from its last layer alone is another model
        mixed = model(input_ids=ids, attention_mask=mask).logits
        assert (mixed - without(ids, mask)[0]).abs().max() > 1e-2


@pytest.mark.parametrize("arch,pooling", [("bert", "cls"), ("bert", "label_attention"), ("modernbert", "mean"),
                                          ("modernbert", "label_attention")])
def test_a_layer_mix_over_real_checkpoints_gives_our_logits_in_transformers(tmp_path, arch, pooling):
    """BERT: the packaged MiniLM (6 layers); ModernBERT: a random one written by transformers in
    answerdotai/ModernBERT-base's config layout. Each with a new head and a random mix, saved, then read by
    transformers with the folder's modeling file."""
    if arch == "bert":
        source = minilm_dir()
    else:
        source = str(tmp_path / "reference")
        save_reference(tiny_reference_model("modernbert", 0, layers=4), source)
    model = EncoderClassifier.from_pretrained(source, num_labels=len(LABELS), verbose=False,
                                              overrides={"layer_mix": True, "classifier_pooling": pooling}).eval()
    torch.manual_seed(0)
    randomise_mix(model)
    with torch.no_grad():  # a trained head, not a new one's zero biases
        for p in model.head.parameters():
            p.normal_(0, 0.5)
        if pooling == "label_attention":
            model.label_attention.weight.normal_(0, 1.0)
    model.save_pretrained(tmp_path / "m")
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "m", trust_remote_code=True)
    ids, mask = padded_batch(0, vocab=model.config.vocab_size)  # rows of 20, 13, 5 and 9 tokens
    with torch.no_grad():
        ours = model(ids, mask)[0]
        assert (theirs.eval()(input_ids=ids, attention_mask=mask).logits - ours).abs().max() <= 1e-5
    assert ours.abs().max() > 0.1


def test_windows_are_refused_by_the_onnx_export(tmp_path):
    folder = tiny_folder(tmp_path / "m", "bert", "cls", multi=False, long_docs="windows_mean")
    out = tmp_path / "m.onnx"
    with pytest.raises(SystemExit, match="windows_mean"):
        export_main(["--model", folder, "--output", str(out)])
    assert not out.exists()


def export_main(argv):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import export_onnx
    return export_onnx.main(argv)


def ort_logits(path, folder, batch, batch_size):
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    predictor = Predictor(folder, device="cpu")
    seqs, pad = predictor.encode(batch), predictor.encoder.pad_id
    names = [i.name for i in session.get_inputs()]
    out = []
    for start in range(0, len(seqs), batch_size):
        rows = seqs[start:start + batch_size]
        ids = np.full((len(rows), max(map(len, rows))), pad, np.int64)
        for i, s in enumerate(rows):
            ids[i, :len(s)] = s
        feed = {"input_ids": ids, "attention_mask": (np.arange(ids.shape[1]) < np.array([[len(s)] for s in rows]))
                .astype(np.int64), "token_type_ids": np.zeros_like(ids)}
        out.append(session.run(None, {n: feed[n] for n in names})[0])
    return names, np.concatenate(out), predictor.logits(batch)


@pytest.mark.parametrize("arch,pooling,temperature,layer_mix", [
    ("bert", "cls", None, False), ("bert", "label_attention", 0.7, False), ("bert", "mean", None, False),
    ("modernbert", "label_attention", None, False), ("modernbert", "mean", None, False), ("bert", "cls", None, True),
    ("modernbert", "label_attention", None, True)])
def test_onnx_graph_gives_our_logits_for_every_head(tmp_path, capsys, arch, pooling, temperature, layer_mix):
    pytest.importorskip("onnxruntime")
    folder = tiny_folder(tmp_path / "m", arch, pooling, temperature=temperature, layer_mix=layer_mix)
    out = tmp_path / "model.onnx"
    export_main(["--model", folder, "--output", str(out)])
    assert "max |logit diff|" in capsys.readouterr().out
    for batch_size in (1, 4):  # two batch sizes, texts of 1 to 40 words: the axes are dynamic
        names, theirs, ours = ort_logits(out, folder, texts(), batch_size)
        assert np.abs(theirs - ours).max() <= 1e-4
    assert names == (["input_ids", "attention_mask", "token_type_ids"] if arch == "bert" else
                     ["input_ids", "attention_mask"])
    import onnx
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}  # labels and thresholds travel with it
    assert json.loads(meta["id2label"]) == {str(i): n for i, n in enumerate(LABELS)}
    assert json.loads(meta["thresholds"]) == [0.3, 0.5, 0.6, 0.45]
    if pooling == "label_attention" and arch == "bert":  # int8 once: a second export and a quantization
        export_main(["--model", folder, "--output", str(tmp_path / "model.int8.onnx"), "--int8"])
        assert "int8 against the fp32 graph on 4 texts: the same set of labels for" in capsys.readouterr().out


def test_export_refuses_an_output_that_is_a_file_of_the_model_folder(tmp_path):
    folder = tiny_folder(tmp_path / "m", "bert", "mean")
    before, files = open(os.path.join(folder, "config.json")).read(), sorted(os.listdir(folder))
    for output in (os.path.join(folder, "config.json"), os.path.join(folder, "..", "m", "model.safetensors"), folder):
        with pytest.raises(SystemExit, match="--output"):
            export_main(["--model", folder, "--output", output])
    assert open(os.path.join(folder, "config.json")).read() == before
    assert sorted(os.listdir(folder)) == files  # nothing written, nothing left beside


NO_TORCH = """
import runpy, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError("torch is not installed here (test shim)")
sys.meta_path.insert(0, NoTorch())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("arch,pooling,multi", [("bert", "label_attention", True), ("modernbert", "mean", False)])
def test_labelling_without_torch_gives_predict_labels(tmp_path, arch, pooling, multi):
    pytest.importorskip("onnxruntime")
    folder = tiny_folder(tmp_path / "m", arch, pooling, multi=multi, temperature=1.3)
    graph = tmp_path / "model.onnx"
    export_main(["--model", folder, "--output", str(graph)])
    rows = [{"id": f"r{i}", "text": t} for i, t in enumerate(texts() + texts(seed=1))]
    with open(tmp_path / "notes.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "text"])
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "uses_torch.py").write_text("import torch\n")
    blocked = subprocess.run([sys.executable, "-c", NO_TORCH, str(tmp_path / "uses_torch.py")], capture_output=True,
                             text=True)
    assert blocked.returncode != 0 and "torch is not installed here" in blocked.stderr  # the shim does block torch
    script = os.path.join(ROOT, "scripts", "label_onnx.py")
    done = subprocess.run([sys.executable, "-c", NO_TORCH, script, "--onnx", str(graph), "--model", folder,
                           "--input", str(tmp_path / "notes.csv"), "--output", str(tmp_path / "labels.csv")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    got = list(csv.DictReader(open(tmp_path / "labels.csv")))
    expected = Predictor(folder, device="cpu").predict([r["text"] for r in rows])
    assert [r["id"] for r in got] == [r["id"] for r in rows]
    if multi:
        want = [";".join(x["label"] for x in p["labels"]) for p in expected]
        assert [r["labels"] for r in got] == want and len(set(want)) > 1
    else:
        assert [r["label"] for r in got] == [p["label"] for p in expected]
