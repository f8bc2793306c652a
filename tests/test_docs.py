"""The documentation's code runs, its test references exist, and the site builds.

Convention for code blocks in ``docs/*.md`` and ``README.md``:

- every ```` ```python ```` block runs; the blocks of one page run in order in one namespace, as a reader
  would run them one after another, in a fresh working folder, with network connections refused;
- every ```` ```pycon ```` block (an interactive session, ``>>>`` prompts) runs as a doctest in the same
  namespace, so the output and error messages it shows are checked too;
- a block directly after the HTML comment ``<!-- not run: REASON -->`` is skipped; the reason is required
  (say what it needs: the Hub, a GPU, an hour of CPU).

A block that raises fails the test, naming the page and line. Keep blocks fast: the embedded model loads
in about a second and generates in well under one.
"""

from __future__ import annotations

import ast
import dataclasses
import doctest
import logging
import re
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import txt2img

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]

PYTHON_LANGUAGES = {"python", "py", "python3"}
SESSION_LANGUAGES = {"pycon"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)")
NOT_RUN = re.compile(r"^\s*<!--\s*not run:(?P<reason>.*?)-->\s*$")
TEST_REFERENCE = re.compile(r"tests/(?P<file>test_\w+\.py)::(?P<name>test_\w+)")


@dataclasses.dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    source: str
    not_run: str | None  # the reason, when marked not run

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def code_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a markdown page, with their not-run markers."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, start = opening["indent"], i
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            i += 1
        body = textwrap.dedent("\n".join(line.removeprefix(indent) for line in lines[start + 1 : i]))
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = NOT_RUN.match(before)
        blocks.append(
            Block(
                page,
                start + 1,
                opening["lang"].lower(),
                body + "\n",
                marker["reason"].strip() if marker else None,
            )
        )
        i += 1
    return blocks


def runnable(block: Block) -> bool:
    return block.language in PYTHON_LANGUAGES | SESSION_LANGUAGES


def run_block(block: Block, namespace: dict) -> None:
    if block.language in SESSION_LANGUAGES:
        test = doctest.DocTestParser().get_doctest(
            block.source, namespace, block.where, str(block.page), block.line
        )
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        report: list[str] = []
        runner.run(test, out=report.append, clear_globs=False)
        assert runner.failures == 0, (
            f"the session at {block.where} printed something else:\n{''.join(report)}"
        )
        return
    # Offset the line numbers so that a traceback points into the markdown page.
    code = compile("\n" * block.line + block.source, str(block.page), "exec")
    try:
        exec(code, namespace)  # noqa: S102 - the documentation's own examples
    except Exception as error:
        raise AssertionError(f"the block at {block.where} raised {type(error).__name__}: {error}") from error


@pytest.fixture
def reader_sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh working folder, no network, no progress bars; txt2img's logging as it was, afterwards."""

    def refuse(*args, **kwargs):
        raise OSError("the documentation reached for the network: mark the block <!-- not run: REASON -->")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TXT2IMG_DISABLE_PROGRESS_BAR", "1")
    monkeypatch.chdir(tmp_path)
    logger = logging.getLogger("txt2img")
    level, handlers = logger.level, list(logger.handlers)
    yield tmp_path
    logger.setLevel(level)
    logger.handlers[:] = handlers
    txt2img.enable_progress_bars()


@pytest.mark.parametrize(
    "page", [p for p in PAGES if any(map(runnable, code_blocks(p)))], ids=lambda p: p.name
)
def test_code_blocks_run(page: Path, reader_sandbox: Path) -> None:
    namespace: dict = {"__name__": "__main__"}
    for block in code_blocks(page):
        if runnable(block) and block.not_run is None:
            run_block(block, namespace)


def test_the_convention_finds_the_blocks() -> None:
    blocks = [b for page in PAGES for b in code_blocks(page)]
    run = [b for b in blocks if runnable(b) and b.not_run is None]
    assert len(run) >= 10, "the block parser found almost nothing to run"
    assert any(b.language in SESSION_LANGUAGES for b in run)
    # Every fence was closed: an unclosed one would swallow the rest of its page.
    for page in PAGES:
        fences = [line for line in page.read_text(encoding="utf-8").splitlines() if FENCE.match(line)]
        assert len(fences) % 2 == 0, f"{page.name} has an unclosed code fence"


def test_not_run_markers_give_a_reason_and_mark_a_runnable_block() -> None:
    for page in PAGES:
        blocks = code_blocks(page)
        for block in blocks:
            if block.not_run is not None:
                assert block.not_run, f"{block.where}: say why the block is not run"
                assert runnable(block), (
                    f"{block.where}: only python and pycon blocks run; the marker is not needed"
                )
        markers = sum(bool(NOT_RUN.match(line)) for line in page.read_text(encoding="utf-8").splitlines())
        assert markers == sum(b.not_run is not None for b in blocks), (
            f"{page.name}: a not-run marker is not right above a block"
        )


def test_code_blocks_name_a_language() -> None:
    """A block that runs Python must say so, or the tests would never run it."""
    for page in PAGES:
        for block in code_blocks(page):
            if block.language == "":
                looks_like_python = re.search(
                    r"^(import |from \w+ import |\w+ = \w+\()", block.source, re.MULTILINE
                )
                assert not looks_like_python, f"{block.where} looks like Python: fence it as ```python"


def test_test_references_exist() -> None:
    """Pages cite tests as ``tests/test_file.py::test_name``; each must name a test that exists."""
    defined: dict[str, set[str]] = {}
    references = 0
    for page in PAGES:
        for match in TEST_REFERENCE.finditer(page.read_text(encoding="utf-8")):
            references += 1
            path = ROOT / "tests" / match["file"]
            assert path.is_file(), f"{page.name} cites {match[0]}, but {path.name} does not exist"
            if match["file"] not in defined:
                tree = ast.parse(path.read_text(encoding="utf-8"))
                defined[match["file"]] = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
            assert match["name"] in defined[match["file"]], (
                f"{page.name} cites {match[0]}, which does not exist"
            )
    assert references >= 20, "the Reliability page cites its tests as tests/test_file.py::test_name"


def test_every_page_is_in_the_site_navigation() -> None:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = set(re.findall(r"^\s*- [^:\n]+: (\S+\.md)\s*$", config, re.MULTILINE))
    assert nav == {p.name for p in DOCS.glob("*.md")}


def test_site_builds_strictly(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "reliability" / "index.html").is_file()
