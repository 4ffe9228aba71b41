"""64 concurrent mixed requests: no errors, stock tokens for the uncompacted ones, no leaked blocks."""

from __future__ import annotations

import pytest

from harness.server import run_mixed_load

pytestmark = pytest.mark.server


def test_sixty_four_concurrent_mixed_requests(plugin_server, stock_server, document):
    text = (document * 3)[:8000]
    report = run_mixed_load(plugin_server, stock_server, text, num_requests=64, max_tokens=12)
    assert report["errors"] == 0, report["error_samples"]
    assert report["uncompacted_checked"] == 16
    assert report["isolation_mismatches"] == 0
    assert report["leaked_blocks"] == 0
