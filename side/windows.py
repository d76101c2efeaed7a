"""Long documents read as overlapping windows (train.py / predict.py --long-docs windows_*): data.py cuts each text
into windows, the encoder reads each window as its own sequence, and these functions turn the windows' rows back
into one row per document, with segment ops (no loop over documents).

window_aggregation   the strategy's name -> how its windows combine (max, mean, attention), or None
per_document -> segment_reduce (max, mean of the windows' logits) or weigh_windows (a learned softmax over them)
"""
import math


def window_aggregation(strategy):
    """windows_max / windows_mean / windows_attention -> "max" / "mean" / "attention"; None for the
    strategies that truncate (one sequence per text)."""
    if not strategy.startswith("windows_"):
        return None
    if strategy not in ("windows_max", "windows_mean", "windows_attention"):
        raise ValueError(f"long-document strategy {strategy!r} is not supported")
    return strategy.removeprefix("windows_")


def segment_reduce(values, doc_index, num_docs, how):
    """Rows of values [W, ...] -> [num_docs, ...]: the max ("max") or mean ("mean") of each document's rows, with a
    segment op (no loop over documents)."""
    out = values.new_zeros(num_docs, *values.shape[1:])
    index = doc_index.view(-1, *[1] * (values.dim() - 1)).expand_as(values)
    return out.scatter_reduce(0, index, values, "amax" if how == "max" else "mean", include_self=False)


def weigh_windows(window_attention, pooled, doc_index, num_docs):
    """A softmax over each document's windows weighs their vectors: [W, H] -> [num_docs, H]. window_attention
    scores each window (a Linear to one score)."""
    scores = window_attention(pooled).squeeze(-1).float()  # float: a stable softmax under autocast
    top = scores.new_full((num_docs,), -math.inf).scatter_reduce(0, doc_index, scores.detach(), "amax")
    e = (scores - top[doc_index]).exp()
    weights = e / e.new_zeros(num_docs).index_add(0, doc_index, e)[doc_index]
    weighted = weights[:, None].to(pooled.dtype) * pooled
    return pooled.new_zeros(num_docs, pooled.shape[-1]).index_add(0, doc_index, weighted)


def per_document(pooled, doc_index, num_docs, how, window_attention=None, head=None):
    """Window vectors [W, H] -> one row per document, with segment ops (no loop over documents), as head reads them
    (None: the vectors themselves). how max / mean: of the windows' head outputs (logits). attention: head of the
    windows' vectors weighed by weigh_windows. num_docs None: doc_index[-1] + 1, which waits for the device."""
    num_docs = int(doc_index[-1]) + 1 if num_docs is None else num_docs
    if how == "attention":
        pooled = weigh_windows(window_attention, pooled, doc_index, num_docs)
        return pooled if head is None else head(pooled)
    return segment_reduce(pooled if head is None else head(pooled), doc_index, num_docs, how)

