"""Load with faults, small: chains from two client processes while an engine worker and a client are killed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import load_with_faults  # noqa: E402

pytestmark = pytest.mark.slow


def test_every_surviving_request_completes_exactly_once_and_no_kv_block_leaks() -> None:
    args = load_with_faults.build_parser().parse_args(["--apps", "4", "--requests", "20", "--clients", "2"])
    result = load_with_faults.run(args)
    checks = result["checks"]
    assert checks["surviving requests submitted"] == checks["expected surviving requests"] == 40
    assert checks["surviving requests finished exactly once"] == 40
    assert checks["requests finished more than once"] == 0
    assert checks["surviving requests failed or cancelled"] == 0
    assert checks["killed client's requests"] == 40
    assert checks["killed client's requests finished once"] + checks["killed client's requests cancelled once"] == 40
    assert checks["chains completed by surviving clients"] == 8
    assert checks["retried after the engine kill"] >= 0
    assert all(v["kv_blocks_used"] == v["kv_blocks_cached"] for v in result["kv_when_idle"].values())
    assert len(result["kv_when_idle"]) == 2
    assert result["ok"]
