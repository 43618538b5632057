"""`jetssd evaluate` end to end: a shipped model on events of the project's generator, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("onnxruntime")

from jetssd.cli import app

SHIPPED_FPN = Path(__file__).resolve().parents[2] / "model_repository" / "pfjet_ssd_fpn" / "2"


@pytest.mark.slow
def test_evaluate_cli_writes_the_report_and_plots(generated_event_dir: Path, tmp_path: Path) -> None:
    files = sorted(generated_event_dir.glob("*.h5"))
    args = ["evaluate", "--model", f"fpn={SHIPPED_FPN}", "--report", str(tmp_path / "report"), "--threads", "1"]
    for f in files:
        args += ["--data", str(f)]
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output

    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["events"] == 6  # WW, tt, HH: two events each
    fpn = report["models"]["fpn"]
    assert fpn["n_truth"] > 0
    assert 0.0 <= fpn["ap"]["voc"] <= 1.0
    assert set(fpn["per_class"]) == {"t", "V", "H"}
    assert fpn["seam"]["window_rad"] == 0.8
    assert 0 <= fpn["seam"]["n_truth"] <= fpn["n_truth"]
    assert report["baseline"] is None  # the fixture's files carry no baseline jets
    assert f"fpn: AP voc {fpn['ap']['voc']:.3f}" in result.output
    assert "near the φ edge" in result.output
    for png in ("pr_curves.png", "precision_vs.png", "residuals.png"):
        assert (tmp_path / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
