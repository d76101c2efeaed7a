"""Hugging Face configs: config.json <-> our config per architecture, and students of fewer layers.

LabelsConfig -> BertConfig / ModernBertConfig   our config per architecture (CONFIGS by model_type)
config_from_hf / config_to_hf   config.json dict <-> our config (both ModernBERT layouts, labels, our own keys)
remote_model_type / base_model_type   the model_type of a folder with our modeling code (side/remote_code.py)
student_layers / keep_layers   a checkpoint loaded with fewer of its encoder layers (--num-layers)
dropout_overrides   train.py's dropout options -> the architecture's config.json fields
Weight names, loading and saving folders: side/weights.py. Nothing here imports model.py.
"""
from dataclasses import asdict, dataclass, field, fields, replace

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
    # how the token vectors become the head's input: a name in model.POOLINGS; "cls" is the reference's for both
    # architectures. ModernBERT's config.json has this key; for BERT it is ours (transformers ignores it: [CLS])
    classifier_pooling: str = "cls"
    multi_label_loss: str = "bce"  # a name in model.MULTI_LABEL_LOSSES; ours, as the poolings beyond cls/mean
    layer_mix: bool = False  # ours: the pooling reads a learned mix of all hidden states (model.LayerMix)
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
# a folder that carries our modeling code (side/remote_code.py) names a model_type transformers does not know, so that
# transformers refuses it without trust_remote_code=True instead of loading the encoder under another head
REMOTE_PREFIX = "encoder_classify_"


def remote_model_type(model_type):
    return REMOTE_PREFIX + model_type


def base_model_type(model_type):
    """bert / modernbert, for a standard folder's model_type and for one with our modeling code alike."""
    return model_type.removeprefix(REMOTE_PREFIX) if isinstance(model_type, str) else model_type


def config_from_hf(hf):
    """Our config from a config.json dict. Every option comes from the file when it has it."""
    model_type = base_model_type(hf.get("model_type"))
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
    if not isinstance(hf.get("layer_mix", False), bool):
        raise ValueError(f"layer_mix {hf['layer_mix']!r} in config.json must be true or false")
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
    hf.pop("auto_map", None)  # side/remote_code.py sets it again where this head needs our modeling code
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
    if "layer_mix.weights" in state:  # a classifier's layer mix: the embedding output's weight and the kept layers'
        state["layer_mix.weights"] = state["layer_mix.weights"][[0] + [i + 1 for i in kept]]
    changes = {"num_hidden_layers": keep}
    if isinstance(config, ModernBertConfig):
        changes["layer_types"] = [config.layer_types[i] for i in kept]
    return replace(config, **changes), state


def dropout_overrides(model_type, hidden=None, attention=None, classifier=None):
    """Our dropout options -> the architecture's config.json fields (None keeps the checkpoint's)."""
    bert = base_model_type(model_type) == "bert"
    names = {"hidden": ["hidden_dropout_prob"] if bert else ["embedding_dropout", "mlp_dropout"],
             "attention": ["attention_probs_dropout_prob"] if bert else ["attention_dropout"],
             "classifier": ["classifier_dropout"]}
    given = {"hidden": hidden, "attention": attention, "classifier": classifier}
    return {key: given[ours] for ours, keys in names.items() for key in keys if given[ours] is not None}
