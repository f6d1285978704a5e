"""Every ```python block of README.md runs as written (issue: README blocks state imports and input shapes).

Each block runs on its own, in a fresh namespace, inside a temporary working directory, on CPU (blocks pick
``"cuda" if torch.cuda.is_available() else "cpu"`` themselves) and without downloads.
"""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    """(line of the opening ```python fence, code) for every ```python fenced block."""
    blocks, lines, start, body = [], README.read_text(encoding="utf-8").splitlines(), None, []
    for number, line in enumerate(lines, 1):
        if start is None:
            if line.strip() == "```python":
                start, body = number, []
        elif line.strip() == "```":
            blocks.append((start, "\n".join(body) + "\n"))
            start = None
        else:
            body.append(line)
    assert start is None, f"README.md: the ```python block opened at line {start} is never closed"
    return blocks


BLOCKS = python_blocks()


def test_blocks_are_found():
    assert len(BLOCKS) > 10, f"only {len(BLOCKS)} python blocks found in {README}"


def test_no_fixed_tmp_paths():
    offenders = [line for line, code in BLOCKS if re.search(r"[\"']/tmp\b", code)]
    assert not offenders, f"README.md python blocks at lines {offenders} write into a fixed /tmp path"


def test_no_downloads():
    offenders = [line for line, code in BLOCKS
                 if any("pretrained=True" in c.split("#")[0] for c in code.splitlines())]
    assert not offenders, f"README.md python blocks at lines {offenders} download weights (pretrained=True)"


@pytest.mark.parametrize("line,code", [pytest.param(line, code, id=f"line-{line}") for line, code in BLOCKS])
def test_block_runs(line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
