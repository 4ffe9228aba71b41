"""Reports of ids a client chose are scoped to the credentials they were sent with (issue 21 §3): the
records the API server keeps, and the check the report route makes, on real files."""

from __future__ import annotations

from vllm_attnmatch.ipc.report_scope import ScopeRecorder, base_id, credential_scope, may_read


def test_a_chosen_id_is_readable_only_with_the_credentials_it_was_sent_with(tmp_path):
    ScopeRecorder(tmp_path, "run").record("mine", "Bearer alice")
    assert may_read("cmpl-mine", "Bearer alice", tmp_path, "run")
    assert may_read("chatcmpl-mine", "Bearer alice", tmp_path, "run")
    assert not may_read("cmpl-mine", "Bearer bob", tmp_path, "run")
    assert not may_read("cmpl-mine", None, tmp_path, "run")
    assert not may_read("cmpl-mine", "Bearer alice", tmp_path, "another-run")  # another run's record grants nothing


def test_a_random_id_has_no_scope_and_the_credential_is_never_stored(tmp_path):
    assert may_read("cmpl-4f0c2a9be1d07733", "Bearer anyone", tmp_path, "run")  # vLLM's random form
    assert may_read("chatcmpl-4f0c2a9be1d07733", None, tmp_path, "run")
    assert not may_read("cmpl-mine", "Bearer anyone", tmp_path, "run")  # chosen, with no record: refused
    ScopeRecorder(tmp_path, "run").record("mine", "Bearer alice")
    (stored,) = (tmp_path / "scopes-run").iterdir()
    assert "alice" not in stored.read_text() and stored.read_text() == credential_scope("Bearer alice")
    assert base_id("cmpl-x") == "x" and base_id("chatcmpl-x") == "x" and base_id("x") is None


def test_each_process_keeps_a_bounded_number_of_records_oldest_dropped_first(tmp_path):
    recorder = ScopeRecorder(tmp_path, "run", limit=3)
    for i in range(5):
        recorder.record(f"id{i}", "Bearer alice")
    assert len(list((tmp_path / "scopes-run").iterdir())) == 3
    assert not may_read("cmpl-id4", "Bearer bob", tmp_path, "run")
    # A forgotten chosen id is refused to everyone (fails closed): pushing a victim's record out opens nothing.
    assert not may_read("cmpl-id0", "Bearer alice", tmp_path, "run")
    assert not may_read("cmpl-id0", "Bearer bob", tmp_path, "run")
