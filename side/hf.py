"""Hugging Face checkpoints: their config.json, their weight names, their folders.

LabelsConfig -> BertConfig / ModernBertConfig   our config per architecture (CONFIGS by model_type)
config_from_hf / config_to_hf   config.json dict <-> our config (both ModernBERT layouts, labels, our own keys)
student_layers / keep_layers   a checkpoint loaded with fewer of its encoder layers (--num-layers)
hf_names   our state-dict keys -> the reference's; load_hf_weights and hf_tensors copy through it both ways
read_config / load_state_dict / read_weights / save_folder   a checkpoint folder: config.json and weights, in and out
check_vocab   a tokenizer that fits the model's embedding table

model.py calls these (EncoderModel.load, from_pretrained, save_pretrained); nothing here imports model.py:
load_hf_weights takes the model and calls its methods.
"""
import json
import os
import pickle
import stat
from dataclasses import asdict, dataclass, field, fields, replace

import torch

SINGLE_LABEL = "single_label_classification"
MULTI_LABEL = "multi_label_classification"

# -----------------------------------------------------------------------------
# configs: one dataclass per architecture; defaults are the reference's class defaults, used only
# for keys that config.json leaves out


@dataclass
class LabelsConfig:
    num_labels: int = 2
    id2label: dict = None
    problem_type: str = SINGLE_LABEL
    thresholds: list = None  # multi-label decision thresholds, one per label (tuned on validation data)
    long_document: dict = None  # {"strategy", "max_length"[, "stride"]}: see data.TextEncoder; train.py records it
    # how the token vectors become the head's input (POOLINGS); "cls" is the reference's for both architectures.
    # ModernBERT's config.json has this key; for BERT it is ours (transformers ignores it and uses [CLS])
    classifier_pooling: str = "cls"
    multi_label_loss: str = "bce"  # bce | asl (asymmetric_loss); ours, as the pooling options beyond cls/mean
    hf: dict = field(default_factory=dict, repr=False)  # the original config.json, written back on save

    @property
    def multi_label(self):
        return self.problem_type == MULTI_LABEL


@dataclass
class BertConfig(LabelsConfig):
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    classifier_dropout: float = None
    position_embedding_type: str = "absolute"


@dataclass
class ModernBertConfig(LabelsConfig):
    vocab_size: int = 50368
    hidden_size: int = 768
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    intermediate_size: int = 1152
    hidden_activation: str = "gelu"
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    initializer_cutoff_factor: float = 2.0
    norm_eps: float = 1e-5
    norm_bias: bool = False
    pad_token_id: int = 50283
    attention_bias: bool = False
    attention_dropout: float = 0.0
    layer_types: list = None  # "full_attention" / "sliding_attention" per layer
    global_rope_theta: float = 160000.0
    local_rope_theta: float = 10000.0
    local_attention: int = 128  # total window: a token sees |i - j| <= local_attention // 2
    embedding_dropout: float = 0.0
    mlp_bias: bool = False
    mlp_dropout: float = 0.0
    classifier_dropout: float = 0.0
    classifier_bias: bool = False
    classifier_activation: str = "gelu"
    decoder_bias: bool = True  # the MLM decoder's


CONFIGS = {"bert": BertConfig, "modernbert": ModernBertConfig}


def config_from_hf(hf):
    """Our config from a config.json dict. Every option comes from the file when it has it."""
    model_type = hf.get("model_type")
    if model_type not in CONFIGS:
        raise ValueError(f"unsupported model_type {model_type!r} in config.json; supported: {sorted(CONFIGS)}")
    cls = CONFIGS[model_type]
    known = {f.name for f in fields(cls)} - {"hf", "num_labels", "id2label", "problem_type"}
    kw = {k: v for k, v in hf.items() if k in known}
    if model_type == "modernbert":
        kw.update(_modernbert_layout(hf))
    if model_type == "bert" and hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"position_embedding_type {hf['position_embedding_type']!r} is not supported (only 'absolute')")
    id2label = {int(k): v for k, v in hf["id2label"].items()} if hf.get("id2label") else None
    num_labels = len(id2label) if id2label else hf.get("num_labels", 2)
    problem_type = hf.get("problem_type") or SINGLE_LABEL
    if problem_type not in (SINGLE_LABEL, MULTI_LABEL):
        raise ValueError(f"problem_type {problem_type!r} is not supported; use {SINGLE_LABEL!r} or {MULTI_LABEL!r}")
    return cls(num_labels=num_labels, id2label=id2label, problem_type=problem_type, hf=dict(hf), **kw)


def _modernbert_layout(hf):
    """Layer types and RoPE thetas, from either the original (answerdotai) or the newer config layout."""
    n = hf.get("num_hidden_layers", 22)
    every = hf.get("global_attn_every_n_layers", 3)
    layer_types = hf.get("layer_types") or ["sliding_attention" if i % every else "full_attention" for i in range(n)]
    rope = hf.get("rope_parameters") or {}
    for params in rope.values():
        if params and params.get("rope_type", "default") != "default":
            raise ValueError(f"rope_type {params['rope_type']!r} is not supported (only 'default')")
    if hf.get("rope_scaling"):
        raise ValueError("rope_scaling is not supported")
    full, local = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
    return dict(
        layer_types=list(layer_types),
        global_rope_theta=full.get("rope_theta", hf.get("global_rope_theta", 160000.0)),
        local_rope_theta=local.get("rope_theta", hf.get("local_rope_theta", 10000.0)),
    )


LABEL_KEYS = ("num_labels", "id2label", "label2id", "problem_type", "thresholds", "long_document")


def config_to_hf(config, head="SequenceClassification"):
    """config.json dict: the original file updated with every option we hold. head: the reference class's name after
    the architecture's (BertFor..., ModernBertFor...); a MaskedLM folder has no labels (a classifier sets its own)."""
    hf = dict(config.hf)
    ours = {k: v for k, v in asdict(config).items() if k not in ("hf", "id2label", "thresholds", "long_document")}
    hf.update(ours)
    model_type = "bert" if isinstance(config, BertConfig) else "modernbert"
    hf.update(model_type=model_type, architectures=[("Bert" if model_type == "bert" else "ModernBert") + "For" + head])
    if head == "MaskedLM":
        for key in LABEL_KEYS:
            hf.pop(key, None)
    else:
        id2label = config.id2label or {i: f"LABEL_{i}" for i in range(config.num_labels)}
        hf["id2label"] = {str(i): name for i, name in id2label.items()}
        hf["label2id"] = {name: i for i, name in id2label.items()}
        for key in ("thresholds", "long_document"):
            if getattr(config, key) is not None:
                hf[key] = getattr(config, key)
    if model_type == "modernbert":  # written in both layouts so old and new transformers read the same model
        hf.pop("global_attn_every_n_layers", None)
        every = global_every(config.layer_types)
        if every:  # the old layout's only pattern; a list it cannot express is left to layer_types
            hf["global_attn_every_n_layers"] = every
        hf["rope_parameters"] = {
            "full_attention": {"rope_type": "default", "rope_theta": config.global_rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": config.local_rope_theta},
        }
    return hf


def global_every(layer_types):
    """n where layer i is global exactly when i % n == 0 (global_attn_every_n_layers, the pattern of the
    original config layout); None for a list that follows no such n."""
    for n in range(1, len(layer_types) + 1):
        if all((kind == "full_attention") == (i % n == 0) for i, kind in enumerate(layer_types)):
            return n
    return None


# -----------------------------------------------------------------------------
# smaller students: a checkpoint loaded with fewer of its encoder layers (--num-layers)


def student_layers(num_layers, keep):
    """The layers a student of `keep` layers takes: every s-th from the first, s = num_layers // keep. Half the
    layers: every other one, as DistilBERT was initialised; more than half: the first `keep`. Layer 0 is always
    kept (ModernBERT's first layer is the one without an attention norm), and a constant step keeps ModernBERT's
    pattern regular: layer i*s of "global every n" is global when i is a multiple of n / gcd(n, s)."""
    step = num_layers // keep
    return [i * step for i in range(keep)]


def keep_layers(config, hf_state, keep):
    """config and checkpoint tensors (normalised names) of the student with `keep` of the encoder's layers
    (student_layers), renumbered 0..keep-1. Each layer keeps its attention type (ModernBERT: global or local,
    with its RoPE base): its weights run as they were trained."""
    if not 1 <= keep <= config.num_hidden_layers:
        raise ValueError(f"cannot keep {keep} layers: the checkpoint has {config.num_hidden_layers}")
    kept = student_layers(config.num_hidden_layers, keep)
    prefix = "bert.encoder.layer." if isinstance(config, BertConfig) else "model.layers."
    new_index = {old: new for new, old in enumerate(kept)}
    state = {}
    for key, tensor in hf_state.items():
        if not key.startswith(prefix):
            state[key] = tensor
            continue
        index, rest = key[len(prefix):].split(".", 1)
        if int(index) in new_index:
            state[f"{prefix}{new_index[int(index)]}.{rest}"] = tensor
    changes = {"num_hidden_layers": keep}
    if isinstance(config, ModernBertConfig):
        changes["layer_types"] = [config.layer_types[i] for i in kept]
    return replace(config, **changes), state


# -----------------------------------------------------------------------------
# Hugging Face weight names


def hf_names(c, model_keys):
    """Our state-dict key -> the reference's key(s); several keys are concatenated along dim 0."""
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
                ours + "attn.qkv.*": [hf + f"attention.self.{p}.*" for p in ("query", "key", "value")],
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
            for a, b in [("attn_norm", "attn_norm"), ("attn.qkv", "attn.Wqkv"), ("attn_out", "attn.Wo"),
                         ("mlp_norm", "mlp_norm"), ("wi", "mlp.Wi"), ("wo", "mlp.Wo")]:
                table[ours + a + ".*"] = hf + b + ".*"
    table["window_attention.*"] = "window_attention.*"  # windows_attention only; transformers ignores it
    table["label_attention.*"] = "label_attention.*"  # classifier_pooling label_attention only; likewise
    names = {}  # a pattern without "*" names one tensor
    for pattern, hf in table.items():
        hf = hf if isinstance(hf, list) else [hf]
        for suffix in ("weight", "bias"):
            key = pattern.replace("*", suffix)
            if key in model_keys:
                names[key] = [h.replace("*", suffix) for h in hf]
    return names


def load_hf_weights(model, hf_state):
    """Copy a checkpoint's tensors (Hugging Face names) into model; returns the head weights that were
    initialised fresh instead (none in the checkpoint, or another number of labels: model.NEW_WHEN_MISSING)."""
    ours = model.state_dict()
    names = hf_names(model.config, ours)
    state = normalise_keys(hf_state, model.config)
    missing, fresh, wrong_shape = [], [], []
    for key, sources in names.items():
        if not all(s in state for s in sources):
            if not key.startswith("window_attention."):  # a new one keeps its zeros: the windows' mean
                (fresh if key.startswith(model.NEW_WHEN_MISSING) else missing).append(sources[0])
            continue
        tensor = torch.cat([state[s] for s in sources]) if len(sources) > 1 else state[sources[0]]
        if tensor.shape != ours[key].shape:
            if key.startswith(("head.classifier.", "label_attention.")):  # another number of labels: a new head
                fresh.append(sources[0])
                continue
            wrong_shape.append(f"{sources[0]}: checkpoint {tuple(tensor.shape)}, model {tuple(ours[key].shape)}")
            continue
        ours[key].copy_(tensor)
    used = {s for sources in names.values() for s in sources}
    unexpected = sorted(k for k in state if k not in used and not ignorable(k, model.LEFT_BEHIND))
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
    return fresh


def normalise_keys(state, c):
    """Accept checkpoints with or without the `bert.`/`model.` prefix and with legacy LayerNorm names."""
    prefix = "bert." if isinstance(c, BertConfig) else "model."
    out = {}
    for key, tensor in state.items():
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        top_level = ("classifier.", "head.", "cls.", "decoder.", "window_attention.", "label_attention.")
        bare = not key.startswith(prefix) and not key.startswith(top_level)
        out[prefix + key if bare else key] = tensor
    return out


def ignorable(key, left_behind):
    """Weights the model leaves behind (its LEFT_BEHIND prefixes), and buffers."""
    return key.startswith(left_behind) or key.endswith("position_ids")


def hf_tensors(config, ours):
    """Our weights (state dict ours) under the reference's names (qkv split back into query/key/value for BERT)."""
    out = {}
    for key, sources in hf_names(config, ours).items():
        parts = ours[key].chunk(len(sources)) if len(sources) > 1 else [ours[key]]
        for name, part in zip(sources, parts):
            out[name] = part.contiguous()
    return out


# -----------------------------------------------------------------------------
# checkpoint folders: config.json, the weights, and the tokenizer that goes with them


def read_config(model_dir, num_labels=None, id2label=None, problem_type=None, overrides=None):
    """A checkpoint folder's config.json as our config. Label options replace the checkpoint's; overrides
    set any other field (train.py: dropout, long_document)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {model_dir!r}: not a Hugging Face checkpoint folder")
    with open(path) as f:
        config = config_from_hf(json.load(f))
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
    suffix) and model.safetensors, our weights (state dict ours) under the reference's names."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config_to_hf(config, head), f, indent=2, sort_keys=True)
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
