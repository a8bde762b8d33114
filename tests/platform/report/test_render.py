"""Every string a run can carry (variant values, run names, notes, latency rows) is text in the
HTML report, never markup, whatever it contains; and it cannot break a markdown table."""
from __future__ import annotations

from html.parser import HTMLParser

from ioulab.platform.report.render import Chart, Report, to_html, to_markdown
from ioulab.platform.report.runs import Trial
from ioulab.platform.report.table import Variant, results_table
from tests.platform.report.helpers import md_tables

HOSTILE = [
    '<script>alert("x")</script>',
    "</table></td><tr><td>injected",
    "a & b &amp; &lt;c&gt; &#60;d&#62;",
    "\"double\" 'single' `back`",
    '" onmouseover="alert(1)',
    "<img src=x onerror=alert(1)>",
    "--> <!-- <![CDATA[ x ]]>",
    "pipe | in | cell",
]
ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "dl", "dt", "dd",
                "table", "thead", "tbody", "tr", "th", "td", "p", "code", "figure", "img", "figcaption",
                "details", "summary", "ul", "li"}
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16


class Collector(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.ends, self.attrs, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += attrs

    def handle_endtag(self, tag):
        self.ends.append(tag)

    def handle_data(self, data):
        self.text.append(data)

    def handle_comment(self, data):
        raise AssertionError(f"a comment was opened: {data!r}")


def _trial(name: str, value: str, ap: float) -> Trial:
    return Trial(run_id=f"{abs(hash(name)):032x}"[:32], name=name, status="FINISHED", run_status="FINISHED",
                 stage="train", params={"k": value}, metrics={"AP": ap}, tags={})


def _report() -> Report:
    trials = [_trial(h, h, 30.0 + i) for i, h in enumerate(HOSTILE)]
    variants = [Variant({"k": h}, h, [t]) for h, t in zip(HOSTILE, trials)]
    variants.append(Variant({"k": "none"}, HOSTILE[0] + " (no results)", []))
    table = results_table(variants, variants[0], columns=("AP",), notes=HOSTILE[:2])
    return Report(title=HOSTILE[0], table=table, meta=[(h, h) for h in HOSTILE], keys={HOSTILE[1]: HOSTILE[2]},
                  charts=[Chart("c", HOSTILE[3], PNG, caption=HOSTILE[4])],
                  latency={"title": HOSTILE[5], "columns": ["row", "ms"],
                           "rows": [{"row": h, "ms": 1.0} for h in HOSTILE], "notes": HOSTILE},
                  trials=trials, variant_of={t.run_id: t.name for t in trials}, notes=HOSTILE)


def test_hostile_strings_stay_text_in_html():
    page = to_html(_report())
    parsed = Collector()
    parsed.feed(page)
    parsed.close()
    assert set(parsed.tags) <= ALLOWED_TAGS, set(parsed.tags) - ALLOWED_TAGS
    assert "script" not in parsed.tags and parsed.tags.count("img") == 1  # the chart only
    assert not any(name.startswith("on") for name, _ in parsed.attrs)
    # Tables stay whole: results + latency + all trials, every one closed, rows as built.
    assert parsed.tags.count("table") == parsed.ends.count("table") == 3
    assert parsed.tags.count("tr") == parsed.ends.count("tr") == (1 + len(HOSTILE) + 1) + (1 + len(HOSTILE)) + (1 + len(HOSTILE))
    text = "".join(parsed.text)
    for h in HOSTILE:  # shown as typed (the entities decode back to the original text)
        assert h in text, h
    assert ("alt", HOSTILE[3]) in parsed.attrs
    title = page.split("<title>", 1)[1].split("</title>", 1)[0]
    assert "<" not in title and "&lt;script&gt;" in title


def test_hostile_strings_keep_markdown_tables_whole():
    hostile = _report()
    multiline = Variant({"k": "x"}, "line one\nline | two", [_trial("nl", "x", 1.0)])
    hostile.table = results_table([multiline, *hostile.table.rows], multiline, columns=("AP",))
    tables = md_tables(to_markdown(hostile))
    results = tables[0]
    assert all(len(row) == len(results[0]) for row in results)
    assert results[1][0] == "line one line \\| two (baseline)"
    assert [row[0] for row in results[2:2 + len(HOSTILE)]] == [h.replace("|", "\\|") for h in HOSTILE]
    for t in tables:
        assert all(len(row) == len(t[0]) for row in t)
