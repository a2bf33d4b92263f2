"""Figure export: HTML always (offline, reproducible), PNG through kaleido when a Chromium is present."""
from __future__ import annotations

import shutil

import plotly.graph_objects as go
import pytest

from lib.plots import save_figure


def _fig():
    return go.Figure(go.Scatter(x=[0, 1, 2], y=[1, 3, 2]))


def test_save_figure_writes_html_and_png(isolated_root):
    if not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")):
        pytest.skip("no Chromium for static export (apt-get install chromium)")
    written = save_figure(_fig(), "99_test")
    assert written["html"] == isolated_root / "figures" / "99_test.html"
    assert written["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stamp = written["png"].stat().st_mtime_ns
    save_figure(_fig(), "99_test")
    assert written["png"].stat().st_mtime_ns == stamp  # the same figure renders to the same bytes


def test_html_works_offline_and_reruns_to_the_same_bytes(isolated_root, monkeypatch):
    monkeypatch.setattr(go.Figure, "to_image", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no chrome")))
    with pytest.warns(UserWarning):
        html = save_figure(_fig(), "99_offline")["html"]
    page = html.read_text()
    assert '<script charset="utf-8" src="plotly.min.js"></script>' in page and "cdn.plot.ly" not in page
    assert 'id="figure-99_offline"' in page
    bundle = html.parent / "plotly.min.js"
    assert bundle.stat().st_size > 1_000_000  # the whole library, once for every figure
    stamps = html.stat().st_mtime_ns, bundle.stat().st_mtime_ns
    with pytest.warns(UserWarning):
        save_figure(_fig(), "99_offline")
    assert (html.stat().st_mtime_ns, bundle.stat().st_mtime_ns) == stamps and html.read_text() == page
    with pytest.warns(UserWarning):
        save_figure(go.Figure(go.Bar(x=[1], y=[2])), "99_offline")  # a changed figure is rewritten
    assert html.read_text() != page and sorted(p.name for p in html.parent.iterdir()) == ["99_offline.html", "plotly.min.js"]


def test_without_a_browser_html_is_still_written(isolated_root, monkeypatch):
    monkeypatch.setenv("BROWSER_PATH", str(isolated_root / "no-such-browser"))
    monkeypatch.setattr(go.Figure, "to_image", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no chrome")))
    with pytest.warns(UserWarning, match="apt-get install -y chromium"):
        written = save_figure(_fig(), "99_nobrowser")
    assert "png" not in written and written["html"].exists()
