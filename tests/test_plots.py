"""Figure export: HTML always, PNG through kaleido when a Chromium is present."""
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
    assert "cdn.plot.ly" in written["html"].read_text() or "plotly" in written["html"].read_text()


def test_without_a_browser_html_is_still_written(isolated_root, monkeypatch):
    monkeypatch.setenv("BROWSER_PATH", str(isolated_root / "no-such-browser"))
    monkeypatch.setattr(go.Figure, "write_image", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no chrome")))
    with pytest.warns(UserWarning, match="apt-get install -y chromium"):
        written = save_figure(_fig(), "99_nobrowser")
    assert "png" not in written and written["html"].exists()
