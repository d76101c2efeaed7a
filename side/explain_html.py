"""predict.py --explain-html: one self-contained HTML page of texts, their predicted labels and each label's evidence.

write_page(path, items, title, note) writes the page through side/files.py (beside, then renamed to PATH);
page_item(prediction, text, id) makes an item of a prediction with evidence. An item: {"id", "text", "labels": [{"label", "probability",
"evidence": [{"start", "end", "text", "score"}, ...]}, ...]}, offsets in characters of the text.

The page: per text a legend of its labels (a colour each, its probability) and the text, cut at every evidence boundary;
each cut covered by evidence is a <mark data-start data-end data-l="label numbers"> coloured in bands, one per label
covering it, its title (shown on hover) the labels and scores. So spans of two labels may overlap or nest, and each
(label, start, end) is the run of marks between start and end that carry the label. No script, no network: a
Content-Security-Policy forbids everything but the page's own styles, and every text, id, label and title is escaped,
so a note holding <script> or <img onerror> is shown as those characters and nothing runs.
"""
import html

from side import files

PALETTE = ("#ffd54f", "#81d4fa", "#a5d6a7", "#f48fb1", "#ce93d8", "#ffab91", "#80cbc4", "#e6ee9c", "#b0bec5",
           "#bcaaa4")  # light enough for black text on any of them, distinct when printed
CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 60em; margin: 1em auto; padding: 0 1em; color: #111; }
.note { color: #555; }
.item { border-top: 1px solid #ccc; padding: .4em 0 .8em; break-inside: avoid;
        content-visibility: auto; contain-intrinsic-size: auto 8em; }
.item h2 { font-size: .85em; color: #666; margin: .2em 0; font-weight: normal; }
.legend { list-style: none; padding: 0; margin: .2em 0 .4em; }
.legend li { display: inline-block; margin: 0 .4em .2em 0; padding: 0 .4em; border-radius: 3px; font-size: .9em; }
.legend .none { background: #eee; color: #666; }
.gold li { border: 1px solid #888; }
.gold .missed { border-style: dashed; color: #a00; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; }
mark { color: inherit; padding: 0; }
* { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
"""


def escape(value):
    """Text or an attribute value with &, <, >, and quotes escaped; a carriage return as a reference, which the parser
    keeps (a raw one is folded with its newline, and every later character would stand one place off its offset)."""
    return html.escape(str(value), quote=True).replace("\r", "&#13;")


def page_item(prediction, text, id=None, gold=None):
    """An item of the page from one of predict.py's predictions with evidence: single-label {"label", "probability",
    "evidence", ...} or multi-label {"labels": [{"label", "probability", "evidence"}, ...]}; a label's "name"
    (--label-names) comes along. gold: the text's true labels ({"label"[, "name"]} each), or None."""
    labels = prediction["labels"] if "labels" in prediction else [prediction]
    item = {"id": None if id is None else str(id), "text": text,
            "labels": [{"label": str(x["label"]), "probability": float(x["probability"]),
                        "evidence": list(x.get("evidence") or []), **({"name": x["name"]} if "name" in x else {})}
                       for x in labels]}
    return item if gold is None else {**item, "gold": gold}


def shown(label):
    """A label as a reader sees it: its name and code (--label-names), or its code."""
    name = label.get("name")
    return label["label"] if not name or name == label["label"] else f"{name} ({label['label']})"


def checked_spans(item, number):
    """(start, end, label number, score) of each non-empty evidence span of the item; a ValueError naming the item and
    the label when a span's offsets fall outside the text or do not name the words the span quotes."""
    text, spans = item["text"], []
    for k, label in enumerate(item["labels"]):
        for e in label.get("evidence") or []:
            start, end = int(e["start"]), int(e["end"])
            if not 0 <= start <= end <= len(text) or ("text" in e and text[start:end] != e["text"]):
                raise ValueError(f"text {number} (id {item.get('id')}), label {label['label']}: evidence "
                                 f"{start}:{end} {e.get('text')!r} is not the text's characters {start}:{end}")
            if start < end:
                spans.append((start, end, k, float(e.get("score", 0.0))))
    return spans


def segments(text, spans):
    """The text cut at every span boundary: (start, end, [(label number, score) of each span covering it])."""
    cuts = sorted({0, len(text), *(s for s, _, _, _ in spans), *(e for _, e, _, _ in spans)})
    for a, b in zip(cuts, cuts[1:]):
        yield a, b, [(k, score) for s, e, k, score in spans if s <= a and b <= e]


def bands(colours):
    """A background of one horizontal band per colour, so each label covering a cut keeps its colour visible."""
    if len(colours) == 1:
        return f"background:{colours[0]}"
    step = 100 / len(colours)
    stops = ", ".join(f"{c} {i * step:.1f}% {(i + 1) * step:.1f}%" for i, c in enumerate(colours))
    return f"background:linear-gradient({stops})"


def nth_colour(k):
    """The page's k-th colour: the palette's, then light hues a golden angle apart (neighbours far apart on the
    wheel), in three lightnesses; never one given before, so no two labels of a text share one."""
    if k < len(PALETTE):
        return PALETTE[k]
    k -= len(PALETTE)
    return f"hsl({k * 137.508 % 360:.2f} 70% {(80, 88, 72)[k // 7 % 3]}%)"


class Colours:
    """One colour per label name throughout the page, a new one (nth_colour) for each label in order of first
    appearance: a label keeps its colour from text to text, and a text's labels never share one."""

    def __init__(self):
        self.of = {}

    def for_text(self, names):
        for name in names:
            if name not in self.of:
                self.of[name] = nth_colour(len(self.of))
        return self.of


def render_text(item, spans, colour):
    """The text's HTML: plain escaped text outside the evidence, a <mark> per cut inside it."""
    codes, names = [x["label"] for x in item["labels"]], [shown(x) for x in item["labels"]]
    parts = []
    for a, b, covering in segments(item["text"], spans):
        words = escape(item["text"][a:b])
        if not covering:
            parts.append(words)
            continue
        numbers = sorted({k for k, _ in covering})
        hover = "\n".join(f"{names[k]} {score:.3f}" for k, score in covering)
        parts.append(f'<mark data-start="{a}" data-end="{b}" data-l="{" ".join(map(str, numbers))}" '
                     f'style="{bands([colour[codes[k]] for k in numbers])}" title="{escape(hover)}">{words}</mark>')
    return "".join(parts)


def render_item(item, number, colours):
    """One text: its id (or its number), the legend of its labels and the text with its evidence marked."""
    spans = checked_spans(item, number)
    colour = colours.for_text([x["label"] for x in item["labels"]])
    heading = escape(item["id"]) if item.get("id") is not None else f"#{number}"
    legend = "".join(f'<li data-i="{k}" data-label="{escape(x["label"])}" style="background:{colour[x["label"]]}">'
                     f'{escape(shown(x))} {float(x["probability"]):.2f}</li>' for k, x in enumerate(item["labels"]))
    legend = legend or '<li class="none">no label</li>'
    data_id = f' data-id="{escape(item["id"])}"' if item.get("id") is not None else ""
    return (f'<article class="item" data-n="{number}"{data_id}>\n<h2>{heading}</h2>\n<ul class="legend">{legend}</ul>\n'
            f'{gold_legend(item)}<div class="text">{render_text(item, spans, colour)}</div>\n</article>\n')


def gold_legend(item):
    """With --label-column: the text's true labels under the predicted ones, each marked found (predicted too) or
    missed; nothing without them."""
    if item.get("gold") is None:
        return ""
    predicted = {x["label"] for x in item["labels"]}
    chips = "".join(f'<li class="{"found" if g["label"] in predicted else "missed"}" data-gold="{escape(g["label"])}">'
                    f'{escape(shown(g))}{"" if g["label"] in predicted else " (missed)"}</li>' for g in item["gold"])
    return f'<ul class="legend gold"><li class="none">true labels</li>{chips or "<li>none</li>"}</ul>\n'


def head(title, note):
    """The page up to its first text: the policy first (before anything it governs), the style, the title, the note."""
    note = f'<p class="note">{escape(note)}</p>\n' if note else ""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<title>{escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n'
            f'<h1>{escape(title)}</h1>\n{note}')


def write_page(path, items, title="Evidence", note=None):
    """Write the page of items to path, replaced only once whole (files.replacing); a failure (no such folder, disk
    full) is a files.WriteFailed naming path, and path is left as it was."""
    colours = Colours()
    with files.replacing(path) as tmp, open(tmp, "w", encoding="utf-8", errors="replace") as page:
        page.write(head(title, note))
        for number, item in enumerate(items, 1):
            page.write(render_item(item, number, colours))
        page.write("</body>\n</html>\n")
