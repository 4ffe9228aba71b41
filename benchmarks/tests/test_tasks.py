"""The retrieval task suite (issue 18): generated locally on corpus texts, split DEV/TEST by haystack,
names and wording, the question never inside the document, and scored strictly."""

from __future__ import annotations

import pytest

from benchmarks.common import corpus, tasks, texts


@pytest.fixture(scope="module")
def tok():
    return texts.tokenizer()


@pytest.mark.parametrize("fmt", tasks.FORMATS)
def test_every_format_plants_its_answer_in_the_document_and_never_the_question(tok, fmt):
    for set_name in ("dev", "test"):
        task = tasks.make_task(set_name, fmt, corpus.names(set_name)[0], 3, tok, 600)
        n = len(tok(task.document, add_special_tokens=False)["input_ids"])
        assert 450 <= n <= 750, n
        assert task.questions
        for q in task.questions:
            for value in q.expected:
                assert value in task.document
            question_line = q.text.split("<|im_end|>")[0].strip()
            assert question_line not in task.document


def test_dev_and_test_tasks_share_no_haystack_name_or_wording(tok):
    dev = [tasks.make_task("dev", f, corpus.DEV[1], 0, tok, 500) for f in tasks.FORMATS]
    test = [tasks.make_task("test", f, corpus.TEST[1], 0, tok, 500) for f in tasks.FORMATS]
    assert not set(tasks.NAMES["dev"]) & set(tasks.NAMES["test"])
    for d, t in zip(dev, test):
        assert d.haystack in corpus.DEV and t.haystack in corpus.TEST
        dev_prompts = {q.text.split("\n\n", 1)[-1].split("<|im_end|>")[0] for q in d.questions}
        test_prompts = {q.text.split("\n\n", 1)[-1].split("<|im_end|>")[0] for q in t.questions}
        assert not dev_prompts & test_prompts


def test_tasks_are_reproducible_and_differ_between_seeds(tok):
    a = tasks.make_task("dev", "multi_fact", "GPL-3", 5, tok, 500)
    b = tasks.make_task("dev", "multi_fact", "GPL-3", 5, tok, 500)
    c = tasks.make_task("dev", "multi_fact", "GPL-3", 6, tok, 500)
    assert a.document == b.document and [q.expected for q in a.questions] == [q.expected for q in b.questions]
    assert a.document != c.document


def test_a_long_document_runs_into_the_next_texts_of_its_own_set(tok):
    task = tasks.make_task("test", "single_fact", corpus.TEST[0], 0, tok, 4096)
    assert len(tok(task.document, add_special_tokens=False)["input_ids"]) > 3500


def test_scores_are_strict():
    q = tasks.Question("?", ("123456",))
    assert tasks.score(q, " 123456.\n") == 1.0
    assert tasks.score(q, " 12345.\n") == 0.0
    assert tasks.score(q, " 654321 or 123456") == 0.0  # the first number is the answer
    multi = tasks.Question("?", ("111111", "222222", "333333"))
    assert tasks.score(multi, "111111, 333333 and 999999") == pytest.approx(2 / 3)
    cloze = tasks.Question("?", ("work,", "whether", "in", "Source"), kind="words")
    assert tasks.score(cloze, " work, whether in Source or Object form") == 1.0
    assert tasks.score(cloze, " work, whether on Source") == 0.0
