"""A saved folder whose head transformers has no class for carries its own modeling code, the way Hugging Face's
custom architectures do: config.json names a model_type transformers does not know and an auto_map into
modeling_encoder_classify.py, written here from this project's own pooling functions. With trust_remote_code=True,
AutoModelForSequenceClassification and pipeline() give predict.py's logits; without it, transformers refuses
(it has no class for that model_type) and says to pass trust_remote_code=True, instead of silently loading the
encoder under a head that ignores the pooling.

remote_code(config, hf)   the modeling file's text for a config, or None for a head transformers has (BERT cls,
    ModernBERT cls and mean, without a layer mix); sets model_type, architectures and auto_map in the config.json
    dict hf
standard_head   the heads transformers computes itself (a long document's windows are not among them)

side/weights.py's save_folder writes the file beside config.json. The modeling file imports transformers; nothing
here does, and predict.py never reads the file (it reads config.json and the weights as for any folder).
"""
import inspect

import data as D
import model as M
import side.layer_mix as L
import side.windows as W
from side.calibrate import KEY  # the calibration temperature in config.json; predict.py divides the logits by it
from side.hf import BertConfig, remote_model_type

FILE = "modeling_encoder_classify.py"
# our functions the modeling file runs, copied from data.py, model.py, side/windows.py and side/layer_mix.py: one
# definition of each cut, pooling and mix
# (every entry of model.POOLINGS is copied with its function, so a new pooling travels without a change here)
SOURCES = (D.truncate, D.split_windows, M.first_token, M.classify, M.label_weights, M.unpack, *M.POOLINGS.values(),
           M.pool_tokens, L.LayerMix, W.window_aggregation, W.segment_reduce, W.weigh_windows, W.per_document)


def standard_head(config):
    """Whether transformers' own class computes this head: [CLS] through BERT's pooler, or ModernBERT's cls / mean,
    from the last hidden state (a layer mix is ours)."""
    if config.layer_mix:
        return False
    if isinstance(config, BertConfig):
        return config.classifier_pooling == "cls"
    return config.classifier_pooling in ("cls", "mean")


def remote_code(config, hf):
    """The modeling file for config (our config), or None when transformers' own class is exact (then no remote
    code: hf keeps its standard model_type). Otherwise hf (the config.json dict) gets our model_type, the
    architecture's class and the auto_map that point transformers at the file."""
    if standard_head(config) and not (config.long_document or {}).get("strategy", "head").startswith("windows_"):
        return None
    arch = "bert" if isinstance(config, BertConfig) else "modernbert"
    name = CLASSES[arch]
    hf["model_type"] = remote_model_type(arch)
    hf["architectures"] = [name + "ForSequenceClassification"]
    stem = FILE.removesuffix(".py")
    hf["auto_map"] = {"AutoConfig": f"{stem}.{name}Config",
                      "AutoModel": f"{stem}.{name}ForSequenceClassification",
                      "AutoModelForSequenceClassification": f"{stem}.{name}ForSequenceClassification"}
    return modeling_file()


CLASSES = {"bert": "EncoderClassifyBert", "modernbert": "EncoderClassifyModernBert"}

HEADER = '''"""Written by encoder-classify (side/remote_code.py) for a head transformers has no class for:
classifier_pooling mean / max / label_attention over BERT, max / label_attention over ModernBERT, a learned mix of the
encoder's layers (layer_mix), and long documents read as windows.
Load with trust_remote_code=True:

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    pipeline("text-classification", model=folder, trust_remote_code=True)

Written against transformers 5 (its configs are strict dataclasses). The encoder is transformers' own; the functions
below are copies of encoder-classify's data.py and model.py. The logits are divided by config.calibration_temperature
when the folder has one, as encoder-classify's predict.py does. Give whole texts (no truncation): a text longer than
config.long_document's max_length is cut here as encoder-classify cuts it (its head, tail or head_tail, or windows
whose predictions are combined), taking the first and last token of each text as its special tokens ([CLS] ... [SEP]).
Text pairs are not cut: truncate them yourself.
"""
import math

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from torch.nn import functional as F
from transformers import BertConfig, BertModel, BertPreTrainedModel, ModernBertConfig, ModernBertModel
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.modernbert.modeling_modernbert import ModernBertPredictionHead, ModernBertPreTrainedModel
'''

CLASSES_SOURCE = '''

@strict
class EncoderClassifyBertConfig(BertConfig):
    model_type = "{bert_type}"
    classifier_pooling: str = "mean"
    layer_mix: bool = False


@strict  # the field below replaces ModernBertConfig's, which allows cls and mean only
class EncoderClassifyModernBertConfig(ModernBertConfig):
    model_type = "{modernbert_type}"
    classifier_pooling: str = "label_attention"
    layer_mix: bool = False


def recut(input_ids, attention_mask, token_type_ids, long_document, pad_id):
    """Each text cut as encoder-classify's tokenizer step cuts it (long_document: strategy, max_length, stride):
    (input_ids, attention_mask, doc_index) with one row per window (doc_index: its text) or per text (None), or
    None when nothing needs cutting (no text is longer than max_length, no windows)."""
    cut = long_document or dict()
    strategy, length = cut.get("strategy", "head"), cut.get("max_length")
    windows = strategy.startswith("windows_")
    lengths = attention_mask.sum(1)
    pair = token_type_ids is not None and bool(token_type_ids.any())
    if pair or not length or not (windows or int(lengths.max()) > length):
        return None
    budget = length - 2  # [CLS] and [SEP] around each piece
    rows, doc_index = [], []
    for b in range(len(input_ids)):
        ids = input_ids[b][attention_mask[b].bool()].tolist()  # right or left padded
        content = ids[1:-1]
        pieces = split_windows(content, budget, cut.get("stride") or max(budget // 2, 1)) if windows else [
            truncate(content, budget, strategy)]
        rows += [ids[:1] + piece + ids[-1:] for piece in pieces]
        doc_index += [b] * len(pieces)
    longest = max(len(r) for r in rows)
    new_ids = torch.full((len(rows), longest), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    new_mask = torch.zeros_like(new_ids)
    for i, r in enumerate(rows):
        new_ids[i, :len(r)] = torch.tensor(r, dtype=input_ids.dtype)
        new_mask[i, :len(r)] = 1
    index = torch.tensor(doc_index, device=input_ids.device) if windows else None
    return new_ids, new_mask, index


class PoolingHead:
    """The texts cut as encoder-classify cuts them, pool_tokens over the encoder's last hidden states (or their
    LayerMix), the head (one row per text, long documents' windows combined), our calibration temperature, and the
    loss."""

    def add_pooling(self, config):
        if config.classifier_pooling == "label_attention":
            self.label_attention = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.mixes = config.layer_mix  # encode gives every hidden state, which LayerMix mixes
        if self.mixes:
            self.layer_mix = LayerMix(config.num_hidden_layers + 1)
        strategy = (getattr(config, "long_document", None) or dict()).get("strategy", "head")
        self.aggregation = window_aggregation(strategy)
        if self.aggregation == "attention":
            self.window_attention = nn.Linear(config.hidden_size, 1, bias=False)

    def logits_of(self, input_ids, attention_mask, token_type_ids, encode, head, labels):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        num_texts, doc_index = len(input_ids), None
        cut = recut(input_ids, attention_mask, token_type_ids, getattr(self.config, "long_document", None),
                    self.config.pad_token_id or 0)
        if cut is not None:
            input_ids, attention_mask, doc_index = cut
            token_type_ids = None if token_type_ids is None else torch.zeros_like(input_ids)
        hidden = encode(input_ids, attention_mask, token_type_ids)
        if self.mixes:
            hidden = self.layer_mix(hidden)
        pooled = pool_tokens(hidden, self.config.classifier_pooling, attention_mask,
                             label_attention=getattr(self, "label_attention", None))
        if doc_index is None:
            logits = head(pooled)
        else:
            logits = per_document(pooled, doc_index, num_texts, self.aggregation,
                                  getattr(self, "window_attention", None), head)
        loss = None
        if labels is not None:
            if self.config.problem_type == "multi_label_classification":
                loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
            else:
                loss = F.cross_entropy(logits.view(-1, self.config.num_labels), labels.view(-1))
        temperature = getattr(self.config, "{temperature_key}", None)
        if temperature is not None:
            logits = logits / torch.as_tensor(temperature, dtype=logits.dtype, device=logits.device)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class EncoderClassifyBertForSequenceClassification(PoolingHead, BertPreTrainedModel):
    config_class = EncoderClassifyBertConfig

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config)  # its pooler's weights are in the folder; the head uses them with cls pooling
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.add_pooling(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        return self.logits_of(input_ids, attention_mask, token_type_ids, self.encode, self.head, labels)

    def encode(self, ids, mask, types):
        """The last hidden state; with a layer mix, every one: the embedding output, then each layer's."""
        out = self.bert(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=self.mixes)
        return list(out.hidden_states) if self.mixes else out.last_hidden_state

    def head(self, pooled):
        if self.config.classifier_pooling == "cls":  # [CLS] through BERT's pooler, as BertForSequenceClassification
            pooled = torch.tanh(self.bert.pooler.dense(pooled))
        return classify(self.classifier, self.dropout(pooled))


class EncoderClassifyModernBertForSequenceClassification(PoolingHead, ModernBertPreTrainedModel):
    config_class = EncoderClassifyModernBertConfig

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = ModernBertModel(config)
        self.head = ModernBertPredictionHead(config)
        self.drop = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.add_pooling(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        head = lambda x: classify(self.classifier, self.drop(self.head(x)))
        return self.logits_of(input_ids, attention_mask, None, self.encode, head, labels)

    def encode(self, ids, mask, types):
        """The last hidden state; with a layer mix, every one through final_norm, as encoder-classify mixes them.
        hidden_states holds each layer's input (pre-LN, without the final norm), then the last layer's output: after
        final_norm in transformers 5, before it in 4. So the norm goes on all but that one, which last_hidden_state
        gives after the norm in either."""
        out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=self.mixes)
        if not self.mixes:
            return out.last_hidden_state
        return [self.model.final_norm(h) for h in out.hidden_states[:-1]] + [out.last_hidden_state]
'''


def modeling_file():
    """The modeling file's text: the header, our functions' own source, the classes."""
    functions = "\n\n".join(inspect.getsource(f) for f in SOURCES)
    table = ", ".join(f'"{name}": {f.__name__}' for name, f in M.POOLINGS.items())
    functions = functions.replace("\n\ndef pool_tokens(", f"\n\nPOOLINGS = {{{table}}}\n\n\ndef pool_tokens(", 1)
    classes = CLASSES_SOURCE.format(bert_type=remote_model_type("bert"),
                                    modernbert_type=remote_model_type("modernbert"),
                                    temperature_key=KEY)
    return HEADER + "\n\n" + functions + classes
