"""A saved folder whose head transformers has no class for carries its own modeling code, the way Hugging Face's
custom architectures do: config.json names a model_type transformers does not know and an auto_map into
modeling_encoder_classify.py, written here from this project's own pooling functions. With trust_remote_code=True,
AutoModelForSequenceClassification and pipeline() give predict.py's logits; without it, transformers refuses
(it has no class for that model_type) and says to pass trust_remote_code=True, instead of silently loading the
encoder under a head that ignores the pooling.

remote_code(config, hf)   the modeling file's text for a config, or None for a head transformers has (BERT cls,
    ModernBERT cls and mean); sets model_type, architectures and auto_map in the config.json dict hf
standard_head / refusal   which heads transformers computes itself, and what it cannot represent at all

side/weights.py's save_folder writes the file beside config.json. The modeling file imports transformers; nothing
here does, and predict.py never reads the file (it reads config.json and the weights as for any folder).
"""
import inspect

import model as M
from side.hf import BertConfig, remote_model_type

FILE = "modeling_encoder_classify.py"
TEMPERATURE_KEY = "calibration_temperature"  # side/calibrate.py's; predict.py divides the logits by it
# our functions the modeling file runs, copied from model.py: one definition of each pooling
POOLING_SOURCES = (M.first_token, M.classify, M.label_weights, M.packed_mean, M.unpack, M.pool_tokens)


def standard_head(config):
    """Whether transformers' own class computes this head: [CLS] through BERT's pooler, or ModernBERT's cls / mean."""
    if isinstance(config, BertConfig):
        return config.classifier_pooling == "cls"
    return config.classifier_pooling in ("cls", "mean")


def refusal(config):
    """Why transformers cannot run this model at all (None: it can, with our code): a long document's windows are cut
    by our tokenization step, which transformers' one-sequence-per-text forward does not have."""
    strategy = (config.long_document or {}).get("strategy", "head")
    if strategy.startswith("windows_"):
        return (f"this model reads a long document as overlapping windows ({strategy}) cut before the model runs, "
                "which a transformers model (one sequence per text) cannot represent; label with predict.py")
    return None


def remote_code(config, hf):
    """The modeling file for config (our config), or None when transformers' own class is exact (then no remote
    code: hf keeps its standard model_type). Otherwise hf (the config.json dict) gets our model_type, the
    architecture's class and the auto_map that point transformers at the file."""
    if standard_head(config) and refusal(config) is None:
        return None
    arch = "bert" if isinstance(config, BertConfig) else "modernbert"
    name = CLASSES[arch]
    hf["model_type"] = remote_model_type(arch)
    hf["architectures"] = [name + "ForSequenceClassification"]
    stem = FILE.removesuffix(".py")
    hf["auto_map"] = {"AutoConfig": f"{stem}.{name}Config",
                      "AutoModel": f"{stem}.{name}ForSequenceClassification",
                      "AutoModelForSequenceClassification": f"{stem}.{name}ForSequenceClassification"}
    return modeling_file(refusal(config))


CLASSES = {"bert": "EncoderClassifyBert", "modernbert": "EncoderClassifyModernBert"}

HEADER = '''"""Written by encoder-classify (side/remote_code.py) for a head transformers has no class for: classifier_pooling
mean / max / label_attention over BERT, max / label_attention over ModernBERT. Load with trust_remote_code=True:

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    pipeline("text-classification", model=folder, trust_remote_code=True)

Written against transformers 5 (its configs are strict dataclasses). The encoder is transformers' own; the pooling functions below are copies of encoder-classify's model.py. The logits
are divided by config.calibration_temperature when the folder has one, as encoder-classify's predict.py does.
Texts longer than the folder's long_document max_length: tokenize them with truncation=True, max_length=that.
"""
import math

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from torch.nn import functional as F
from transformers import BertConfig, BertModel, BertPreTrainedModel, ModernBertConfig, ModernBertModel
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.modernbert.modeling_modernbert import ModernBertPredictionHead, ModernBertPreTrainedModel

REFUSAL = {refusal!r}
'''

CLASSES_SOURCE = '''

class EncoderClassifyBertConfig(BertConfig):
    model_type = "{bert_type}"
    classifier_pooling: str = "mean"


@strict  # the field below replaces ModernBertConfig's, which allows cls and mean only
class EncoderClassifyModernBertConfig(ModernBertConfig):
    model_type = "{modernbert_type}"
    classifier_pooling: str = "label_attention"


def refuse_unrepresentable():
    if REFUSAL:
        raise ValueError("encoder-classify: " + REFUSAL)


class PoolingHead:
    """pool_tokens over the encoder's last hidden states, the head, our calibration temperature, and the loss."""

    def add_pooling(self, config):
        refuse_unrepresentable()
        if config.classifier_pooling == "label_attention":
            self.label_attention = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def pooled_logits(self, hidden, attention_mask, head, labels):
        pooled = pool_tokens(hidden, self.config.classifier_pooling, attention_mask,
                             label_attention=getattr(self, "label_attention", None))
        logits = head(pooled)
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
        self.bert = BertModel(config)  # its pooler is kept (the weights are in the folder) and unused
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.add_pooling(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        return self.pooled_logits(hidden, attention_mask, lambda x: classify(self.classifier, self.dropout(x)), labels)


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
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.pooled_logits(hidden, attention_mask,
                                  lambda x: classify(self.classifier, self.drop(self.head(x))), labels)
'''


def modeling_file(refused=None):
    """The modeling file's text: the header, our pooling functions' own source, the classes."""
    functions = "\n\n".join(inspect.getsource(f) for f in POOLING_SOURCES)
    classes = CLASSES_SOURCE.format(bert_type=remote_model_type("bert"),
                                    modernbert_type=remote_model_type("modernbert"),
                                    temperature_key=TEMPERATURE_KEY)
    return HEADER.format(refusal=refused) + "\n\n" + functions + classes
