"""Retrieval tasks for "compact once, ask many": facts planted in real text, asked after compaction.

Why: continuation KL hides what users lose. A compacted document is only useful if the questions asked
later still find their facts (issue 18). Every task is generated here, locally and seeded, on the corpus
texts (``benchmarks.common.corpus``) as haystacks; nothing is downloaded.

Never tune on what you report: the split is by haystack *and* by task wording. A DEV task uses a DEV
text as its haystack, DEV names and the DEV template of its format; a TEST task a TEST text, TEST names
and a different TEST template of the same format. Defaults are chosen on DEV tasks only.

Formats (``FORMATS``):
- ``single_fact``: one planted fact "the <key> for <name> is <6 digits>", asked back;
- ``multi_fact``: four facts for four names (each the others' distractor), every one asked;
- ``multi_value``: three values for one name and one for a distractor name, all three asked for at once
  (scored by the share of the three values in the answer);
- ``variable_tracking``: ``X = 123456`` then, later, ``Y = X``; the value of ``Y`` is asked;
- ``cloze``: a line of the haystack itself; the question gives its start, the answer is its next words.

A task is a document (header + haystack with the planted lines) and one or more questions, each with an
answer prefix the model continues and the expected answer. The document never contains the question.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from . import corpus

FORMATS = ("single_fact", "multi_fact", "multi_value", "variable_tracking", "cloze")

#: Names are split like the texts: a DEV task never uses a TEST name.
NAMES = {
    "dev": ("Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiroshi", "Ingrid", "Jamal",
            "Katya", "Lorenzo", "Mei", "Nadia", "Oscar", "Priya"),
    "test": ("Quentin", "Rosa", "Stefan", "Tomoko", "Ulrich", "Valeria", "Wendell", "Ximena", "Yusuf", "Zofia",
             "Anders", "Beatriz", "Cyrus", "Delphine", "Emeka", "Fiona"),
}

#: (fact line, question, answer prefix) per set; the TEST wording is never seen while tuning.
FACT_TEMPLATES = {
    "dev": ("The special magic number for {name} is {value}.",
            "What is the special magic number for {name}?",
            "The special magic number for {name} is"),
    "test": ("Remember this: the secret access code of {name} is {value}.",
             "What is the secret access code of {name}?",
             "The secret access code of {name} is"),
}
MULTI_VALUE_TEMPLATES = {
    "dev": ("One of the special magic numbers for {name} is {value}.",
            "What are all the special magic numbers for {name}?",
            "The special magic numbers for {name} are"),
    "test": ("One of the lucky numbers of {name} is {value}.",
             "List every lucky number of {name}.",
             "The lucky numbers of {name} are"),
}
VARIABLE_TEMPLATES = {
    "dev": ("VAR {a} = {value}", "VAR {b} = VAR {a}", "What is the value of VAR {b}?", "The value of VAR {b} is"),
    "test": ("let {a} := {value};", "let {b} := {a};", "Which number does {b} hold?", "{b} holds the number"),
}
VARIABLE_NAMES = {"dev": ("QXT", "BRM", "KLD", "ZUP", "WEF", "HOJ", "NAV", "PYC"),
                  "test": ("gorp", "flin", "tesk", "mabu", "vord", "quix", "dral", "yenk")}
CLOZE_TEMPLATES = {
    "dev": "Complete this line of the document: \"{start}\"",
    "test": "How does the line starting with \"{start}\" continue in the text above?",
}
CLOZE_WORDS = 4  # the answer: the next four words of the line

HEADER = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nRead the following document.\n\n"
QUESTION = "\n\n{question}<|im_end|>\n<|im_start|>assistant\n{prefix}"


@dataclass
class Question:
    """A question asked after the (compacted) document: the text appended, what a correct answer holds."""

    text: str  # appended right after the document (question, assistant header, answer prefix)
    expected: tuple[str, ...]  # values (digits) or words that a correct answer contains
    kind: str = "number"  # "number": the 6-digit values found in the answer; "words": the next words
    max_new_tokens: int = 10


@dataclass
class Task:
    """One document and the questions asked about it."""

    set: str
    format: str
    haystack: str
    seed: int
    document: str  # header + haystack with the planted lines (what is compacted)
    questions: list[Question] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.set}/{self.format}/{self.haystack}/{self.seed}"


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def haystack_lines(set_name: str, first: str, tok, tokens: int) -> list[str]:
    """Lines of real text, ``tokens`` tokens or a little more, starting at the corpus text ``first`` and
    running into the next texts of the same set (a 4k or 8k document needs several)."""
    names = list(corpus.names(set_name))
    order = names[names.index(first):] + names[: names.index(first)]
    out, count = [], 0
    for name in order:
        for ln in _lines(corpus.read(name)):
            out.append(ln)
            count += len(tok(ln, add_special_tokens=False)["input_ids"]) + 1
            if count >= tokens:
                return out
    return out


def _value(rng: random.Random, used: set[str]) -> str:
    while True:
        v = str(rng.randint(100000, 999999))
        if v not in used:
            used.add(v)
            return v


def _insert(lines: list[str], planted: list[str], rng: random.Random, ordered: bool = False) -> list[str]:
    """Plant each line at a random line boundary, away from the very start and end (depths 5–90 %)."""
    n = len(lines)
    spots = sorted(rng.sample(range(max(1, n // 20), max(2, int(n * 0.9))), len(planted)))
    if not ordered:
        rng.shuffle(spots)
    out = list(lines)
    for spot, line in sorted(zip(spots, planted), key=lambda p: -p[0]):
        out.insert(spot, line)
    return out


def make_task(set_name: str, fmt: str, haystack: str, seed: int, tok, tokens: int) -> Task:
    """The task ``(set, format, haystack, seed)`` with a document of about ``tokens`` tokens."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown task format {fmt!r}; expected one of {FORMATS}")
    rng = random.Random(f"{set_name}/{fmt}/{haystack}/{seed}/{tokens}")
    lines = haystack_lines(set_name, haystack, tok, 2 * tokens)
    # Start at a random line of the first half so documents of one haystack differ between seeds.
    lines = _trim(lines[rng.randrange(0, max(1, len(lines) // 4)):], tok, tokens)
    names = rng.sample(NAMES[set_name], 4)
    used: set[str] = set()
    questions: list[Question] = []
    if fmt in ("single_fact", "multi_fact"):
        line, question, prefix = FACT_TEMPLATES[set_name]
        k = 1 if fmt == "single_fact" else 4
        values = [_value(rng, used) for _ in range(k)]
        lines = _insert(lines, [line.format(name=n, value=v) for n, v in zip(names, values)], rng)
        questions = [Question(QUESTION.format(question=question.format(name=n), prefix=prefix.format(name=n)), (v,))
                     for n, v in zip(names, values)]
    elif fmt == "multi_value":
        line, question, prefix = MULTI_VALUE_TEMPLATES[set_name]
        values = [_value(rng, used) for _ in range(3)]
        planted = [line.format(name=names[0], value=v) for v in values]
        planted.append(line.format(name=names[1], value=_value(rng, used)))  # distractor
        lines = _insert(lines, planted, rng)
        questions = [Question(QUESTION.format(question=question.format(name=names[0]),
                                              prefix=prefix.format(name=names[0])), tuple(values), max_new_tokens=28)]
    elif fmt == "variable_tracking":
        first, second, question, prefix = VARIABLE_TEMPLATES[set_name]
        a, b, c, d = rng.sample(VARIABLE_NAMES[set_name], 4)
        value, other = _value(rng, used), _value(rng, used)
        planted = [first.format(a=a, value=value), first.format(a=c, value=other),  # c = distractor chain
                   second.format(a=a, b=b), second.format(a=c, b=d)]
        # Each chain's assignment comes before its copy: plant the four lines in order a, c, b, d.
        lines = _insert(lines, planted, rng, ordered=True)
        questions = [Question(QUESTION.format(question=question.format(b=b), prefix=prefix.format(b=b)), (value,))]
    else:  # cloze
        questions, lines = _cloze(lines, rng, set_name)
    document = HEADER + "\n".join(lines)
    return Task(set_name, fmt, haystack, seed, document, questions)


def _trim(lines: list[str], tok, tokens: int) -> list[str]:
    out, count = [], 0
    for ln in lines:
        n = len(tok(ln, add_special_tokens=False)["input_ids"]) + 1
        if count + n > tokens and out:
            break
        out.append(ln)
        count += n
    return out


def _cloze(lines: list[str], rng: random.Random, set_name: str) -> tuple[list[Question], list[str]]:
    """A line of the haystack with ≥ 10 words whose words are not repeated elsewhere near it: its first
    half is the question, its next ``CLOZE_WORDS`` words the answer."""
    n = len(lines)
    candidates = [i for i in range(n // 20, int(n * 0.9)) if len(lines[i].split()) >= 10
                  and sum(lines[i] == other for other in lines) == 1]
    if not candidates:
        raise ValueError("haystack has no line fit for a cloze question")
    i = rng.choice(candidates)
    words = lines[i].split()
    cut = max(4, len(words) // 2)
    start = " ".join(words[:cut])
    answer = tuple(words[cut:cut + CLOZE_WORDS])
    q = Question(QUESTION.format(question=CLOZE_TEMPLATES[set_name].format(start=start), prefix=start),
                 answer, kind="words", max_new_tokens=12)
    return [q], lines


NUMBER = re.compile(r"\d{6}")


def _norm_words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def score(question: Question, answer: str) -> float:
    """1.0 for a correct answer, 0.0 for a wrong one (``multi_value``: the share of values found)."""
    if question.kind == "words":
        want = _norm_words(" ".join(question.expected))
        got = _norm_words(answer)[: len(want)]
        return float(got == want and bool(want))
    found = NUMBER.findall(answer)
    if len(question.expected) == 1:
        return float(bool(found) and found[0] == question.expected[0])
    return sum(v in found for v in question.expected) / len(question.expected)


def tasks(set_name: str, fmt: str, tok, tokens: int, count: int, seed0: int = 0) -> list[Task]:
    """``count`` tasks of one format, cycling through the set's haystacks (seed = trial number)."""
    hay = corpus.names(set_name)
    out = []
    for i in range(count):
        out.append(make_task(set_name, fmt, hay[i % len(hay)], seed0 + i, tok, tokens))
    return out
