"""DECISIONS.md is the repository's own decisions record.

(a) every decision id cited anywhere (`(D19)`, `# D10`, `decision D4`, `D13–D15`, `M1–M9`, ...) has a
    `### Dn.` / `### Mn.` heading in DECISIONS.md;
(b) every specification section cited as `§x.y` (or the endpoints of `§x.y–x.z`) has a `## §x.y` heading;
(c) no tracked text file points at files outside the repository.

What counts as a citation:
* decision ids: `D` or `M` + 1–2 digits standing alone — not after a letter, digit, `_`, `.`, `/`,
  `+`, `=` or `-` (so `pc.qualitative.D3`, hex and base64 runs are not ids) and not followed by a letter,
  digit or `_` (so `M3AE` is not an id). Ranges `D13–D15`, `M1-M9`, `M4–5` are expanded.
* sections: `§x.y` unless written as a section of a paper (`paper §2.1`, `MaskedCLIP §3`, `MLIP §2`);
  a bare `§N` only when it is attributed to the record (`DECISIONS.md §2`), since notebooks also number
  their own sections (`the contrastive loss of §5`).
Notebooks are read cell source by cell source (outputs are not citations).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "DECISIONS.md"
SELF = Path(__file__).resolve()

# where decision ids and sections are cited
CITING = [
    "nbs/*.ipynb",
    "experiments/*.ipynb",
    "tests",
    "README.md",
    "benchmarks",
    "data_cards",
    "maskedclip",
    "scripts",
    "DECISIONS.md",
]
TEXT_SUFFIXES = {".py", ".md", ".ipynb", ".txt", ".ini", ".cfg", ".toml", ".sh", ".yml", ".yaml"}

DASH = r"\s*[–-]\s*"
ID_RE = re.compile(r"(?<![\w./+=-])([DM])(\d{1,2})(?:" + DASH + r"\1?(\d{1,2}))?(?!\w)")
SEC_RE = re.compile(r"§\s?(\d+(?:\.\d+)?)(?:" + DASH + r"(\d+(?:\.\d+)?))?")
PAPER_SECTION = re.compile(r"(paper|maskedclip|mlip)\W{0,3}$", re.IGNORECASE)
ATTRIBUTED = re.compile(r"DECISIONS(\.md)?\W{0,3}$")

HEADING_ID_RE = re.compile(r"^###\s+([DM]\d{1,2})\.\s", re.MULTILINE)
HEADING_SEC_RE = re.compile(r"^##\s+§(\d+(?:\.\d+)?)\s", re.MULTILINE)


def _git_files(*specs: str) -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--", *specs], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"needs a git checkout ({e})")
    return [ROOT / p for p in out.split("\0") if p]


def _untracked_record() -> list[Path]:
    "DECISIONS.md counts even before it is committed."
    return [RECORD] if RECORD.is_file() else []


def _chunks(path: Path):
    "(where, text) pieces of a citing file: each notebook cell's source, or the whole file."
    text = path.read_text(encoding="utf-8")
    rel = path.relative_to(ROOT).as_posix()
    if path.suffix == ".ipynb":
        for i, cell in enumerate(json.loads(text)["cells"]):
            src = cell.get("source", "")
            yield f"{rel} cell {i}", "".join(src) if isinstance(src, list) else src
    else:
        yield rel, text


def _citing_files() -> list[Path]:
    files = {
        p
        for p in _git_files(*CITING) + _untracked_record()
        if p.suffix in TEXT_SUFFIXES or p.name == "DECISIONS.md"
    }
    return sorted(p for p in files if p.resolve() != SELF and p.is_file())


def cited_ids(text: str) -> set[str]:
    "Decision ids cited in `text`, ranges expanded."
    ids = set()
    for m in ID_RE.finditer(text):
        kind, lo, hi = m.group(1), int(m.group(2)), m.group(3)
        hi = int(hi) if hi is not None else lo
        ids.update(f"{kind}{n}" for n in range(lo, max(lo, hi) + 1))
    return ids


def cited_sections(text: str) -> set[str]:
    "Record sections cited in `text` (a range counts by its endpoints)."
    secs = set()
    for m in SEC_RE.finditer(text):
        before = text[max(0, m.start() - 40) : m.start()]
        if PAPER_SECTION.search(before):
            continue
        for s in (m.group(1), m.group(2)):
            if s is None:
                continue
            if "." not in s and not ATTRIBUTED.search(before):
                continue
            secs.add(s)
    return secs


def _record_text() -> str:
    assert RECORD.is_file(), "DECISIONS.md is missing at the repository root"
    return RECORD.read_text(encoding="utf-8")


def test_parsers_on_known_forms():
    assert cited_ids("(D19) # D10 decision D4 D13–D15, D22 (M5: 16) §2.5, M4 (D6 flag)") == {
        "D19",
        "D10",
        "D4",
        "D13",
        "D14",
        "D15",
        "D22",
        "M5",
        "M4",
        "D6",
    }
    assert cited_ids("decisions M1–M9 and M4-5") == {f"M{i}" for i in range(1, 10)}
    assert cited_ids("palette = pc.qualitative.D3; M3AE; 0xD3; a1D3f; base64 +D3/ x-D3") == set()
    assert cited_sections("notes §2.3–2.7, §3.4 and (§0.1, M9)") == {"2.3", "2.7", "3.4", "0.1"}
    assert cited_sections('paper §2.1 "Discussion", MaskedCLIP §3, the loss of §5') == set()
    assert cited_sections("DECISIONS.md §2, decisions M1–M9") == {"2"}


def test_record_has_every_decision_once():
    heads = HEADING_ID_RE.findall(_record_text())
    expected = [f"D{i}" for i in range(1, 44)] + [f"M{i}" for i in range(1, 10)]
    repeated = sorted({h for h in heads if heads.count(h) > 1})
    assert sorted(heads) == sorted(expected), (
        f"missing {sorted(set(expected) - set(heads))}, "
        f"extra {sorted(set(heads) - set(expected))}, repeated {repeated}"
    )


def test_every_cited_decision_id_has_a_heading():
    heads = set(HEADING_ID_RE.findall(_record_text()))
    missing = {}
    for path in _citing_files():
        for where, text in _chunks(path):
            for i in sorted(cited_ids(text) - heads):
                missing.setdefault(i, []).append(where)
    assert not missing, "decision ids without a heading in DECISIONS.md: " + "; ".join(
        f"{i} ({', '.join(w[:3])})" for i, w in sorted(missing.items())
    )


def test_every_cited_section_has_a_heading():
    heads = set(HEADING_SEC_RE.findall(_record_text()))
    missing = {}
    for path in _citing_files():
        for where, text in _chunks(path):
            for s in sorted(cited_sections(text) - heads):
                missing.setdefault(s, []).append(where)
    assert not missing, "sections without a `## §x.y` heading in DECISIONS.md: " + "; ".join(
        f"§{s} ({', '.join(w[:3])})" for s, w in sorted(missing.items())
    )


def test_citations_are_found_at_all():
    "Guards the parsers: the notebooks do cite decisions and sections, so finding none means a broken regex."
    ids, secs = set(), set()
    for path in _citing_files():
        if path == RECORD:
            continue
        for _, text in _chunks(path):
            ids |= cited_ids(text)
            secs |= cited_sections(text)
    assert {"D1", "D13", "D23", "M1", "M9"} <= ids and {"2.5", "3.4"} <= secs, (sorted(ids), sorted(secs))


# (c) spelled in pieces so that this file does not match itself: the papers folder beside the repository, any
# relative path into that shared folder, and the former notes file under either spelling (hyphen or space)
OUTSIDE = {
    "papers-folder": re.escape("shared" + "/papers"),
    "relative-shared-path": re.escape(".." + "/shared"),
    "former-notes-file": "method" + r"[- ]notes",
}


@pytest.mark.parametrize("name", OUTSIDE)
def test_nothing_points_outside_the_repository(name):
    needle = re.compile(OUTSIDE[name], re.IGNORECASE)
    hits = []
    for path in sorted(set(_git_files()) | set(_untracked_record())):
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary files
        for n, line in enumerate(text.splitlines(), 1):
            if needle.search(line):
                hits.append(f"{path.relative_to(ROOT).as_posix()}:{n}")
    assert not hits, f"{name!r} points outside the repository (cite DECISIONS.md instead): " + ", ".join(hits)
