"""The evaluation corpus: real texts of six kinds, split ONCE into a DEV set (all tuning) and a TEST set
(reporting only).

Why: defaults tuned on two licence texts looked 9–21 % better than H2O there and tied it on unseen texts
of other kinds (issue 12). Every default and threshold is chosen on :data:`DEV`; :data:`TEST` is only
ever reported. Never move a text between the sets after seeing numbers on it.

Where the texts come from: files every fresh machine of this kind has without downloads — the OS licence
texts (``/usr/share/common-licenses``, package base-files), docs of Debian packages that are always
installed here (bash, coreutils, sed, xz-utils; ``/usr/share/doc``, gzip-compressed), and the sources and
docs of the pinned Python 3.11.7 standard library (``sysconfig`` stdlib path). Each entry carries the
SHA-256 of the exact text used, so a machine whose file differs fails loudly instead of silently
measuring something else.

How the split was made (fixed before any measurement on the new texts, 2026-12-01): the texts are
listed per kind in a fixed order; the three licence texts the earlier defaults were tuned on (GPL-3,
Apache-2.0, LGPL-2.1) go to DEV (they are spent), the other licences to TEST (DEV already holds three);
every other text alternates within its kind in the listed order, the first to DEV, the next to TEST, and
so on. Every kind is in both sets: DEV 11 texts, TEST 8.

Each text holds at least 1.5k tokens of the bundled SmolLM2 tokenizer (a 1024-token document plus a
256-token continuation, the fidelity defaults, with room to spare); ``from_line`` skips a table of
contents where one would be scored instead of the text.

Which defaults were chosen on which set: see ``benchmarks/results/defaults.md`` (written by the DEV
study; the TEST numbers are reported beside them, never used to choose).

    python -m benchmarks.common.corpus          # list the corpus with token counts; fails naming a missing file
"""

from __future__ import annotations

import gzip
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

LICENSES = Path("/usr/share/common-licenses")
DOC = Path("/usr/share/doc")
STDLIB = Path(sysconfig.get_paths()["stdlib"])

KINDS = ("licence", "prose", "technical_docs", "source_code", "changelog", "qa")


@dataclass(frozen=True)
class Text:
    """One corpus text: ``name`` (what results show), ``kind``, the file, the first line used (1-based)."""

    name: str
    kind: str
    path: Path
    sha256: str
    from_line: int = 1

    def read(self) -> str:
        """The text, decompressed and cut at ``from_line``; a clear error when missing or changed."""
        if not self.path.is_file():
            raise FileNotFoundError(
                f"corpus text {self.name!r} ({self.kind}): {self.path} is missing on this machine; the corpus "
                "needs the OS licence texts, /usr/share/doc of bash, coreutils, sed, xz-utils and the Python "
                "3.11 standard library")
        data = self.path.read_bytes()
        if self.path.suffix == ".gz":
            data = gzip.decompress(data)
        text = data.decode("utf-8")
        if self.from_line > 1:
            text = "".join(text.splitlines(keepends=True)[self.from_line - 1:])
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest != self.sha256:
            raise ValueError(
                f"corpus text {self.name!r}: {self.path} differs from the file the split was made with "
                f"(sha256 {digest[:12]}… ≠ {self.sha256[:12]}…); numbers would not be comparable")
        return text


def _t(name, kind, path, sha, from_line=1) -> Text:
    return Text(name, kind, Path(path), sha, from_line)


#: Every text, per kind, in the fixed order the split alternates over.
TEXTS: tuple[Text, ...] = (
    # licences: the first three were used for tuning before this corpus existed -> DEV
    _t("GPL-3", "licence", LICENSES / "GPL-3", "3972dc9744f6499f0f9b2dbf76696f2ae7ad8af9b23dde66d6af86c9dfb36986"),
    _t("Apache-2.0", "licence", LICENSES / "Apache-2.0", "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"),
    _t("LGPL-2.1", "licence", LICENSES / "LGPL-2.1", "dc626520dcd53a22f727af3ee42c770e56c97a64fe3adb063799d8ab032fe551"),
    _t("MPL-2.0", "licence", LICENSES / "MPL-2.0", "fab3dd6bdab226f1c08630b1dd917e11fcb4ec5e1e020e2c16f83a0a13863e85"),
    _t("GFDL-1.3", "licence", LICENSES / "GFDL-1.3", "110535522396708cea37c72a802c5e7e81391139f5f7985631c93ef242b206a4"),
    # prose
    _t("bash-INTRO", "prose", DOC / "bash/INTRO.gz", "88d4f438af6af108d5970aed3a88208a295b6dafc2d55b549169bb0a372ec1fb"),
    _t("coreutils-README", "prose", DOC / "coreutils/README.gz", "0a0de85d2ef35f7183319751251813a059516e657e0602012d0a3af58106f356"),
    # technical documentation
    _t("bash-POSIX", "technical_docs", DOC / "bash/POSIX.gz", "a3ebf2665f22b49ac910ddd33e57a8dfedefef6559209ff17927188eb13ddffc"),
    _t("bash-COMPAT", "technical_docs", DOC / "bash/COMPAT.gz", "3c7f70faae3d94736aa93e2e8a85850c549c06ef255477e1479fbfeeb9be90d3"),
    _t("idle-README", "technical_docs", STDLIB / "idlelib/README.txt", "4f2dc8ffdbfc7837b60edc32ac2f593a220f4abf0ea00cc477382ad8ecf8eb3d"),
    # source code
    _t("py-textwrap", "source_code", STDLIB / "textwrap.py", "62867e40cdea6669b361f72af4d7daf0359f207c92cbeddfc7c7506397c1f31c"),
    _t("py-json-decoder", "source_code", STDLIB / "json/decoder.py", "9f02654649816145bc76f8c210a5fe3ba1de142d4d97a1c93105732e747c285b"),
    _t("py-functools", "source_code", STDLIB / "functools.py", "6d80018a3fa9fed44c5b78f881987ee3ab3fb1238b077b4e6dcb4b76da7db73b"),
    _t("py-heapq", "source_code", STDLIB / "heapq.py", "6d43277e5c76fc0f073cd388fcff852d14d068f6bb6d4886c340f8b75a1229a9"),
    # changelogs / release notes
    _t("bash-NEWS", "changelog", DOC / "bash/NEWS.gz", "5c552e7120c7dc7c797cdce807acb9a55bbf6a4b1f86169065650f2f4dc75e43"),
    _t("idle-NEWS", "changelog", STDLIB / "idlelib/NEWS.txt", "428bc87778b0fce730a5d23474c16debe2ad379bceded7733b5d52960801fcfb"),
    _t("idle-HISTORY", "changelog", STDLIB / "idlelib/HISTORY.txt", "531067a78ad392f25631aba1d885f40786cf5f47854577162c9f90ff1f33164c"),
    # question & answer
    _t("xz-FAQ", "qa", DOC / "xz-utils/faq.txt.gz", "97ea64c7578870443ff4669cd6dce43d94d857faa7cffef1aa462ff9c8089c07"),
    _t("sed-FAQ", "qa", DOC / "sed/sedfaq.txt.gz", "e5dd72db157d778433f22aa86cebae3604bac49e91b961861f8dfbdfaafa6418", from_line=267),  # skip the table of contents
)

TUNED_BEFORE = ("GPL-3", "Apache-2.0", "LGPL-2.1")


def _split() -> tuple[tuple[str, ...], tuple[str, ...]]:
    dev, test = list(TUNED_BEFORE), []
    for kind in KINDS:
        rest = [t.name for t in TEXTS if t.kind == kind and t.name not in TUNED_BEFORE]
        for i, name in enumerate(rest):
            (test if kind == "licence" or i % 2 == 1 else dev).append(name)
    return tuple(dev), tuple(test)


#: The split, written out (``_split`` documents the rule; a test checks they agree).
DEV: tuple[str, ...] = (
    "GPL-3", "Apache-2.0", "LGPL-2.1", "bash-INTRO", "bash-POSIX", "idle-README", "py-textwrap", "py-functools",
    "bash-NEWS", "idle-HISTORY", "xz-FAQ",
)
TEST: tuple[str, ...] = (
    "MPL-2.0", "GFDL-1.3", "coreutils-README", "bash-COMPAT", "py-json-decoder", "py-heapq", "idle-NEWS", "sed-FAQ",
)
SETS = {"dev": DEV, "test": TEST}
BY_NAME = {t.name: t for t in TEXTS}


def get(name: str) -> Text:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"no corpus text {name!r}; known: {', '.join(BY_NAME)}") from None


def names(selection: str) -> tuple[str, ...]:
    """``dev`` | ``test`` | ``all`` -> text names."""
    if selection == "all":
        return DEV + TEST
    if selection not in SETS:
        raise ValueError(f"unknown corpus set {selection!r}; choose dev, test or all")
    return SETS[selection]


def set_of(name: str) -> str | None:
    """``dev`` / ``test`` for a corpus text, None for anything else (e.g. a path given by hand)."""
    return "dev" if name in DEV else "test" if name in TEST else None


def read(name: str) -> str:
    return get(name).read()


def main() -> None:
    from . import texts

    tok = texts.tokenizer()
    for set_name, members in SETS.items():
        for name in members:
            t = get(name)
            print(f"{set_name:4} {t.kind:15} {name:18} {len(tok(t.read())['input_ids']):6} tokens  {t.path}")


if __name__ == "__main__":
    main()
