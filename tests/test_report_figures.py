"""Figures a journal accepts: TrueType fonts in every PDF (read from the PDF's bytes), budget axes labelled 64,
128 (not 2^6), titles with the task and the model, a legend that explains the compress mode and hides no point,
bootstrap CI error bars, a colour-blind-safe heatmap and distinct colours per series of the memory figure."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib.colors as mcolors
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from test_report_tables import make_run, row

from kvbench.report import figures, plots
from kvbench.report.paper import build_report
from kvbench.report.summary import rows_frame
from kvbench.report.tables import bootstrap_ci

SCORES = {("full", None): [1, 1, 1, 1], ("snapkv", 64): [1, 0, 1, 1], ("snapkv", 128): [1, 0, 0, 1]}


def niah_rows(compress: str = "prompt") -> list[dict]:
    return [
        row(m, b, i, compress=compress, key=f"{m}{b}{i}{compress}", score=float(s), meta={"length": 1000, "depth": i})
        for (m, b), scores in SCORES.items()
        for i, s in enumerate(scores)
    ]  # fmt: skip


@pytest.fixture
def drawn(monkeypatch):
    """Every figure a call draws, by file stem (drawn, so tick labels and extents are final)."""
    figs: dict = {}
    real = plots.save

    def keep(fig, out_dir, stem):
        paths = real(fig, out_dir, stem)
        FigureCanvasAgg(fig).draw()  # a canvas again (closing the figure dropped it), every artist laid out
        figs[stem] = fig
        return paths

    for module in (plots, figures):
        monkeypatch.setattr(module, "save", keep)
    return figs


def pdf_font_subtypes(path: Path) -> set[str]:
    """The /Subtype of every font object of a PDF (matplotlib writes them uncompressed)."""
    data = path.read_bytes()
    fonts = re.findall(rb"/Type\s*/Font\b[^>]*?/Subtype\s*/(\w+)|/Subtype\s*/(\w+)[^>]*?/Type\s*/Font\b", data)
    return {(a or b).decode() for a, b in fonts}


def test_every_pdf_embeds_truetype_fonts(tmp_path):
    run = make_run(tmp_path / "run", niah_rows())
    files = build_report([run], tmp_path / "out")["files"]
    pdfs = [f for f in files if f.suffix == ".pdf"]
    assert {p.name for p in pdfs} >= {"accuracy_vs_budget.pdf", "accuracy_vs_kv_mib.pdf", "niah_heatmap.pdf"}
    for pdf in pdfs:
        subtypes = pdf_font_subtypes(pdf)
        assert subtypes, pdf
        assert "Type3" not in subtypes, (pdf.name, subtypes)
        assert subtypes <= {"TrueType", "Type0", "CIDFontType2"}, (pdf.name, subtypes)  # Type0 over TrueType
        assert b"/FontFile2" in pdf.read_bytes()  # the TrueType program embedded


def test_accuracy_figure_ticks_title_legend_and_error_bars(tmp_path, drawn):
    frame = rows_frame(niah_rows())
    figures.accuracy_figure(frame, tmp_path, "budget")
    fig = drawn["accuracy_vs_budget"]
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["64", "128"]
    assert ax.get_title() == "niah, tiny_random"
    legend = fig.legends[0]
    assert legend.get_title().get_text() == "compress: question compressed with the context"
    assert [t.get_text() for t in legend.get_texts()] == ["full (full cache)", "snapkv"]
    # Below the panel: the legend overlaps no axes, so it hides no point.
    renderer = fig.canvas.get_renderer()
    assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
    # snapkv's error bars are the bootstrap intervals of its scores
    (bars,) = [c for c in ax.containers if c.get_label() == "snapkv"]
    segments = bars.lines[2][0].get_segments()
    expected = [bound for b in (64, 128) for bound in bootstrap_ci(SCORES[("snapkv", b)])]
    assert expected[:2] == [0.25, 1.0] and expected[2:] != expected[:2]
    assert [y for s in segments for y in (s[0][1], s[1][1])] == pytest.approx(expected)


def test_two_compress_modes_are_explained_in_the_legend(tmp_path, drawn):
    frame = rows_frame(niah_rows("prompt") + niah_rows("context"))
    figures.accuracy_figure(frame, tmp_path, "kv_mib")
    fig = drawn["accuracy_vs_kv_mib"]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "snapkv (context compressed, question appended after)" in labels
    assert "snapkv (question compressed with the context)" in labels
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels() if t.get_text()]
    assert ticks and all(re.fullmatch(r"[0-9.]+", t) for t in ticks), ticks  # plain numbers, never 2^k


def luminance(rgba) -> float:
    """Relative luminance (WCAG) of an sRGB colour."""
    r, g, b = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3]]
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_heatmap_palette_is_colour_blind_safe(tmp_path, drawn):
    plots.niah_heatmap(rows_frame(niah_rows()), tmp_path)
    fig = drawn["niah_heatmap"]
    cmap = fig.axes[0].images[0].get_cmap()
    # Sequential: luminance rises monotonically from 0 to 1, so the scale reads in grey and without telling red
    # from green (red-yellow-green peaks at yellow in the middle).
    light = [luminance(cmap(v)) for v in np.linspace(0, 1, 11)]
    assert all(b > a for a, b in zip(light, light[1:], strict=False)), light
    assert "tiny_random" in fig._suptitle.get_text()


def test_memory_figure_gives_each_budget_its_own_colour(tmp_path, drawn):
    rows = [
        {**row(m, b, 0), "key": f"{m}{b}{t}", "turn": t, "score": None, "kv_bytes": (t + 1) * 1024}
        for m, b in (("full", None), ("snapkv", 32), ("snapkv", 64))
        for t in range(3)
    ]
    plots.memory_vs_turn(rows_frame(rows), tmp_path)
    mem = drawn["memory_vs_turn"].axes[0]
    colors = {
        line.get_label(): mcolors.to_hex(line.get_color()) for line in mem.lines if not line.get_label().startswith("_")
    }
    assert set(colors) == {"full", "snapkv @ 32", "snapkv @ 64"}
    assert len(set(colors.values())) == 3


def test_saving_a_pdf_logs_nothing_at_a_runs_log_level(tmp_path, caplog):
    # fontTools subsets the embedded TrueType fonts and logs each pruned table at INFO, the level runs log at.
    fig, ax = plots.plt.subplots()
    ax.set_title("fonts")
    with caplog.at_level("INFO"):
        plots.save(fig, tmp_path, "figure")
    assert [r.name for r in caplog.records if r.name.startswith("fontTools")] == []
