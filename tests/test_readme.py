"""Every ```python block of README.md and of docs/*.md runs as written (blocks state their imports and input shapes).

Each block runs on its own, in a fresh namespace, inside a temporary working directory, on CPU (blocks pick
``"cuda" if torch.cuda.is_available() else "cpu"`` themselves) and without downloads. The README stays a front
page (at most 300 lines: the reference lives in docs/), and the relative links between these pages resolve.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_LINES = 300
# The README, every page of docs/ (found, not listed: a new page is tested without touching this file), and
# benchmarks/README.md, whose links the others follow (it has no python blocks).
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINKED_PAGES = [*PAGES, ROOT / "benchmarks" / "README.md"]


def name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def python_blocks(page: Path):
    """(line of the opening ```python fence, code) for every ```python fenced block of ``page``."""
    blocks, lines, start, body = [], page.read_text(encoding="utf-8").splitlines(), None, []
    for number, line in enumerate(lines, 1):
        if start is None:
            if line.strip() == "```python":
                start, body = number, []
        elif line.strip() == "```":
            blocks.append((start, "\n".join(body) + "\n"))
            start = None
        else:
            body.append(line)
    assert start is None, f"{name(page)}: the ```python block opened at line {start} is never closed"
    return blocks


BLOCKS = [(name(page), line, code) for page in PAGES for line, code in python_blocks(page)]


def test_pages_and_blocks_are_found():
    assert len(PAGES) > 3, f"only {[name(p) for p in PAGES]} found: docs/ is missing"
    assert len(BLOCKS) > 10, f"only {len(BLOCKS)} python blocks found in {[name(p) for p in PAGES]}"


def test_readme_is_a_front_page():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines, more than {README_MAX_LINES}: move reference "
                                       f"text to a page of docs/ and link it")


def test_no_fixed_tmp_paths():
    offenders = [f"{page}:{line}" for page, line, code in BLOCKS if re.search(r"[\"']/tmp\b", code)]
    assert not offenders, f"python blocks at {offenders} write into a fixed /tmp path"


def test_no_downloads():
    offenders = [f"{page}:{line}" for page, line, code in BLOCKS
                 if any("pretrained=True" in c.split("#")[0] for c in code.splitlines())]
    assert not offenders, f"python blocks at {offenders} download weights (pretrained=True)"


def anchors(page: Path) -> set:
    """GitHub's heading anchors: lower case, punctuation but '-' and '_' dropped, spaces to '-', repeats numbered."""
    seen, found = {}, set()
    inside_fence = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            inside_fence = not inside_fence
        if inside_fence or not re.match(r"#{1,6} ", line):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def test_links_resolve():
    """Every relative link of the README, docs/ and benchmarks/README.md names a file that exists and, after '#',
    a heading of that file."""
    broken = []
    for page in LINKED_PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not checked here
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{name(page)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{name(page)}: {target} (no such heading in {name(linked)})")
    assert not broken, "broken links:\n" + "\n".join(broken)


@pytest.mark.parametrize("page,line,code", [pytest.param(page, line, code, id=f"{page}:line-{line}")
                                            for page, line, code in BLOCKS])
def test_block_runs(page, line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{page}:{line}", "exec"), {"__name__": "__readme__"})
