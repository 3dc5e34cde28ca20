"""clsuite site: the static leaderboard's files, escaping and errors, and its pages in headless Chromium."""
from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from clsuite.atomic import write_json
from clsuite.errors import UserError
from clsuite.fingerprint import PARTS
from clsuite.records import SCHEMA_VERSION
from clsuite.reports.site import markdown_html, write_site
from clsuite.stats import t_half_width

TINY = Path(__file__).parent / "data" / "tiny-test.yaml"
EVIL = "<script>alert(1)</script>"


def _rec(strategy: str, seed: int, acc: float, status: str = "complete") -> dict:
    """A hand-made record whose every free-text field carries EVIL."""
    rec = {"schema_version": SCHEMA_VERSION, "status": status, "stream": f"s{EVIL}", "strategy": strategy,
           "tag": EVIL, "seed": seed, "model": f"m{EVIL}", "config": {}, "fingerprint": {p: "0" for p in PARTS},
           "tasks": ["a", f"b{EVIL}"], "probes": [f"p{EVIL}"], "R": [[0.0, 0.0], [0.5, 0.1], [acc, acc]],
           "P": [[0.7], [0.6], [0.5 + seed / 10]], "metrics": {"acc": acc, "probe_retention": -0.2 + seed / 10},
           "cost": {"compute_multiplier": 2.0 if "sam" in strategy else 1.0},
           "experiences": [{"task": f"a{EVIL}", "steps": 3, "tokens": 100, "train_seconds": 0.1,
                            "loss_curve": [3.0, 2.0, 1.5]}] * 2,
           "provenance": {"argv": [EVIL]}}
    if status == "failed":
        rec.update(R=[], P=[], metrics={}, error=f"boom {EVIL}")
    return rec


@pytest.fixture
def evil_records(tmp_path) -> Path:
    d = tmp_path / "records"
    for strategy, accs in (("naive", (0.2, 0.4)), ("sam", (0.3, 0.6))):
        for seed, acc in enumerate(accs):
            write_json(d / strategy / f"seed{seed}.json", _rec(strategy, seed, acc))
    write_json(d / "sam" / "seed2.json", _rec("sam", 2, 0.0, status="failed"))
    return d


class _Tables(HTMLParser):
    """The rows of every table with an id, as [[(text, data-sort)]], header row first; hrefs and srcs."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[list]]] = {}
        self.links: list[str] = []
        self._table, self._row, self._cell = None, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.links += [a[k] for k in ("href", "src") if k in a]
        if tag == "table" and a.get("id"):
            self._table = self.tables.setdefault(a["id"], [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ["", a.get("data-sort")]
            self._row.append(self._cell)

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = self._row = None
        elif tag in ("td", "th"):
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data


def test_files_links_numbers_and_escaping(evil_records, tmp_path):
    index = write_site([evil_records], tmp_path / "site")
    site = index.parent
    assert index == site / "index.html" and (site / "site.js").is_file() and (site / "site.css").is_file()
    stream_pages, run_pages = sorted((site / "streams").glob("*.html")), sorted((site / "runs").glob("*.html"))
    assert len(stream_pages) == 1 and len(run_pages) == 5
    sources = sorted(evil_records.rglob("*.json"))
    copies = sorted((site / "runs").glob("*.json"))
    assert sorted(p.read_bytes() for p in copies) == sorted(p.read_bytes() for p in sources)
    for f in [index, *stream_pages, *run_pages]:
        text = f.read_text()
        assert EVIL not in text and "<script>alert" not in text, f
        assert re.findall(r"<script[^>]*>", text) == [f'<script src="{"" if f == index else "../"}site.js">']
        for link in _Tables(text).links:  # self-contained: every link is a file of the site
            assert "://" not in link and not link.startswith("/"), (f, link)
            assert (f.parent / link.split("#")[0]).resolve().is_file(), (f, link)
    page = _Tables(stream_pages[0].read_text())
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in stream_pages[0].read_text()
    head, *rows = page.tables["leaderboard"]
    cols = [h for h, _ in head]
    assert [(r[0][0], r[1][0], r[2][0]) for r in rows] == [("sam", EVIL, "test"), ("naive", EVIL, "test")]
    naive = rows[1][cols.index("acc ↑")]
    assert naive[0] == f"0.300 ± {t_half_width(np.std([0.2, 0.4], ddof=1), 2):.3f}" == "0.300 ± 1.271"
    assert float(naive[1]) == pytest.approx(0.3)
    (effect,) = page.tables["effects"][1:]
    assert effect[1][0] == f"sam [{EVIL}] − naive [{EVIL}]" and effect[3][0] == "+0.150 ± 0.635 (p 0.20)"
    assert page.tables["runs"][1:][-1][4][0] == "failed" and "<svg" in stream_pages[0].read_text()
    failed = next(p for p in run_pages if "seed2" in p.name).read_text()
    assert "boom &lt;script&gt;" in failed
    run = next(p for p in run_pages if "sam" in p.name and "seed0" in p.name).read_text()
    assert run.count('<table class="heatmap">') == 2 and run.count("<polyline") == 2
    assert 'data-value="0.0" style="background:rgb(247,251,255)' in run  # R's range: white to blue
    assert 'data-value="0.5" style="background:rgb(8,48,107)' in run


def test_rewrites_a_site_but_guards_other_folders(evil_records, tmp_path):
    site = tmp_path / "site"
    write_site([evil_records], site)
    (site / "stale.html").write_text("old")
    write_site([evil_records], site)  # a site is replaced whole
    assert not (site / "stale.html").exists() and (site / "index.html").exists()
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="not a site written by"):
        write_site([evil_records], other)
    with pytest.raises(UserError, match="overlaps the records"):
        write_site([evil_records], evil_records / "site")
    assert (other / "notes.txt").read_text() == "keep"


def test_bad_input_is_one_line(tmp_path, cli):
    with pytest.raises(UserError, match="does not exist"):
        write_site([tmp_path / "missing"], tmp_path / "site")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no run records"):
        write_site([tmp_path / "empty"], tmp_path / "site")
    code, _, err = cli("site", tmp_path / "missing", "--out", tmp_path / "site")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "site").exists()


def test_markdown_tables_to_html(tmp_path):
    (tmp_path / "tradeoff.png").write_bytes(b"png")
    md = ("# Leaderboard: x\n\nSome `rule` text\nsplit over lines.\n\n| strategy | acc ↑ |\n|---|---:|\n"
          "| &lt;b&gt;x&#124;y | 0.5 ± 0.1 |\n| <img src=q onerror=alert(1)> | – |\n\n"
          "![trade-off](tradeoff.png)\n![gone](missing.png)\n")
    out = markdown_html(md, tmp_path, "p/")
    assert "<h3>Leaderboard: x</h3>" in out and "<p>Some <code>rule</code> text split over lines.</p>" in out
    assert "<th>strategy</th><th>acc ↑</th>" in out and "<td>&lt;b&gt;x|y</td><td>0.5 ± 0.1</td>" in out
    assert "<img src=q" not in out and "&lt;img src=q onerror=alert(1)&gt;" in out
    assert out.count("<tr>") == 3 and '<img src="p/tradeoff.png" alt="trade-off">' in out
    assert "missing.png" in out and 'src="p/missing.png"' not in out


@pytest.mark.slow
def test_protocol_directory_embeds_its_leaderboard(tmp_path, cli):
    grid = tmp_path / "tune.yaml"
    grid.write_text(f"streams: [{TINY}]\ntuning_seeds: [100]\ntest_seeds: [0, 1]\n"
                    "strategies: {naive: {lr: [1.0e-3]}, sam: {lr: [1.0e-3]}}\n")
    code, _, err = cli("tune", grid, "--out", tmp_path / "tune", "--quiet")
    assert code == 0, err
    write_site([tmp_path / "tune"], tmp_path / "site")
    text = (tmp_path / "site" / "streams" / "tiny-test.html").read_text()
    proto = text[text.index('id="protocol"'):]
    assert "Selected settings" in proto and "<table" in proto and "sam − naive" in proto
    assert '<img src="tiny-test-protocol/tradeoff.png"' in proto
    assert (tmp_path / "site" / "streams" / "tiny-test-protocol" / "tradeoff.png").is_file()
    splits = [r[2][0] for r in _Tables(text).tables["leaderboard"][1:]]
    assert sorted(splits) == ["test", "test", "val", "val"]  # tuning (val) and test records, each a row


def _chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary:
        opts.binary_location = binary
    return webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))  # no driver download


def _column(driver, table: str, header: str) -> list[str]:
    """The sort keys (data-sort, else text) of a column's displayed rows, in order."""
    return driver.execute_script(
        "var t = document.querySelector(arguments[0]);"
        "var i = Array.from(t.tHead.rows[0].cells).findIndex(c => c.textContent === arguments[1]);"
        "return Array.from(t.tBodies[0].rows).filter(r => !r.hidden).map(r => r.cells[i].hasAttribute('data-sort')"
        " ? r.cells[i].getAttribute('data-sort') : r.cells[i].textContent);", table, header)


def _click_header(driver, table: str, header: str) -> None:
    from selenium.webdriver.common.by import By
    next(h for h in driver.find_elements(By.CSS_SELECTOR, f"{table} thead th") if h.text == header).click()


def test_site_in_headless_chromium(cli, tmp_path):
    if shutil.which("chromedriver") is None:
        pytest.skip("chromium-driver not installed: run make browser")
    from PIL import Image
    from selenium.webdriver.common.by import By
    code, _, err = cli("run", "--stream", TINY, "--strategies", "naive,sam", "--seeds", "0,1", "--out",
                       tmp_path / "runs", "--quiet")
    assert code == 0, err
    code, out, err = cli("site", tmp_path / "runs", "--out", tmp_path / "site")
    assert code == 0 and "index.html" in out, err
    driver = _chromium()
    try:
        driver.get((tmp_path / "site" / "index.html").as_uri())
        driver.find_element(By.LINK_TEXT, "tiny-test").click()
        assert driver.title == "clsuite: tiny-test"

        _click_header(driver, "#leaderboard", "strategy")
        assert _column(driver, "#leaderboard", "strategy") == ["naive", "sam"]
        _click_header(driver, "#leaderboard", "strategy")
        assert _column(driver, "#leaderboard", "strategy") == ["sam", "naive"]
        values = [float(v) for v in _column(driver, "#runs", "probe_retention")]
        assert len(set(values)) > 1
        _click_header(driver, "#runs", "probe_retention")
        assert [float(v) for v in _column(driver, "#runs", "probe_retention")] == sorted(values)
        _click_header(driver, "#runs", "probe_retention")
        assert [float(v) for v in _column(driver, "#runs", "probe_retention")] == sorted(values, reverse=True)
        driver.execute_script(  # numbers sort as numbers (as text 10 < 9), a missing value last both ways
            "document.body.insertAdjacentHTML('beforeend', '<table class=\"sortable\" id=\"t\"><thead><tr><th>x</th>"
            "</tr></thead><tbody>' + ['10', '9', '–', '-2.5', '100'].map(v => '<tr><td>' + v + '</td></tr>').join('')"
            " + '</tbody></table>');")
        _click_header(driver, "#t", "x")
        assert _column(driver, "#t", "x") == ["-2.5", "9", "10", "100", "–"]
        _click_header(driver, "#t", "x")
        assert _column(driver, "#t", "x") == ["100", "10", "9", "-2.5", "–"]

        driver.find_element(By.CSS_SELECTOR, "input.filter").send_keys("sam")
        assert _column(driver, "#leaderboard", "strategy") == ["sam"]
        assert _column(driver, "#runs", "strategy") == ["sam", "sam"]
        assert not driver.find_element(By.CSS_SELECTOR, 'a[href$="naive-test-seed0.html"]').is_displayed()

        driver.find_element(By.LINK_TEXT, "tiny-test-sam-test-seed0").click()
        assert driver.title == "clsuite: tiny-test | sam | test | seed 0"
        maps = driver.find_elements(By.CSS_SELECTOR, "table.heatmap")
        assert len(maps) == 2 and all(m.is_displayed() for m in maps)
        r_cells = maps[0].find_elements(By.CSS_SELECTOR, "td[data-value]")
        assert len(r_cells) == 3 * 2 and "background" in r_cells[0].get_attribute("style")
        assert len(driver.find_elements(By.CSS_SELECTOR, "figure.loss polyline")) == 2
        record = Path(driver.find_element(By.PARTIAL_LINK_TEXT, "run record").get_attribute("href")[len("file://"):])
        assert json.loads(record.read_text())["strategy"] == "sam"
        driver.save_screenshot(str(tmp_path / "run.png"))
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]  # no script errors
    finally:
        driver.quit()
    pixels = np.asarray(Image.open(tmp_path / "run.png").convert("RGB"))
    assert pixels.shape[0] > 100 and (pixels != pixels[0, 0]).any(axis=-1).mean() > 0.01  # not one colour
