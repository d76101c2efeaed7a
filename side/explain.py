"""Evidence for predicted labels (predict.py --explain, Predictor.explain): the words of a text that each predicted
label came from, as character spans of the original text, so that a coder can check a code against the words.

documents    the text's tokens with their character offsets and words (the tokenizer's Encoding), and which token
    each position of each model sequence holds, for every long-document strategy (truncated, or windows)
token / word scores, by one of METHODS:
    attention              label_attention heads only: each label's own softmax over the tokens; 1 forward pass
    gradient               |input x gradient| of the label's score w.r.t. the word embeddings; 1 forward + 1
                           backward per predicted label
    integrated_gradients   input . gradient averaged over `steps` points between a zero embedding and the text's
    occlusion              the drop of the label's probability when one word's tokens are deleted; 1 forward per word
spans        the best words, neighbours merged, top K per label: {"start", "end", "text", "score"}, text[start:end]
HtmlItems    the first items of a run, for side/explain_html.py's page (predict.py --explain-html)

A label's score is its log-probability (single-label: evidence for this class against the others) or its logit
(multi-label: each label on its own). Token scores come from the fp32 model, never under autocast.
"""
import json
import math
from dataclasses import dataclass

import numpy as np
import torch

from data import make_batch, split_windows, to_device, truncate
from metrics import sigmoid, softmax
from model import label_weights
from side.explain_html import page_item, write_page
from side.infer import predict_logits

METHODS = ("attention", "gradient", "integrated_gradients", "occlusion")
IG_STEPS = 16  # integrated gradients' interpolation points (Riemann midpoints): 16 puts most checkpoints' sum
# of attributions within a few percent of the logit's change from the baseline
SPAN_WORDS_SHARE = 0.1  # spans are built from the best tenth of a text's words (at least `top` of them)
BATCH_TOKENS = 4096  # padded tokens per batch of docs to explain (the model's sequences: windows count)
HTML_ITEMS = 5000  # --explain-html keeps this many texts in memory for its page


def default_method(model):
    """The method --explain uses unless told: the most faithful per unit of cost (docs/explain.md#faithfulness,
    scripts/faithfulness.py). A label_attention head's own weights cost one forward pass and pick words whose
    removal costs the label most; other heads have no such weights: input x gradient, 1 forward + 1 backward."""
    return "attention" if model.pooling == "label_attention" else "gradient"


def method_problem(model, method):
    """Why the model cannot be explained by method, or None."""
    if method not in METHODS:
        return f"explain method {method!r} is not one of {METHODS}"
    if method == "attention" and model.pooling != "label_attention":
        return (f"explain method 'attention' reads a label_attention head's weights; this checkpoint pools "
                f"{model.pooling!r}: use gradient, integrated_gradients or occlusion")
    return None


def option_problems(explain, html, not_predictions, pairs, in_parts):
    """predict.py's options that do not go with --explain (explain) or --explain-html (html): not_predictions
    (--embeddings, --label-column), pairs (--text-pair-column), in_parts (--resume, --shard, torchrun)."""
    bad = []
    if explain and not_predictions:
        bad.append("--explain gives predicted labels their evidence: not with --embeddings or --label-column")
    if explain and pairs:
        bad.append("--explain does not explain text pairs (character offsets into two texts are out of scope): "
                   "leave out --text-pair-column or --explain")
    if html and in_parts:
        bad.append("--explain-html writes its page in one pass of one process: not with --resume, --shard or "
                   "torchrun (use --explain, whose evidence goes into --output)")
    return bad


# ----------------------------------------------------------------------------- tokens, words, positions

@dataclass
class Doc:
    """A text's token ids (no special tokens), the word of each token, each word's character span in the text
    (whitespace trimmed), and `pieces`: the token indices each model sequence holds in order (one piece when the
    text is truncated, one per window with windows_*)."""
    text: str
    ids: list
    word_of: list
    words: list
    pieces: list


def documents(encoder, texts):
    """Docs of texts, cut as encoder (data.TextEncoder) cuts them: truncate or split_windows applied to token
    indices instead of ids, so that each position of a sequence names its token in the whole text."""
    docs = []
    for text, e in zip(texts, encoder.tokenizer.encode_batch(list(texts), add_special_tokens=False)):
        index = list(range(len(e.ids)))
        pieces = (split_windows(index, encoder.budget, encoder.stride) if encoder.windows else
                  [truncate(index, encoder.budget, encoder.strategy)])
        word_of, words, key_of = [], [], {}
        for i, (word, (start, end)) in enumerate(zip(e.word_ids, e.offsets)):
            key = ("token", i) if word is None else word  # a token outside any word (an added token) is its own
            if key not in key_of:
                key_of[key] = len(words)
                words.append([start, end])
            w = words[key_of[key]]
            w[0], w[1] = min(w[0], start), max(w[1], end)
            word_of.append(key_of[key])
        docs.append(Doc(text, list(e.ids), word_of, [trimmed(text, *w) for w in words], pieces))
    return docs


def trimmed(text, start, end):
    """(start, end) without the whitespace at either end (a byte-level BPE token carries the space before it)."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def model_input(encoder, doc, kept=None):
    """The model's input for the doc (its ids, or its windows' ids); or with only the kept token indices, deleted
    from each sequence in place: a window keeps its neighbours' context (cut anew, deleting one word would shift
    every later window), and one left with nothing is dropped (unless all are)."""
    wrap = lambda piece: encoder.prefix + [doc.ids[i] for i in piece] + encoder.suffix
    pieces = doc.pieces
    if kept is not None:
        kept = set(kept)
        pieces = [[t for t in piece if t in kept] for piece in pieces]
        pieces = [piece for piece in pieces if piece] or pieces[:1]
    return [wrap(p) for p in pieces] if encoder.windows else wrap(pieces[0])


def seen(doc):
    """The token indices the model reads, in order: each once, though two windows share it."""
    return sorted(set().union(*map(set, doc.pieces)))


def row_ranges(docs):
    """The rows (sequences) of each doc in a batch of docs: one each, or one per window."""
    ends = np.cumsum([len(doc.pieces) for doc in docs])
    return [range(end - len(doc.pieces), end) for doc, end in zip(docs, ends)]


def to_tokens(doc, prefix, position_scores):
    """The scores [pieces, T] of the positions of a doc's sequences -> a score per text token (NaN where unseen;
    special tokens and padding get none). A token that two windows share gets the larger of its two scores:
    the evidence the model found there at best (a sum would favour the overlaps; a mean would hide a word that
    only one window's context makes count)."""
    scores = np.full(len(doc.ids), np.nan, np.float32)
    for piece, values in zip(doc.pieces, position_scores):
        scores[piece] = np.fmax(scores[piece], values[prefix:prefix + len(piece)])
    return scores


def word_scores(doc, token_scores):
    """A word's score: the sum of its seen tokens' scores (a word's share of attention, or of the gradient, is
    that of all its pieces), NaN for a word the model never saw."""
    scores = np.full(len(doc.words), np.nan, np.float32)
    for token, word in enumerate(doc.word_of):
        if not np.isnan(token_scores[token]):
            scores[word] = np.nan_to_num(scores[word]) + token_scores[token]
    return scores


# ----------------------------------------------------------------------------- methods

def scores(model, encoder, docs, targets, method, batch_size=16, amp="off", steps=IG_STEPS):
    """Per doc, {label index: word scores} for the label indices in its targets, by method."""
    problem = method_problem(model, method)
    if problem:
        raise ValueError(problem)
    if method == "occlusion":
        return [occlusion(model, encoder, doc, labels, batch_size, amp) for doc, labels in zip(docs, targets)]
    device, out = next(model.parameters()).device, []
    for start, stop in doc_batches(docs, batch_size):
        part, wanted = docs[start:stop], targets[start:stop]
        inputs = [model_input(encoder, doc) for doc in part]
        batch = to_device(make_batch(inputs, None, encoder.pad_id, encoder.windows, packed=False), device)
        positions = (attention(model, batch, part, wanted) if method == "attention" else gradients(
            model, batch, part, wanted, len(encoder.prefix), None if method == "gradient" else steps))
        out += [{label: word_scores(doc, to_tokens(doc, len(encoder.prefix), p)) for label, p in found.items()}
                for doc, found in zip(part, positions)]
    return out


def doc_batches(docs, batch_size, max_tokens=BATCH_TOKENS):
    """(start, stop) of consecutive docs in batches of at most batch_size docs and max_tokens padded tokens (a
    longer doc goes alone): a backward pass keeps every layer's activations."""
    start, rows, longest = 0, 0, 0
    for i, doc in enumerate(docs):
        size = max(len(p) for p in doc.pieces)
        if i > start and (i - start == batch_size or (rows + len(doc.pieces)) * max(longest, size) > max_tokens):
            yield start, i
            start, rows, longest = i, 0, 0
        rows, longest = rows + len(doc.pieces), max(longest, size)
    if docs:
        yield start, len(docs)


@torch.no_grad()
def attention(model, batch, docs, wanted):
    """Per doc, {label: each of its sequences' softmax weights over their positions}, from the label_attention
    head (the weights its pooling gives the tokens for that label)."""
    kept = []
    handle = model.label_attention.register_forward_hook(lambda module, inputs, output: kept.append(output))
    try:
        model(**batch)
    finally:
        handle.remove()
    weights = label_weights(kept[0], batch["attention_mask"].bool()).cpu().numpy()  # [rows, T, labels]
    return [{label: weights[rows, :, label] for label in labels} for rows, labels in zip(row_ranges(docs), wanted)]


class WordEmbeddings:
    """A forward hook on the encoder's word embeddings (model.py stays as it is): their output becomes a leaf that
    gradients reach, its text positions scaled by alpha (integrated gradients' path from a zero embedding)."""

    def __init__(self, model, text_mask, alpha):
        self.word, self.text_mask, self.alpha = model.encoder.word, text_mask, alpha

    def __enter__(self):
        self.handle = self.word.register_forward_hook(self.hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def hook(self, module, inputs, output):
        self.embedded = output.detach()
        scaled = torch.where(self.text_mask[..., None], self.embedded * self.alpha, self.embedded)
        self.input = scaled.requires_grad_()
        return self.input


def gradients(model, batch, docs, wanted, prefix, steps):
    """Per doc, {label: a score per position of each of its sequences} from the gradient of the label's score
    (log-probability; multi-label: logit) w.r.t. the word embeddings x. steps None (gradient): |x * grad|, the L2
    norm; its sign was noise (docs/explain.md#faithfulness: the dot product removed words no better than random
    ones, the norm's comprehensiveness was 0.95 against 0.51 on the captions). steps N (integrated gradients):
    x . grad averaged over N points on the way from a zero embedding, signed, so that the scores add up to the
    score's change from that baseline. Special tokens keep their embeddings on the way. The j-th label of every
    doc shares one backward pass: docs do not mix."""
    rows = row_ranges(docs)
    text_mask = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    for doc, doc_rows in zip(docs, rows):
        for row, piece in zip(doc_rows, doc.pieces):
            text_mask[row, prefix:prefix + len(piece)] = True
    alphas = [1.0] if steps is None else [(k + 0.5) / steps for k in range(steps)]
    totals = [{label: 0.0 for label in labels} for labels in wanted]
    slots = max(map(len, wanted), default=0)
    for alpha in alphas:
        with WordEmbeddings(model, text_mask, alpha) as hook, torch.enable_grad():
            logits = model(**batch)[0].float()
            values = logits if model.config.multi_label else logits.log_softmax(dim=-1)
            for slot in range(slots):
                chosen = [(i, labels[slot]) for i, labels in enumerate(wanted) if len(labels) > slot]
                target = values[[i for i, _ in chosen], [label for _, label in chosen]].sum()
                grad, = torch.autograd.grad(target, hook.input, retain_graph=slot < slots - 1)
                product = grad * hook.embedded
                position = (product.norm(dim=-1) if steps is None else product.sum(-1)).cpu().numpy() / len(alphas)
                for i, label in chosen:
                    totals[i][label] = totals[i][label] + position[rows[i]]
    return totals


def occlusion(model, encoder, doc, labels, batch_size=16, amp="off"):
    """{label: each seen word's drop of the label's probability when its tokens are deleted}: one forward pass
    per word, all labels at once."""
    visible = seen(doc)
    words = sorted({doc.word_of[token] for token in visible})
    variants = [model_input(encoder, doc)] + [
        model_input(encoder, doc, [t for t in visible if doc.word_of[t] != word]) for word in words]
    logits = predict_logits(model, variants, encoder.pad_id, batch_size, amp, packed=False)
    probabilities = sigmoid(logits) if model.config.multi_label else softmax(logits)
    drops = np.full((len(doc.words), probabilities.shape[1]), np.nan, np.float32)
    drops[words] = probabilities[0] - probabilities[1:]
    return {label: drops[:, label] for label in labels}


# ----------------------------------------------------------------------------- spans

def spans(doc, scores, top):
    """The top spans of a label: its best words (the best SPAN_WORDS_SHARE of the seen words, at least `top`,
    only those scored above 0: evidence for the label), neighbours with only whitespace between them merged
    into one span scored by the sum of its words; best first, ties by position."""
    finite = np.flatnonzero(np.isfinite(scores))
    count = max(top, math.ceil(SPAN_WORDS_SHARE * len(finite)))
    candidates = [w for w in finite.tolist() if scores[w] > 0 and doc.words[w][0] < doc.words[w][1]]
    best = sorted(candidates, key=lambda w: (-scores[w], w))[:count]
    runs = []
    for w in sorted(best, key=lambda w: doc.words[w]):
        start, end = doc.words[w]
        if runs and runs[-1][1] <= start and not doc.text[runs[-1][1]:start].strip():
            runs[-1][1], runs[-1][2] = end, runs[-1][2] + float(scores[w])
        else:
            runs.append([start, end, float(scores[w])])
    runs.sort(key=lambda run: (-run[2], run[0]))
    return [{"start": s, "end": e, "text": doc.text[s:e], "score": round(score, 6)} for s, e, score in runs[:top]]


def evidence(model, encoder, texts, targets, top=3, method=None, batch_size=16, amp="off", steps=IG_STEPS):
    """Per text, {label index: its top spans} for the label indices in its targets."""
    docs = documents(encoder, texts)
    found = scores(model, encoder, docs, targets, method or default_method(model), batch_size, amp, steps)
    return [{label: spans(doc, s, top) for label, s in f.items()} for doc, f in zip(docs, found)]


def add_evidence(model, encoder, texts, predictions, names, top=3, method=None, batch_size=16, amp="off"):
    """Predictor.predict's predictions of texts, each predicted label with its "evidence" (single-label: the
    prediction's own; multi-label: each object of its "labels")."""
    index = {name: i for i, name in enumerate(names)}
    chosen = [label_objects(p) for p in predictions]
    found = evidence(model, encoder, texts, [[index[x["label"]] for x in c] for c in chosen], top, method,
                     batch_size, amp)
    for labels, spans_of in zip(chosen, found):
        for x in labels:
            x["evidence"] = spans_of[index[x["label"]]]
    return predictions


def label_objects(prediction):
    """A prediction's predicted labels as objects: multi-label's "labels", or the single-label prediction itself."""
    return prediction["labels"] if "labels" in prediction else [prediction]


def evidence_cell(prediction):
    """A prediction's evidence in one CSV cell: JSON {label: [[start, end, score], ...]}, scores to 4 decimals."""
    return json.dumps({x["label"]: [[s["start"], s["end"], round(s["score"], 4)] for s in x["evidence"]]
                       for x in label_objects(prediction)}, ensure_ascii=False)


# ----------------------------------------------------------------------------- the page

class HtmlItems:
    """The first `limit` texts of a run with their predicted labels and evidence, for side/explain_html.py's page
    (predict.py --explain-html): written once, at the end of the run."""

    def __init__(self, path, title, limit=None):
        self.path, self.title, self.limit, self.items, self.total = path, title, limit or HTML_ITEMS, [], 0

    def add(self, records, texts, predictions, gold=None):
        """gold: each text's true labels (--label-column), or None."""
        for i, (record, text, p) in enumerate(zip(records, texts, predictions)):
            self.total += 1
            if len(self.items) < self.limit:
                self.items.append(page_item(p, text, record_id(record), None if gold is None else gold[i]))

    def write(self):
        note = None if self.total <= self.limit else f"showing the first {self.limit} of {self.total} texts"
        write_page(self.path, self.items, self.title, note)
        return self.path


def record_id(record):
    """A row's id, for the page: its column id (else the first ending in _id), as text; None without one."""
    names = sorted((k for k in record if k.lower() == "id" or k.lower().endswith("_id")), key=lambda k: k != "id")
    return None if not names or record[names[0]] is None else str(record[names[0]])
