"""The HTML report in a real headless Chromium: no console errors, every figure decoded, and a
screenshot that shows the plots, and the verdict block inside the first screen. Chromium comes from Debian's package (`make setup` runs
scripts/install_chromium.sh); without it these tests skip with the install hint."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from merge_lab.evaluation.compare import run_compare
from merge_lab.testing.toy import make_bigram_checkpoint

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Chromium not installed: run scripts/install_chromium.sh (or set CHROMIUM)"
)


def chromium(page: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile{len(list(tmp.glob('profile*')))}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=3000",
           *args, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


def console_messages(stderr: str) -> list[str]:
    """Everything the page wrote to its console (the report writes only on errors)."""
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln]


def open_report(html: Path, tmp: Path) -> tuple[list[str], int, np.ndarray]:
    dom = chromium(html, tmp, "--dump-dom")
    m = re.search(r'data-figures-ok="(\d+)"', dom.stdout)
    shot = tmp / "shot.png"
    chromium(html, tmp, f"--screenshot={shot}", "--window-size=1300,7000", "--hide-scrollbars")
    import matplotlib.image

    return console_messages(dom.stderr), int(m.group(1)) if m else -1, matplotlib.image.imread(str(shot))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("browser")
    make_bigram_checkpoint(root / "refuse", "I won't")
    make_bigram_checkpoint(root / "comply", "Sure")
    (root / "like.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "response": "Sure"}) + "\n" for i in range(4)))
    spec = {"output": str(root / "report"), "settings": {"limit": 4, "max_new_tokens": 8, "bootstrap": 200},
            "suites": ["harmless_refusal", "honest_truefalse", {"name": "like", "path": "like.jsonl", "kind": "likelihood"}],
            "headline": "ens",
            "candidates": [{"name": "refuse", "checkpoint": "refuse", "source": True},
                           {"name": "comply", "checkpoint": "comply", "source": True},
                           {"name": "ens", "ensemble": ["refuse", "comply"]}]}
    (root / "compare.yaml").write_text(yaml.safe_dump(spec))
    run_compare(root / "compare.yaml", progress=False)
    torch.set_num_threads(before)
    return root / "report"


def test_report_opens_without_errors_and_shows_every_plot(report, tmp_path):
    html = report / "report.html"
    n_figures = html.read_text().count("<figure>")
    assert n_figures == 3  # per-suite bars, radar, quality/cost (no MoE here: no routing plot)
    errors, ok, img = open_report(html, tmp_path)
    assert errors == [], errors
    assert ok == n_figures  # every <img> decoded with a non-zero size
    rgb = img[..., :3]
    assert rgb.std() > 0.05  # not blank
    colourful = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.25  # plot colours; tables are grey text
    assert colourful.mean() > 0.005, colourful.mean()


def test_verdict_block_is_in_the_first_screen(report, tmp_path):
    """The verdict is what a reviewer reads first: its box starts inside a 1300x900 window."""
    dom = chromium(report / "report.html", tmp_path, "--dump-dom", "--window-size=1300,900")
    top = re.search(r'data-verdict-top="(-?\d+)"', dom.stdout)
    height = re.search(r'data-viewport-height="(\d+)"', dom.stdout)
    assert top and height, "the page did not record where the verdict block is"
    assert 0 <= int(top.group(1)) < int(height.group(1)) <= 900, (top.group(1), height.group(1))
    assert "<section id=\"verdict\">" in dom.stdout and "headline score" in dom.stdout


def test_browser_check_catches_a_broken_figure(report, tmp_path):
    html = (report / "report.html").read_text()
    start = html.index("data:image/png;base64,") + len("data:image/png;base64,")
    broken = tmp_path / "broken.html"
    broken.write_text(html[:start] + "AAAA" + html[start + 400 :])
    errors, ok, _ = open_report(broken, tmp_path)
    assert ok == html.count("<figure>") - 1
    assert any("figure failed to load" in e for e in errors)
