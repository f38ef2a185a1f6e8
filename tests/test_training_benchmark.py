"""benchmarks/training.py runs end to end with CI-sized settings and writes valid results (the numbers themselves are
not checked: tiny models on a shared machine say nothing; docs/training.md has measured ones)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # 10-20 s of CPU (subprocesses): CI runs it with RUN_SLOW=1
def test_training_benchmark_quick(tmp_path):
    output = tmp_path / "training.json"
    command = [sys.executable, str(REPO / "benchmarks" / "training.py"), "--quick", "--output", str(output)]
    command += ["--repeats", "2", "--warmup", "0", "--threads", "1", "--data-records", "4", "--fusion-types"]
    command += ["concat", "I_M"]
    result = subprocess.run(
        command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(output.read_text())
    assert payload["data_records_per_second"] > 0
    assert [row["name"] for row in payload["rows"]] == ["llava (transformers)", "concat", "I_M"]
    assert all(row["step_s"] > 0 and row["ratio"] > 0 for row in payload["rows"])
    # On CPU the ratios are of process CPU time, each candidate step against the two baseline steps around it.
    assert payload["clock"] == "cpu" and payload["settings"]["data_image_size"] == 336
    for name in ("concat", "I_M"):
        rounds = payload["rounds"][name]
        assert len(rounds["cpu_ratio"]) == len(rounds["wall_ratio"]) == 2
        row = next(row for row in payload["rows"] if row["name"] == name)
        assert row["ratio_p25"] <= row["ratio"] <= row["ratio_p75"]
    assert {target["name"] for target in payload["targets"]} == {
        "training step ratio concat / llava",
        "data time per batch / llava step time",
    }
    assert "| concat |" in result.stdout
