"""
A fine-tuned folder as one ONNX file, for serving with ONNX Runtime (or Triton) on machines without torch.

    pip install onnxruntime onnx                  # dev dependencies (requirements-dev.txt), not needed at run time
    python scripts/export_onnx.py --model out --output out.onnx
    python scripts/export_onnx.py --model out --output out.int8.onnx --int8 --texts notes.csv

The graph's inputs are the tokenizer's tensors (input_ids, attention_mask, and token_type_ids for BERT), int64
[batch, length] with both axes dynamic; its output is `logits` [batch, labels], predict.py's logits (divided by
the folder's calibration temperature when it has one). Every pooling exports (cls, mean, max, label_attention);
a folder trained on long documents' windows (--long-docs windows_*) is refused. Label names, multi-label
thresholds and the tokenizer stay in the folder (config.json, tokenizer.json): serve the file with them, as
scripts/label_onnx.py does (docs/serving.md). They are also copied into the file's metadata.

Before the file is put in place, its logits under ONNX Runtime (CPU) are checked against ours on texts of several
lengths (--texts, else a built-in few) in batches of 1 and of all: more than 1e-4 apart and nothing is written.
--int8 writes ONNX Runtime's dynamic int8 copy instead and reports its agreement with the fp32 graph on those texts,
as predict.py --int8 does for ours.
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import make_batch, read_table  # noqa: E402
from predict import Predictor  # noqa: E402
from side import files  # noqa: E402
from side.calibrate import KEY  # noqa: E402
from side.infer import int8_agreement  # noqa: E402
from side.onnx_export import export_onnx, input_names, ort_session, quantize_int8, refusal  # noqa: E402

TOLERANCE = 1e-4  # fp32 logits, ONNX Runtime against ours
SAMPLE_TEXTS = [
    "Chest X-ray.",
    "Axial CT of the abdomen shows a hypodense lesion in the right lobe of the liver.",
    "Sagittal T1-weighted MRI of the thoracic spine with contrast demonstrates a homogeneously enhancing mass in "
    "the T7 vertebral body, invading the adjacent discs. " * 12,  # longer than most models' max_length: truncated
    "Ultrasound: normal kidneys, no hydronephrosis.",
]


def write_beside(path, write):
    """write(tmp) into a file beside path, then renamed onto path by the one writer (side/files.py): path is whole
    or untouched, never half written."""
    with files.replacing(path, "the ONNX file", suffix=".onnx") as tmp:
        write(tmp)


def output_problem(output, model_dir):
    """Why output cannot be written (None: it can): a folder, a missing folder, or a file of the model folder."""
    if output in ("", "-"):
        return "--output needs a file name (e.g. model.onnx); the graph is binary, not for stdout"
    if os.path.isdir(output):
        return f"--output {output} is a folder: give a file name, e.g. {os.path.join(output, 'model.onnx')}"
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        return f"--output {output}: the folder {parent} does not exist"
    target = os.path.realpath(output)
    for name in os.listdir(model_dir):
        if os.path.realpath(os.path.join(model_dir, name)) == target and not name.endswith(".onnx"):
            return f"--output {output} is the model folder's {name}: choose another name (e.g. model.onnx)"
    return None


def check_texts(args):
    if not args.texts:
        return SAMPLE_TEXTS
    texts = read_table(args.texts, args.text_column, label_column=[]).texts
    return texts[:args.max_texts]


def ort_logits(session, seqs, pad_id, batch_size):
    """The graph's logits for encoded texts, batch_size at a time, padded as predict.py pads."""
    names = [i.name for i in session.get_inputs()]
    out = []
    for start in range(0, len(seqs), batch_size):
        batch = make_batch(seqs[start:start + batch_size], None, pad_id, packed=False)
        out.append(session.run(None, {n: batch[n].numpy() for n in names})[0])
    return np.concatenate(out)


def add_metadata(path, config):
    """Label names, problem type, thresholds and long-document options in the file's metadata_props."""
    import onnx
    graph = onnx.load(path)
    meta = {"id2label": json.dumps({str(i): n for i, n in config.id2label.items()}),
            "problem_type": config.problem_type, "thresholds": json.dumps(config.thresholds),
            "long_document": json.dumps(config.long_document), "inputs": json.dumps(input_names(config)),
            "logits": f"divided by {KEY}" if KEY in config.hf else "raw"}
    for key, value in meta.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, path)


def export(args, texts):
    predictor = Predictor(args.model, device="cpu")
    model, config = predictor.model, predictor.model.config
    if predictor.names is None:
        raise ValueError(f"{args.model}: config.json has no id2label; export a fine-tuned classifier")
    why = refusal(config)
    if why:
        raise ValueError(f"{args.model}: cannot export: {why}")
    seqs = predictor.encode(texts)
    ours = predictor.score(seqs)
    report = {}

    def write(tmp):
        with tempfile.TemporaryDirectory(prefix=".export-", dir=os.path.dirname(tmp)) as work:  # beside the output
            fp32 = os.path.join(work, "model.onnx")
            export_onnx(model, fp32)
            fp32_logits = ort_logits_checked(fp32, seqs, ours, predictor.encoder.pad_id, report)
            final = fp32
            if args.int8:
                final = os.path.join(work, "model.int8.onnx")
                quantize_int8(fp32, final)
                int8 = ort_logits(ort_session(final), seqs, predictor.encoder.pad_id, len(seqs))
                report["int8"] = int8_agreement(int8, fp32_logits, config.multi_label, predictor.thresholds)
            add_metadata(final, config)
            os.replace(final, tmp)

    with torch.no_grad():
        write_beside(args.output, write)
    print(f"wrote {args.output}: inputs {', '.join(input_names(config))} (int64 [batch, length]); output logits "
          f"[batch, {config.num_labels}]{' (int8 weights)' * args.int8}")
    print(f"fp32 graph against ours on {len(texts)} texts in batches of 1 and {len(texts)}: max |logit diff| "
          f"{report['fp32']:.2e} (at most {TOLERANCE:g})")
    if args.int8:
        a = report["int8"]
        which = "the same set of labels" if config.multi_label else "the same label"
        print(f"int8 against the fp32 graph on {len(texts)} texts: {which} for {a['same_prediction']:.1%}, "
              f"probabilities at most {a['max_probability_difference']:.4f} apart")
    print(f"labels, thresholds and tokenizer: {args.model}/config.json and tokenizer.json (docs/serving.md)")


def ort_logits_checked(path, seqs, ours, pad_id, report):
    """The fp32 graph's logits in batches of 1 and of all the texts, each checked against ours."""
    session = ort_session(path)
    gaps = [np.abs(ort_logits(session, seqs, pad_id, size) - ours).max() for size in (1, len(seqs))]
    report["fp32"] = float(max(gaps))
    if not report["fp32"] <= TOLERANCE:
        raise RuntimeError(f"the ONNX graph's logits are {report['fp32']:.2e} from ours (more than {TOLERANCE:g}): "
                           "nothing written; please report this with the folder's config.json")
    return ort_logits(session, seqs, pad_id, len(seqs))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a fine-tuned classifier folder (train.py's output)")
    p.add_argument("--output", required=True, help="the .onnx file to write (written beside, then renamed)")
    p.add_argument("--int8", action="store_true", help="write ONNX Runtime's dynamic int8 copy of the graph")
    p.add_argument("--texts", default="", help="a .csv/.tsv/.jsonl/.txt file whose texts check the graph "
                   "(default: a few built-in texts of several lengths)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--max-texts", type=int, default=256, help="check at most this many of --texts")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        sys.exit(f"error: --model {args.model}: no config.json there (a train.py output folder is expected)")
    problem = output_problem(args.output, args.model)
    if problem:
        sys.exit(f"error: {problem}")
    if args.max_texts < 1:
        sys.exit("error: --max-texts must be at least 1")
    try:
        export(args, check_texts(args))
    except json.JSONDecodeError as e:
        sys.exit(f"error: {os.path.join(args.model, 'config.json')} is not JSON ({e})")
    except (ValueError, OSError, RuntimeError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
