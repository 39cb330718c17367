"""The benchmarks run end to end on tiny inputs (their figures are only meaningful at scale)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from pipeline.config import ExtractConfig
from pipeline.extract import extract
from workflows.cli import app

runner = CliRunner()


def last_json(output: str) -> dict:
    return json.loads([line for line in output.splitlines() if line.startswith("{")][-1])


def test_bench_extract_reports_both_rates_and_their_ratio(tiny_models, text_file):
    result = runner.invoke(app, ["bench", "extract", "--model", tiny_models["bert"], "--data", text_file,
                                 "--sequences", "7", "--batch-size", "4", "--no-memory"])
    assert result.exit_code == 0, result.output
    figures = last_json(result.output)
    assert figures["tokens"] > 0 and figures["plain_tokens_per_s"] > 0 and figures["extract_tokens_per_s"] > 0
    assert abs(figures["throughput_ratio"] - figures["extract_tokens_per_s"] / figures["plain_tokens_per_s"]) < 0.01
    assert figures["capture_ratio"] > 0 and "capture only" in result.output


def test_bench_reduce_compares_direct_umap_with_the_default(tiny_models, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("\n".join(f"sentence number {i} is about queries and keys and heads" for i in range(150)))
    out = str(tmp_path / "run")
    extract(ExtractConfig(model=tiny_models["bert"], data=str(data), out=out))
    result = runner.invoke(app, ["bench", "reduce", "--run", out, "--layer", "1", "--head", "0", "--points", "1000"])
    assert result.exit_code == 0, result.output
    figures = last_json(result.output)
    assert figures["points"] == 1000 and len(figures["rows"]) == 2
    assert all(0 <= row["knn_preservation"] <= 1 for row in figures["rows"])


def test_the_dashboard_opens_a_head_of_the_benchmarks_synthetic_run():
    """`qkatlas bench serve` / `bench browser` serve `SyntheticRun`, which stands in for a store's
    Run: the dashboard must build on it and open a head (a run attribute the views start to read
    would otherwise break the benchmarks only, at scale)."""
    import holoviews as hv

    from viz.data import shared_run_data
    from viz.views import Dashboard
    from workflows.bench.serve import SyntheticRun

    hv.extension("bokeh", logo=False)
    dashboard = Dashboard(shared_run_data(SyntheticRun(2_000)), {"layer": b"1", "head": b"2"})
    dashboard.panel()
    dashboard._head_tab()
    dashboard.head.load()
    assert dashboard.head.raster is not None and len(dashboard.head.raster.coords) == 4_000
    dashboard.state.selected_point = 7  # a click: the sequence view and the attention lines read the run
    assert "in sequence" in dashboard.sequence.sequence_info.object
    assert len(dashboard.head._marks().Segments.I.data) > 0


def test_bench_serve_gpu_row_compares_the_two_frame_backends():
    """`qkatlas bench serve`'s GPU row: the same head drawn from a pandas and a cuDF frame. Here
    (no cuDF) both frames are pandas, which runs every line of the row but the device's."""
    from workflows.bench.serve import time_backends

    result = time_backends(20_000, 3, 64, 48)
    assert result["points"] == 20_000 and result["identical"]
    assert result["cpu_ms"] > 0 and result["gpu_ms"] > 0


def test_bench_serve_times_the_search_view_against_the_plain_one():
    from workflows.bench.serve import time_emphasis

    result = time_emphasis(20_000, 3, 64, 48)
    assert [r["categories"] for r in result.values()] == [2, 16]
    assert all(r["hits"] > 1_000 and r["search_ms"] > 0 and r["plain_ms"] > 0 for r in result.values())


def test_bench_browser_counts_the_servers_busy_time_once_where_its_work_overlaps():
    from workflows.bench.browser import _covered

    assert _covered([]) == 0.0
    assert _covered([(0.0, 1.0), (0.5, 1.5), (2.0, 2.25)]) == 1.75  # overlap counted once, gaps not at all
    assert _covered([(0.0, 3.0), (1.0, 2.0)]) == 3.0  # a span nested in another
