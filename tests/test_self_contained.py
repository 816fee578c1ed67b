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
