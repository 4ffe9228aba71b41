"""A compaction that fails serves its request uncompacted, counts the failure, and leaks nothing."""

from __future__ import annotations

import pytest

from vllm_attnmatch.contract.jobs import FAULTS

pytestmark = pytest.mark.server


def _complete(server, prompt, xargs=None):
    return server.client().completions.create(
        model="smollm2", prompt=prompt, max_tokens=16, temperature=0,
        extra_body={"vllm_xargs": xargs} if xargs else None,
    ).choices[0].text


@pytest.mark.parametrize("fault", FAULTS)
def test_failed_compaction_is_served_uncompacted_and_counted(plugin_server, document, fault):
    prompt = document[300:]
    plain = _complete(plugin_server, prompt)
    free = plugin_server.wait_idle_free_blocks()
    before = plugin_server.metrics()
    served = _complete(plugin_server, prompt, {"am_ratio": 0.1, "attnmatch_fault": fault})
    after = plugin_server.metrics()
    assert served == plain
    assert after["failures"] == before["failures"] + 1
    assert after["compactions"] == before["compactions"]
    assert plugin_server.wait_idle_free_blocks(expected=free) == free
    assert "compaction failed" in plugin_server.log()
