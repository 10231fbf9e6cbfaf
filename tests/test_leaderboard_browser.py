"""The web page in a real browser: headless Chromium (Debian's ``chromium`` + ``chromium-driver``, installed in CI
by ``.ci/browser_deps.sh``) loads ``leaderboard build --html`` output from disk (file://, no server, no network).

Asserts on the rendered DOM: every row present, sorting by a column orders the rows by that column (both
directions, missing values last), a filter hides exactly the rows it should and the plots follow it, one plot
point per plotted row, the detail row of a reproduced row shows its command, interval and result link; no
console message of level warning or error. With results of two protocols, each section holds its own rows, filters
and plots: the NYUD section shows its published rows and its reproduced run, depth at its own decimals, and the
reference its Δm is against. A screenshot is written to ``$MTPEFT_TEST_ARTIFACTS`` (default: the
test's tmp folder).

Skipped only when Chromium is absent and the environment variable CI is not set; with CI=true a missing browser
fails the test.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
from test_leaderboard import seeds_vals, write_run

from benchmark.protocol import NYUD, REFERENCES
from benchmark.protocol import PASCAL_CONTEXT as P
from leaderboard.cli import main
from leaderboard.tables import task_decimals

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def _browser_or_skip():
    if CHROMIUM and DRIVER:
        try:
            import selenium  # noqa: F401
        except ImportError:
            if os.environ.get("CI"):
                pytest.fail("CI: selenium is not installed (pip install -e .[test])")
            pytest.skip("selenium not installed")
        return
    if os.environ.get("CI"):
        pytest.fail("CI: chromium / chromedriver not found; run .ci/browser_deps.sh")
    pytest.skip("chromium and chromedriver not installed (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("site")
    root = tmp / "results"
    for seed, d in enumerate((0.0, 0.3)):
        write_run(root, seed=seed, vals=seeds_vals(d))  # mtlora r64, 2 seeds: a t-interval
    write_run(root, method="decoders_only", config={}, vals=seeds_vals(-6.0), cost={})  # no throughput, no memory
    for seed, d in enumerate((0.0, 0.01)):  # NYUD: mtlora r64, 2 seeds
        write_run(root, seed=seed, vals={"semseg": 41.5 + d, "depth": 0.6123 + d, "normals": 23.4}, protocol=NYUD)
    assert main(["build", str(root), "--html", str(tmp / "site")]) == 0
    return tmp / "site"


@pytest.fixture(scope="module")
def driver():
    _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1600,1300"):
        opts.add_argument(a)
    opts.binary_location = CHROMIUM
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield d
    d.quit()


def _section(protocol=P) -> str:
    return f'section[data-section="{protocol.name}-v{protocol.version}"]'


def _rows(driver, protocol=P):
    return driver.find_elements("css selector", f"{_section(protocol)} table.board tbody tr.row")


def _visible(driver, protocol=P):
    return [r for r in _rows(driver, protocol) if r.is_displayed()]


def _cell(row, key: str) -> str:
    return row.find_element("css selector", f'td[data-key="{key}"]').text


def _num(text: str) -> float:
    # "67.85 ± 1.91", "7.38–8.34", "6.53 ?" (a count of unstated policy), "1.60 ‡" (another policy's)
    return math.nan if text == "–" else float(text.split(" ± ")[0].split("–")[0].split(" ")[0])


def _plot_points(driver, plot: str, protocol=P) -> tuple[int, int]:
    """(points in plotly's data, point elements drawn in its first trace)."""
    sel = f'{_section(protocol)} .plot[data-plot="{plot}"]'
    n_data = driver.execute_script(f"return document.querySelector('{sel}').data[0].x.length")
    n_svg = len(driver.find_elements("css selector", f"{sel} .scatterlayer .trace:first-child path.point"))
    return n_data, n_svg


def test_page_renders_sorts_filters_and_plots(site, driver, tmp_path):
    from leaderboard.build import collect

    driver.get((site / "index.html").as_uri())
    assert driver.execute_script("return document.body.getAttribute('data-ready')") == "1"
    frame = collect([site.parent / "results"]).sections[0].frame
    rows = _rows(driver)
    assert len(rows) == len(frame)
    assert [_cell(r, "method") for r in rows] == [
        m if k == "reproduced" else lab
        for m, k, lab in zip(frame["method"], frame["kind"], frame["label"], strict=True)
    ]
    # the 2-seed row: value ± half-width; the 1-seed row without per-image statistics and published rows: none
    repro = {_cell(r, "method"): r for r in rows if r.get_attribute("data-kind") == "reproduced"}
    assert sorted(repro) == ["decoders_only", "mtlora"]
    assert " ± " in _cell(repro["mtlora"], "delta_m") and " ± " not in _cell(repro["decoders_only"], "delta_m")
    assert all(" ± " not in _cell(r, "delta_m") for r in rows if r.get_attribute("data-kind") == "published")

    # sort by trainable parameters: ascending then descending, rows without a count last both ways
    header = driver.find_element("css selector", f'{_section()} th[data-key="params_m"]')
    header.click()
    desc = [_num(_cell(r, "params_m")) for r in _rows(driver)]
    known = [v for v in desc if not math.isnan(v)]
    assert known == sorted(known, reverse=True) and all(math.isnan(v) for v in desc[len(known) :])
    assert header.find_element("css selector", ".arrow").text == "▼"
    header.click()
    asc = [_num(_cell(r, "params_m")) for r in _rows(driver)]
    assert [v for v in asc if not math.isnan(v)] == sorted(known)
    assert header.find_element("css selector", ".arrow").text == "▲"
    driver.find_element("css selector", f'{_section()} th[data-key="method"]').click()
    names = [_cell(r, "method") for r in _rows(driver)]
    assert names == sorted(names, key=lambda s: s.lower()) or names == sorted(names)

    # one plot point per plotted row (Δm and a positive parameter count)
    plotted = int(((frame["params_m"] > 0) & frame["delta_m"].notna()).sum())
    assert _plot_points(driver, "params") == (plotted, plotted)
    # throughput: only the mtlora group recorded it
    assert _plot_points(driver, "img_s") == (1, 1)

    # filter to reproduced rows: the published ones are hidden, and leave the plot
    from selenium.webdriver.support.ui import Select

    n_nyud = len(_visible(driver, NYUD))
    Select(driver.find_element("css selector", f'{_section()} select[data-filter="source_kind"]')).select_by_value(
        "reproduced"
    )
    vis = _visible(driver)
    assert len(vis) == 2 and all(r.get_attribute("data-kind") == "reproduced" for r in vis)
    assert _plot_points(driver, "params") == (2, 2)
    assert len(_visible(driver, NYUD)) == n_nyud  # a filter acts on its own section only

    # detail row: command, interval, provenance, link to the result file (which exists in the site)
    target = next(r for r in vis if _cell(r, "method") == "mtlora")
    target.click()
    detail = driver.find_element("css selector", f"{_section()} tr.detail").text
    assert "run_benchmark --method mtlora --preset paper --seed" in detail
    assert "t-interval over 2 seeds" in detail and "95% intervals" in detail
    links = driver.find_elements("css selector", f"{_section()} tr.detail a.result-link")
    assert len(links) == 2
    for a in links:
        href = a.get_attribute("href")
        assert href.startswith("file://") and Path(href.removeprefix("file://")).is_file()

    shot = Path(os.environ.get("MTPEFT_TEST_ARTIFACTS", tmp_path)) / "leaderboard_page.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    Select(driver.find_element("css selector", f'{_section()} select[data-filter="source_kind"]')).select_by_value("")
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    logs = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert not logs, logs


def test_published_flags_have_their_note_on_hover(site, driver):
    driver.get((site / "index.html").as_uri())
    flags = driver.find_elements("css selector", "td.source .flag")
    assert flags and all(f.get_attribute("title") for f in flags)
    kinds = {f.get_attribute("class").split()[-1] for f in flags}
    assert "unverified" in kinds and "inconsistent" in kinds  # the committed data holds both kinds
    assert P.name in driver.find_element("css selector", "section h2").text
    assert not [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]


def test_nyud_section(site, driver):
    """The NYUD section: its own rows (published and the reproduced run, none of PASCAL's), depth at its decimals,
    the reference named with its source, a plot of the rows that have a count under the Trainable policy."""
    from leaderboard.build import collect

    driver.get((site / "index.html").as_uri())
    sections = driver.find_elements("css selector", "section.protocol")
    assert [x.get_attribute("data-section") for x in sections] == [f"{p.name}-v{p.version}" for p in (P, NYUD)]
    lb = collect([site.parent / "results"])
    frame = next(x for x in lb.sections if x.protocol is NYUD).frame
    rows = _rows(driver, NYUD)
    assert len(rows) == len(frame) and len(frame) > 1
    labels = [_cell(r, "method") for r in rows]
    assert labels == [m if k == "reproduced" else lab for m, k, lab in zip(frame["method"], frame["kind"],
                      frame["label"], strict=True)]  # fmt: skip
    head = driver.find_element("css selector", f'{_section(NYUD)} th[data-key="depth"]').text
    assert "Depth" in head and "%" not in head
    digits = task_decimals(NYUD, NYUD.task("depth"))
    for r in rows:
        text = _cell(r, "depth").split(" ± ")
        assert all(len(part.split(".")[1]) == digits for part in text), text
    repro = [r for r in rows if r.get_attribute("data-kind") == "reproduced"]
    assert len(repro) == 1 and " ± " in _cell(repro[0], "delta_m")
    ref = REFERENCES[NYUD.reference]
    text = driver.find_element("css selector", f"{_section(NYUD)} p.reference").text
    assert ref.name in text and ref.source in text and "default" in text
    assert _plot_points(driver, "params", NYUD) == (1, 1)  # the reproduced row; published counts state no policy
    repro[0].click()
    detail = driver.find_element("css selector", f"{_section(NYUD)} tr.detail").text
    assert "t-interval over 2 seeds" in detail and "Depth rmse" in detail and f"--protocol {NYUD.name}" in detail
    assert not [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
