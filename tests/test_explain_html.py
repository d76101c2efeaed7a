"""side/explain_html.py's page: the marks are the words the offsets name (overlapping and nested spans of two labels
too), every text, id and label is escaped, the page is written whole or not at all; then the same page opened in
headless Chromium (skipped where none starts): the DOM it built holds the same marks and nothing hostile ran."""
import os
import sys
import time
from collections import Counter
from html.parser import HTMLParser

import pytest

from side.explain_html import PALETTE, page_item, write_page
from side.files import WriteFailed

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import screenshot  # noqa: E402

TITLE = "Evidence under test"
HOSTILE = ("<script>document.title='pwned'</script> then "
           "<img src=x onerror=\"document.body.setAttribute('data-pwned','1')\"> & 'single' \"double\" &amp;")
CAPTION = "CT of the chest:\r\nspiculated nodule 🫁 in the right upper lobe, no effusion."


def span(text, words, score, nth=0):
    """The evidence span of the nth occurrence of words in text."""
    start = -1
    for _ in range(nth + 1):
        start = text.index(words, start + 1)
    return {"start": start, "end": start + len(words), "text": words, "score": score}


def cases():
    """Items with crossing, nested and shared spans of two labels, a CR LF and a character past the BMP; hostile
    texts, ids and labels; a text without labels; a single-label prediction."""
    both = {"labels": [
        {"label": "C0034079", "probability": 0.93, "evidence": [span(CAPTION, "spiculated nodule", 0.41),
                                                                span(CAPTION, "CT of", 0.05)]},
        {"label": "C0024109", "probability": 0.71, "evidence": [span(CAPTION, "nodule 🫁 in the right", 0.2),
                                                                span(CAPTION, "CT", 0.1),
                                                                span(CAPTION, "chest:\r\nspiculated", 0.3)]}]}
    hostile_label = "<img src=x onerror=\"document.body.setAttribute('data-pwned','1')\">"
    hostile = {"labels": [{"label": hostile_label, "probability": 0.5, "evidence": [span(HOSTILE, "<script>", 0.9),
                                                                                   span(HOSTILE, "&", 0.2, nth=1)]}]}
    single = {"label": "neoplasms", "probability": 0.6, "probabilities": {"neoplasms": 0.6, "other": 0.4},
              "evidence": [span("Metastatic melanoma.", "melanoma", 0.7)]}
    return [page_item(both, CAPTION, id="roco-1"),
            page_item(hostile, HOSTILE, id="\"><script>document.title='pwned'</script>"),
            page_item({"labels": []}, "Normal study.", id=None),
            page_item(single, "Metastatic melanoma.", id=7)]


class Page(HTMLParser):
    """What the checks read of a page: the title, the body's attributes, a count of each tag, and per text its
    heading, legend, text and marks, each mark with where it really stands in the text."""

    def __init__(self, source):
        super().__init__(convert_charrefs=True)
        self.title, self.body, self.tags, self.attributes, self.items = "", {}, Counter(), set(), []
        self.where, self.mark = None, None
        self.feed(source)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags[tag] += 1
        self.attributes.update(attrs)
        if tag == "body":
            self.body = attrs
        elif tag == "article":
            self.items.append({"attrs": attrs, "heading": "", "legend": [], "text": "", "marks": []})
        elif tag == "li":
            self.items[-1]["legend"].append({**attrs, "words": ""})
            self.where = "li"
        elif tag == "div" and attrs.get("class") == "text":
            self.where = "text"
        elif tag == "mark":
            self.mark = {**attrs, "at": len(self.items[-1]["text"]), "words": ""}
            self.items[-1]["marks"].append(self.mark)
        elif tag in ("title", "h2"):
            self.where = tag

    def handle_endtag(self, tag):
        if tag == "mark":
            self.mark = None
        elif tag in ("title", "h2", "li", "div"):
            self.where = None

    def handle_data(self, data):
        if self.where == "title":
            self.title += data
        elif self.where == "h2":
            self.items[-1]["heading"] += data
        elif self.where == "li":
            self.items[-1]["legend"][-1]["words"] += data
        elif self.where == "text":
            self.items[-1]["text"] += data
            if self.mark is not None:
                self.mark["words"] += data


def check_marks(page, items):
    """Each text shown whole; each mark at its data-start, its words the text's; each (label, start, end) span the
    run of marks carrying the label that tiles start..end, their words the span's, each titled with its score."""
    assert len(page.items) == len(items)
    for shown, item in zip(page.items, items):
        text = item["text"]
        assert shown["text"] == text
        assert [x["data-label"] for x in shown["legend"] if "data-label" in x] == [x["label"] for x in item["labels"]]
        for mark in shown["marks"]:
            start, end = int(mark["data-start"]), int(mark["data-end"])
            assert mark["at"] == start and mark["words"] == text[start:end] and start < end
        for k, label in enumerate(item["labels"]):
            for e in label["evidence"]:
                run = [m for m in shown["marks"] if str(k) in m["data-l"].split()
                       and e["start"] <= int(m["data-start"]) and int(m["data-end"]) <= e["end"]]
                assert [int(m["data-start"]) for m in run][:1] == [e["start"]]
                assert [int(m["data-end"]) for m in run][-1:] == [e["end"]]
                assert all(a["data-end"] == b["data-start"] for a, b in zip(run, run[1:]))
                assert "".join(m["words"] for m in run) == e["text"] == text[e["start"]:e["end"]]
                assert all(f"{label['label']} {e['score']:.3f}" in m["title"].split("\n") for m in run)


def check_nothing_ran(page):
    """No script or image element was made of a text, the title is the page's, and the body was not touched."""
    assert page.tags["script"] == 0 and page.tags["img"] == 0
    assert page.title == TITLE and "data-pwned" not in page.body
    assert page.items[1]["text"] == HOSTILE
    assert page.items[1]["heading"] == "\"><script>document.title='pwned'</script>"
    assert page.items[1]["legend"][0]["words"].startswith("<img src=x onerror=")


def written(tmp_path, items=None, **options):
    path = str(tmp_path / "report.html")
    write_page(path, cases() if items is None else items, title=TITLE, **options)
    with open(path, encoding="utf-8", newline="") as f:  # newline="": a CR is a character of the text
        return path, f.read()


def test_marks_are_the_words_the_offsets_name(tmp_path):
    _, source = written(tmp_path)
    page = Page(source)
    check_marks(page, cases())
    first = page.items[0]
    shared = [m for m in first["marks"] if m["data-l"] == "0 1"]  # cuts two labels cite, both colours in bands
    assert {m["words"] for m in shared} == {"CT", "spiculated", "nodule"}
    assert all(m["style"].count("#") == 2 for m in shared)
    assert page.items[2]["marks"] == [] and page.items[2]["legend"][0]["words"] == "no label"
    assert page.items[3]["heading"] == "7" and [x["words"] for x in page.items[3]["legend"]] == ["neoplasms 0.60"]


def test_hostile_texts_ids_and_labels_are_text(tmp_path):
    _, source = written(tmp_path, note="<script>alert(1)</script> showing 4 of 4")
    assert "<script" not in source.lower() and "<img" not in source.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; showing 4 of 4" in source
    check_nothing_ran(Page(source))


def test_the_page_reaches_nothing_outside(tmp_path):
    _, source = written(tmp_path)
    head = source[:source.index("</head>")]
    assert head.index('http-equiv="Content-Security-Policy"') < head.index("<style>")
    assert "default-src 'none'" in head and "script-src" not in head
    assert not any(reference in source for reference in ("url(", "@import", "http://", "https://"))
    page = Page(source)
    assert not page.attributes & {"src", "href", "srcset", "action", "poster", "background"}
    assert not page.tags.keys() & {"link", "script", "img", "iframe", "object", "embed", "base"}


def test_a_label_keeps_its_colour_and_a_text_s_labels_differ(tmp_path):
    def item(*names):
        return {"id": None, "text": "a b", "labels": [{"label": x, "probability": 0.5, "evidence": []} for x in names]}

    n = len(PALETTE)
    items = [item(f"L{i}") for i in range(n)] + [item("L0", "new"), item("L1"), item("L3", "L3b", "L4")]
    page = Page(written(tmp_path, items)[1])
    colour = {x["data-label"]: x["style"] for shown in page.items for x in shown["legend"]}
    seen = [[x["style"] for x in shown["legend"]] for shown in page.items]
    assert [x[0] for x in seen[:n]] == [f"background:{c}" for c in PALETTE]   # the palette in order
    assert all(colour[x["data-label"]] == x["style"] for shown in page.items for x in shown["legend"])
    assert colour["new"] not in seen[:n]  # past the palette: a colour of its own
    assert colour["L3b"] not in (colour["L3"], colour["L4"]) and len(set(seen[-1])) == 3
    assert len(set(colour.values())) == len(colour)


def test_a_text_of_many_labels_has_as_many_colours(tmp_path):
    """236 labels over the page, 40 in one text that comes last: no two of its labels look alike by colour."""
    def item(*names):
        return {"id": None, "text": "a b", "labels": [{"label": x, "probability": 0.5, "evidence": []} for x in names]}

    items = [item(*(f"C{i + j}" for j in range(4))) for i in range(0, 236, 4)]
    items.append(item(*(f"C{i}" for i in range(0, 236, 6))))
    page = Page(written(tmp_path, items)[1])
    last = [x["style"] for x in page.items[-1]["legend"]]
    assert len(last) == 40 and len(set(last)) == 40


def test_the_page_is_written_whole_or_not_at_all(tmp_path):
    path, _ = written(tmp_path)
    assert os.listdir(tmp_path) == ["report.html"]
    before = open(path, "rb").read()
    wrong = cases() + [{"id": "bad", "text": "short", "labels": [{"label": "x", "probability": 1.0,
                                                                  "evidence": [{"start": 2, "end": 9, "score": 1}]}]}]
    with pytest.raises(ValueError, match="text 5 .*id bad.*label x.*2:9"):
        write_page(path, wrong)
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["report.html"]
    quoted = [{"id": None, "text": "abc", "labels": [{"label": "x", "probability": 1.0,
                                                     "evidence": [{"start": 0, "end": 2, "text": "bc", "score": 1}]}]}]
    with pytest.raises(ValueError, match="'bc' is not the text's characters 0:2"):
        write_page(path, quoted)
    missing = str(tmp_path / "no_such_folder" / "report.html")
    with pytest.raises(WriteFailed, match="cannot write .*no_such_folder/report.html: No such file"):
        write_page(missing, cases())
    assert os.listdir(tmp_path) == ["report.html"]


def test_thousands_of_texts(tmp_path):
    items = cases() * 1000
    began = time.perf_counter()
    page = Page(written(tmp_path, items, note="showing the first 4000 of 12000 texts")[1])
    assert time.perf_counter() - began < 20
    assert len(page.items) == 4000 and sum(len(x["marks"]) for x in page.items) == 1000 * sum(
        len(x["marks"]) for x in page.items[:4])


# --- the same page in a browser -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium, proven to run a page's script (else "nothing ran" would prove nothing); skipped with the
    reason where there is none or it cannot start here."""
    path = screenshot.find_chromium()
    if path is None:
        pytest.skip(f"no Chromium on PATH ({', '.join(screenshot.BROWSERS)}); .ci/run installs Debian's chromium")
    control = tmp_path_factory.mktemp("control") / "control.html"
    control.write_text("<!DOCTYPE html><html><head><title>t</title></head><body>"
                       "<script>document.body.setAttribute('data-pwned', '1')</script></body></html>")
    try:
        dom = screenshot.run_chromium(str(control), "--dump-dom", browser=path).decode("utf-8")
    except screenshot.BrowserError as e:
        pytest.skip(f"Chromium cannot run headless here: {e}")
    assert "data-pwned" in Page(dom).body, "the browser ran no script: the checks below would prove nothing"
    return path


def dumped(page_path, browser):
    """The DOM Chromium built from the page, once parsed and anything it would run had run."""
    return Page(screenshot.run_chromium(page_path, "--dump-dom", browser=browser).decode("utf-8"))


def test_in_the_browser_marks_are_the_words_and_nothing_ran(tmp_path, browser):
    path, _ = written(tmp_path)
    page = dumped(path, browser)
    check_marks(page, cases())
    check_nothing_ran(page)


def test_in_the_browser_escaping_holds_without_the_policy(tmp_path, browser):
    path, source = written(tmp_path)
    start = source.index('<meta http-equiv="Content-Security-Policy"')
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(source[:start] + source[source.index(">", start) + 1:])
    check_nothing_ran(dumped(path, browser))


def test_screenshot(tmp_path, browser):
    path, _ = written(tmp_path)
    out = tmp_path / "page.png"
    screenshot.main([path, str(out), "--width", "640", "--height", "400"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["page.png", "report.html"]
