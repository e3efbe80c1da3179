"""docs/results/README.md: its tables are what tools/results_report.py generates from the CSVs beside it."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REPORT = REPO / "docs" / "results" / "README.md"


def test_report_tables_are_generated_from_the_committed_csvs():
    proc = subprocess.run(
        [sys.executable, "tools/results_report.py", "--check"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_table_has_rows_and_every_image_exists():
    text = REPORT.read_text()
    blocks = re.findall(r"<!-- table:(\w+) -->\n(.*?)<!-- end -->", text, re.S)
    assert {name for name, _ in blocks} == {"scaling", "gap", "variants", "fit", "ste", "continue"}
    for name, body in blocks:
        assert body.count("\n| ") >= 2, f"table {name} has no rows"
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (REPORT.parent / image).is_file(), image
