"""bench/ab.py refuses what it cannot compare, before it starts anything: a baseline that holds no
gateway package, and rounds or durations out of bounds (loads stay bounded in count and time)."""

from __future__ import annotations

from pathlib import Path

import ab  # bench/ab.py (pythonpath includes bench/)
import pytest


@pytest.mark.parametrize("argv", [
    ["--rounds", "0"], ["--rounds", "21"], ["--duration", "0"], ["--duration", "61"], ["--warmup", "31"],
])
def test_out_of_bounds_runs_are_refused(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "gateway").mkdir()
    with pytest.raises(SystemExit) as exit_:
        ab.main(["--baseline", str(tmp_path), *argv])
    assert exit_.value.code == 2 and "--rounds must be in [1, 20]" in capsys.readouterr().err


def test_a_baseline_without_a_gateway_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        ab.main(["--baseline", str(tmp_path)])
    assert exit_.value.code == 2 and "holds no gateway/ package" in capsys.readouterr().err


def test_the_median_skips_missing_values() -> None:
    rows = [{"a_rps": 3.0}, {"a_rps": None}, {"a_rps": 1.0}, {"a_rps": 2.0}, {}]
    assert ab.median(rows, "a_rps") == 2.0 and ab.median([{}], "a_rps") is None
