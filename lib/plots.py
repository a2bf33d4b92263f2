"""Figure helpers: every figure a notebook makes goes through ``save_figure`` or ``show``.

``save_figure(fig, "00_training_curves")`` writes ``figures/00_training_curves.html`` (interactive)
and ``figures/00_training_curves.png`` (static, through kaleido, which needs a Chromium: Debian's
``chromium`` package works).  Every HTML file loads the one ``figures/plotly.min.js`` written
beside them (plotly's ``include_plotlyjs="directory"``), so the figures work offline and each
stays small, and its plot has a fixed element id (``figure-{name}``), so an unchanged figure
gives byte-identical files: a file is rewritten (atomically) only when its content changed, and
rerunning the notebooks leaves the tree clean.
``show(fig, name)`` saves the figure and displays a scale-1 PNG inline, so an executed notebook
embeds a small image rather than megabytes of plotly JSON and stays readable on GitHub.
"""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio

from lib import paths
from lib.results import atomic_output

PNG_SCALE = 2  # crisp on high-DPI screens; a 700x450 figure is ~100 kB
PLOTLY_JS = "plotly.min.js"  # the one copy of plotly.js, beside the figures (include_plotlyjs="directory")
TEMPLATE = "plotly_white"
pio.templates.default = TEMPLATE

_CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def _ensure_browser_path() -> None:
    """Point kaleido at a system Chromium when it has not been told where one is."""
    if os.environ.get("BROWSER_PATH"):
        return
    for name in _CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            os.environ["BROWSER_PATH"] = found
            return


_SERVER: dict[str, bool] = {}


def _to_png(fig: go.Figure, width: int, height: int, scale: float) -> bytes:
    """``fig`` as PNG bytes.  One Chromium per process: kaleido's sync server is started on the first
    figure and stopped at exit, so a figure costs ~0.3 s instead of a browser start (~4 s) each time;
    the bytes are the same either way."""
    _ensure_browser_path()
    if "started" not in _SERVER:
        import atexit

        import kaleido

        _SERVER["started"] = False
        try:
            kaleido.start_sync_server(silence_warnings=True)
            _SERVER["started"] = True
            atexit.register(kaleido.stop_sync_server, silence_warnings=True)
        except Exception:  # no server: plotly starts a browser per figure (and raises if there is none)
            pass
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The kopts argument is ignored")
        return fig.to_image(format="png", width=width, height=height, scale=scale)


def _write_if_changed(path: Path, data: bytes) -> None:
    if not path.exists() or path.read_bytes() != data:
        with atomic_output(path) as tmp:
            tmp.write_bytes(data)


def save_figure(fig: go.Figure, name: str, width: int = 800, height: int = 500) -> dict[str, Path]:
    """Write ``figures/{name}.html`` and ``figures/{name}.png`` (and ``figures/plotly.min.js`` if it
    is missing or from another plotly version); return the paths of the figure's files.

    If no Chromium is available the PNG is skipped with a warning that says how to get one
    (``apt-get install -y chromium``); the HTML is always written.
    """
    from plotly.offline import get_plotlyjs

    out = paths.figures_dir()
    written: dict[str, Path] = {}
    html = out / f"{name}.html"
    page = fig.to_html(include_plotlyjs="directory", full_html=True, div_id=f"figure-{name}")
    _write_if_changed(html, page.encode("utf-8"))
    _write_if_changed(out / PLOTLY_JS, get_plotlyjs().encode("utf-8"))
    written["html"] = html
    png = out / f"{name}.png"
    try:
        _write_if_changed(png, _to_png(fig, width, height, PNG_SCALE))
        written["png"] = png
    except Exception as err:  # kaleido raises several types when Chromium is missing
        warnings.warn(
            f"Could not write {png.name} ({type(err).__name__}: {err}). Static export needs a "
            "Chromium: `apt-get install -y chromium` (or set BROWSER_PATH). The HTML was written.",
            stacklevel=2,
        )
    return written


def show(fig: go.Figure, name: str, width: int = 800, height: int = 500) -> None:
    """Save the figure (see ``save_figure``, which returns the paths) and display it inline as its PNG.

    Outside a notebook this just saves.  Falls back to plotly's own rendering if no PNG could be
    made, so the notebook still shows the figure.  Returns nothing, so that a cell ending in
    ``show(...)`` prints no paths.
    """
    written = save_figure(fig, name, width=width, height=height)
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:  # pragma: no cover - IPython ships with the dev extras
        return
    if get_ipython() is None:
        return
    if "png" in written:
        # embed a scale-1 render (a quarter of the bytes of figures/'s scale-2 file): notebooks stay small
        display(Image(data=_to_png(fig, width, height, 1), width=width))
    else:
        fig.show()
