"""Real text for the benchmarks, tokenised by the served model's tokenizer.

A text is named by a corpus name (``benchmarks.common.corpus``: the DEV/TEST split of real texts of six kinds),
a licence under /usr/share/common-licenses, or a path. ``dev`` / ``test`` / ``all`` in a list of texts
expand to that corpus set (:func:`expand`). A document/continuation split of a text is what the fidelity
numbers score.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from . import corpus

LICENSES = Path("/usr/share/common-licenses")
#: the texts the fidelity suite uses by default (long enough for 1024 + 256 tokens)
DEFAULT_TEXTS = ("GPL-3", "Apache-2.0")
#: concatenated, in this order, when a prompt longer than one text is needed (speed suite, 8k tokens)
LONG_TEXTS = ("GPL-3", "Apache-2.0", "GPL-2", "MPL-2.0", "LGPL-2.1", "GFDL-1.3")


def path_of(name: str) -> Path:
    """A corpus text's file, a file under /usr/share/common-licenses by name, or any path."""
    if name in corpus.BY_NAME:
        return corpus.BY_NAME[name].path
    return Path(name) if os.path.sep in name else LICENSES / name


def display_name(name: str) -> str:
    """What results call a text: its corpus name, else the file name."""
    return name if name in corpus.BY_NAME else path_of(name).name


def read(name: str) -> str:
    """The text (a corpus name is checked against its recorded digest, see ``benchmarks.common.corpus``)."""
    if name in corpus.BY_NAME:
        return corpus.read(name)
    path = path_of(name)
    if not path.is_file():
        raise SystemExit(f"text {name!r}: no file {path} (corpus names: {', '.join(corpus.BY_NAME)})")
    return path.read_text()


def expand(names) -> list[str]:
    """Text names with ``dev`` / ``test`` / ``all`` replaced by the corpus set, duplicates dropped."""
    out: list[str] = []
    for name in names:
        for n in (corpus.names(name) if name in ("dev", "test", "all") else (name,)):
            if n not in out:
                out.append(n)
    return out


@functools.lru_cache(maxsize=4)
def tokenizer(folder: str | None = None):
    """The bundled model's tokenizer (or the one in ``folder``)."""
    from transformers import AutoTokenizer

    if folder is None:
        from vllm_attnmatch.model import ensure_model

        folder = str(ensure_model())
    return AutoTokenizer.from_pretrained(folder)


def token_ids(tok, name: str) -> list[int]:
    return tok(read(name))["input_ids"]


def split(ids: list[int], doc_tokens: int, cont_tokens: int, name: str = "text") -> tuple[list[int], list[int]]:
    """Document = the first ``doc_tokens`` tokens, continuation = the next ``cont_tokens``."""
    if len(ids) < doc_tokens + cont_tokens:
        raise SystemExit(f"{name} has {len(ids)} tokens < {doc_tokens} + {cont_tokens}")
    return ids[:doc_tokens], ids[doc_tokens : doc_tokens + cont_tokens]


def long_ids(tok, tokens: int, offset: int = 0) -> list[int]:
    """``tokens`` tokens of real text starting ``offset`` tokens in, from the licence texts laid end to end."""
    ids: list[int] = []
    for name in LONG_TEXTS:
        if path_of(name).exists():
            ids += token_ids(tok, name)
        if len(ids) >= offset + tokens:
            return ids[offset : offset + tokens]
    raise SystemExit(f"the licence texts hold {len(ids)} tokens < {offset + tokens}")
