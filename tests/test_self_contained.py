"""The repository stands on its own: no tracked file points at notes outside it, and every citation
of docs/paper-numbers.md (with its section anchor) leads somewhere that exists."""
import re
import shutil
import subprocess
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAPER_NUMBERS = ROOT / "docs" / "paper-numbers.md"

# Built by concatenation so that this file does not match its own patterns.
_SHARED = "shared"
OUTSIDE_PATTERNS = (_SHARED + "/reference", "../" + _SHARED + "/", "/work/" + _SHARED)

# `paper-numbers.md#anchor` (with or without a leading docs/ or ../docs/); the anchor is optional.
CITATION = re.compile(r"paper-numbers\.md(?:#([\w-]+))?")


def outside_mentions(text):
    """The lines of ``text`` that mention a folder outside the repository, as (line number, line)."""
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)
            if any(p in line for p in OUTSIDE_PATTERNS)]


def tracked_text_files():
    """(relative path, text) of every tracked file that is present and is text (binary files skipped)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no tracked-file list")
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, names):
        path = ROOT / name
        if not path.is_file():  # deleted in the working tree, or a submodule
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue
        try:
            yield name, data.decode("utf-8")
        except UnicodeDecodeError:
            continue


def heading_anchors(markdown):
    """The anchors GitHub gives the headings of ``markdown``, plus explicit ``id``/``name`` anchors."""
    anchors, seen = set(), {}
    in_fence = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        m = None if in_fence else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            text = re.sub(r"[`*]", "", m.group(1))  # code and emphasis markup, not content
            text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link keeps its text
            slug = "".join(c for c in unicodedata.normalize("NFC", text.lower())
                           if c.isalnum() or c in " -_").replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    anchors.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", markdown))
    return anchors


def test_the_outside_pattern_check_can_fail():
    """The check below would catch a citation of the outside folder, in every spelling we forbid."""
    for bad in ("# from /work/" + _SHARED + "/reference/paper-numbers.md",
                "see ../" + _SHARED + "/reference/method-spec.md",
                "`" + _SHARED + "/reference/guided-notes.md` §1a"):
        assert outside_mentions("ok line\n" + bad) == [(2, bad.strip())]
    assert outside_mentions("docs/paper-numbers.md#table-1-cifar-10\nshared phases, /work/main") == []


def test_no_tracked_file_points_outside_the_repository():
    found = [f"{name}:{n}: {line[:120]}" for name, text in tracked_text_files()
             for n, line in outside_mentions(text)]
    assert not found, ("these tracked files cite notes outside the repository; cite docs/paper-numbers.md "
                       "(or another file in the repository) instead:\n" + "\n".join(found))


def test_paper_numbers_citations_in_experiments_lead_somewhere():
    assert PAPER_NUMBERS.is_file(), "docs/paper-numbers.md is missing: experiments/*.yaml cite it"
    anchors = heading_anchors(PAPER_NUMBERS.read_text(encoding="utf-8"))
    broken = []
    for path in sorted((ROOT / "experiments").glob("*.yaml")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for m in CITATION.finditer(line):
                if m.group(1) and m.group(1) not in anchors:
                    broken.append(f"experiments/{path.name}:{n}: #{m.group(1)}")
    assert not broken, ("these anchors are not headings of docs/paper-numbers.md:\n" + "\n".join(broken)
                        + f"\nits anchors: {sorted(anchors)}")


def test_paper_numbers_links_in_docs_lead_somewhere():
    """Markdown links to docs/paper-numbers.md (from any tracked .md file, itself included) hit a heading."""
    anchors = heading_anchors(PAPER_NUMBERS.read_text(encoding="utf-8"))
    link = re.compile(r"\]\(((?:[\w./-]*/)?paper-numbers\.md)?(?:#([\w-]+))?\)")
    broken = []
    for name, text in tracked_text_files():
        if not name.endswith(".md"):
            continue
        own = name == "docs/paper-numbers.md"
        for n, line in enumerate(text.splitlines(), 1):
            for m in link.finditer(line):
                target, anchor = m.groups()
                if target is None and not own:  # a link within another page
                    continue
                if target is not None and not (ROOT / name).parent.joinpath(target).resolve() == PAPER_NUMBERS:
                    broken.append(f"{name}:{n}: {target} is not docs/paper-numbers.md")
                elif anchor and anchor not in anchors:
                    broken.append(f"{name}:{n}: #{anchor}")
    assert not broken, "broken links to docs/paper-numbers.md:\n" + "\n".join(broken)


def test_anchor_rule_matches_githubs():
    """The heading-to-anchor rule the checks above use, on the kinds of heading paper-numbers.md has."""
    md = ("# Title\n## Table 1, EDM rows, CIFAR-10\n### The quoted stochastic-sampler row (ImageNet 64)\n"
          "## Guided teacher reference, Ho and Salimans\n```\n# not a heading\n```\n## Title\n")
    assert heading_anchors(md) == {"title", "table-1-edm-rows-cifar-10",
                                   "the-quoted-stochastic-sampler-row-imagenet-64",
                                   "guided-teacher-reference-ho-and-salimans", "title-1"}


# ----------------------------------------------------------------- section citations of the notes docs
#
# Code, gin, YAML, test and doc comments cite the project's reference pages by section:
# `method-spec §5`, `edm-notes §5.1`, `edm-notes §2.6 and §3.5`, `method-spec §8, §10`, `method-spec §1-2`,
# `edm-notes §§1-4, 7`, `` `guided-notes.md` §1a ``, and a gin comment may carry a list on to the next
# line (`§3,\n# §8`).  Each cited name must be a page docs/<name>.md and each section a numbered heading
# of it (`## 5. TRACT on VP/DDIM teachers`, `### 5.1 …`, `### 1a. …`).  Any `<word>-notes §N` counts, so
# a citation of notes that have no page here fails too.

NOTES_DOCS = ("method-spec", "edm-notes", "guided-notes", "ml-tract-notes")
_SECTION = r"\d+(?:\.\d+)*[a-z]?\b"
_ITEM = rf"§?[ \t]*{_SECTION}(?:[ \t]*[-–][ \t]*{_SECTION})?"
_SEP = r"[ \t]*(?:,|\band\b)\s*(?:#[ \t]*)?"  # a comma or "and", possibly across a comment line break
NOTES_CITATION = re.compile(
    r"(?<![\w-])(method-spec|[a-z][a-z-]*-notes)(?:\.md)?`?[ \t]*(§§?)[ \t]*"
    rf"((?:{_SECTION}(?:[ \t]*[-–][ \t]*{_SECTION})?)(?:{_SEP}{_ITEM})*)", re.IGNORECASE)
_CITED_ITEM = re.compile(rf"(§?)[ \t]*({_SECTION})(?:[ \t]*[-–][ \t]*({_SECTION}))?")
NUMBERED_HEADING = re.compile(r"#{1,6}[ \t]+§?[ \t]*(\d+(?:\.\d+)*[a-z]?)\.?(?=[ \t]|$)")


def notes_citations(text):
    """(line number, name, section) for every section of the notes docs that ``text`` cites.

    A range a-b of whole sections cites each of a..b; a range of subsections cites its two ends.  After a
    single § only items with their own § continue the list (`§5, §9`); after §§ bare numbers do too
    (`§§1-4, 7`), so that `method-spec §6, 2024` cites §6 alone.
    """
    found = []
    for m in NOTES_CITATION.finditer(text):
        name, opener, items = m.group(1).lower(), m.group(2), m.group(3)
        line = text.count("\n", 0, m.start()) + 1
        for i, item in enumerate(_CITED_ITEM.finditer(items)):
            own_mark, first, last = item.groups()
            if i and not own_mark and opener == "§":
                break
            if last is None:
                sections = [first]
            elif first.isdigit() and last.isdigit() and int(first) <= int(last):
                sections = [str(n) for n in range(int(first), int(last) + 1)]
            else:
                sections = [first, last]
            found.extend((line, name, s) for s in sections)
    return found


def numbered_headings(markdown):
    """The section numbers of ``markdown``'s numbered headings ("## 5. …" gives "5", "### 1a. …" "1a"), fences skipped."""
    numbers, in_fence = set(), False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        m = None if in_fence else NUMBERED_HEADING.match(line)
        if m:
            numbers.add(m.group(1))
    return numbers


def unresolved_notes_citations(files, docs_dir):
    """'path:line: name §N (why)' for each citation in ``files`` ((path, text) pairs) that docs_dir/<name>.md
    does not resolve: the page is missing, or has no heading numbered N."""
    headings, broken = {}, []
    for path, text in files:
        for line, name, section in notes_citations(text):
            if name not in headings:
                doc = Path(docs_dir) / f"{name}.md"
                headings[name] = numbered_headings(doc.read_text(encoding="utf-8")) if doc.is_file() else None
            if headings[name] is None:
                broken.append(f"{path}:{line}: {name} §{section} (there is no docs/{name}.md)")
            elif section not in headings[name]:
                broken.append(f"{path}:{line}: {name} §{section} (docs/{name}.md has no heading numbered {section})")
    return broken


def test_notes_citations_resolve_to_numbered_headings():
    files = list(tracked_text_files())
    cited = {name for _, text in files for _, name, _ in notes_citations(text)}
    assert set(NOTES_DOCS) <= cited, f"the citation pattern found no citation of {sorted(set(NOTES_DOCS) - cited)}"
    broken = unresolved_notes_citations(files, ROOT / "docs")
    assert not broken, ("these citations do not resolve to a numbered heading of a page in docs/; add the "
                        "section there (or fix the citation):\n" + "\n".join(broken))


def test_notes_citation_check_can_fail(tmp_path):
    """Good citations pass; a missing section, a fenced pseudo-heading, a continued list and a page that does
    not exist each fail (on a temporary docs folder, nothing written to the repository)."""
    spec = "method-" "spec"  # split so that this file does not cite anything itself
    (tmp_path / f"{spec}.md").write_text("# Spec\n## 1. One\n### 1.1 One one\n## 2. Two\n### 2a. Two a\n"
                                         "```\n## 3. not a heading\n```\n## 10. Ten\n", encoding="utf-8")
    good = [f"see {spec} §1.1 and §2", f"({spec} §1-2, §10)", f"`{spec}.md` §2a", f"Method-{'spec'} §2.",
            f"{spec} §N is how they are cited", f"{spec} §10, 2024", f"{spec} §§1-2, 10"]
    assert unresolved_notes_citations([("good.py", "\n".join(good))], tmp_path) == []
    assert len(notes_citations("\n".join(good))) == 11
    bad = {f"{spec} §3": f"{spec} §3",                     # only inside a code fence
           f"{spec} §1.2": f"{spec} §1.2",
           f"{spec} §§1-4": f"{spec} §3",                  # 3 and 4 missing; the first is reported here
           f"# ({spec} §1,\n# §4)": f"{spec} §4",          # a gin comment continued on the next line
           f"{spec} §1, §2b": f"{spec} §2b",
           "`guided-" "notes.md` §1a": "guided-" "notes §1a",  # no docs/guided-notes.md in tmp_path
           "latent-" "notes §2": "latent-" "notes §2"}         # notes that have no page at all
    for text, first in bad.items():
        broken = unresolved_notes_citations([("bad.gin", text)], tmp_path)
        assert broken and first in broken[0], (text, broken)
    assert "there is no docs/guided-notes.md" in unresolved_notes_citations([("x", "guided-" "notes §0")], tmp_path)[0]


# Markdown links into the notes pages (and between them) must hit a heading, like those to paper-numbers.md.
NOTES_LINK = re.compile(r"\]\(((?:[\w./-]*/)?(?:" + "|".join(NOTES_DOCS) + r"|[\w-]+)\.md)?(?:#([\w-]+))?\)")


def test_links_into_and_out_of_the_notes_pages_lead_somewhere():
    notes = {ROOT / "docs" / f"{name}.md" for name in NOTES_DOCS}
    anchors, broken = {}, []
    for name, text in tracked_text_files():
        if not name.endswith(".md"):
            continue
        source = (ROOT / name).resolve()
        for n, line in enumerate(text.splitlines(), 1):
            for m in NOTES_LINK.finditer(line):
                target, anchor = m.groups()
                page = source if target is None else source.parent.joinpath(target).resolve()
                if page not in notes and source not in notes:
                    continue  # neither into nor out of a notes page
                if not page.is_file():
                    broken.append(f"{name}:{n}: {target} does not exist")
                    continue
                if anchor:
                    if page not in anchors:
                        anchors[page] = heading_anchors(page.read_text(encoding="utf-8"))
                    if anchor not in anchors[page]:
                        broken.append(f"{name}:{n}: {target or ''}#{anchor}")
    assert not broken, "broken links into or out of the notes pages:\n" + "\n".join(broken)
