"""The docs resolve: links, anchors and quoted commands in README.md, docs/*.md and cluster/README.md.

A relative link must name a file or folder of the repository, and its ``#anchor`` a heading of the target as
GitHub slugs it. Every ``xswinir CMD`` quoted in a fenced code block or in inline code must name a real
sub-command (and sub-sub-command, as in ``xswinir texture train``), and ``xswinir CMD --help`` must exit 0.
Each ``python -m MODULE`` quoted must name an importable module. No Ray, no torch work: seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest

from xswinir import cli

REPO_ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")), REPO_ROOT / "cluster" / "README.md"]

FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})")
# A code span may continue onto the next line of its paragraph, never past a blank line.
INLINE_CODE = re.compile(r"(?<!`)(`+)(?!`)((?:[^\n]|\n(?![ \t]*\n))+?)(?<!`)\1(?!`)")
HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
# [text](target "title") and ![alt](target); the text may hold one level of brackets and span lines.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]*)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^[ \t]{0,3}\[[^\]]+\]:[ \t]*<?(\S+?)>?(?:[ \t]+.*)?$", re.M)
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)=\"([^\"]+)\"", re.I)
HTML_ANCHOR = re.compile(r"<a\b[^>]*?\b(?:id|name)=\"([^\"]+)\"", re.I)
ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$", re.M)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # https:, mailto:, ...: not ours to check offline
# `xswinir [-v] CMD ...`, not a path such as xswinir/configs or a name such as xswinir_blur_noise.
COMMAND = re.compile(r"(?<![\w./-])xswinir(?:[ \t]+(?:-v|--verbose))*[ \t]+([a-z][a-z0-9_-]*)([^\n]*)")
# What may stand before a command on its line: nothing, a prompt or shell operator, environment variables
# (`$ xswinir ...`, `... && xswinir ...`, `XSWINIR_MAX_PIXELS=N xswinir ...`); not prose in an error message.
COMMAND_PREFIX = re.compile(r"(?:.*[$;&|(])?(?:[ \t]*[A-Z_][A-Z0-9_]*=\S*)*[ \t]*")
PYTHON_MODULE = re.compile(r"\bpython3?[ \t]+-m[ \t]+([A-Za-z_][\w.]*)")
# `xswinir.evaluation.evaluate(...)` and `from xswinir.texture import a, b` in code: names a reader will type.
DOTTED_NAME = re.compile(r"(?<![\w./])(xswinir(?:\.[A-Za-z_]\w*)+)")
FROM_IMPORT = re.compile(r"^[ \t]*from[ \t]+(xswinir[\w.]*)[ \t]+import[ \t]+([\w, \t]+)", re.M)


def split_markdown(text: str) -> tuple[str, list[tuple[int, str]]]:
    """Separate a Markdown text into prose and code.

    Args:
        text: the whole file.

    Returns:
        ``(prose, code)``: ``prose`` is ``text`` of the same length and line layout with every fenced block,
        inline code span and HTML comment blanked out (so offsets still give line numbers); ``code`` is each
        fenced block's and code span's content with the 1-based line it starts on.
    """
    code: list[tuple[int, str]] = []
    lines = text.split("\n")
    fence: str | None = None
    block: list[str] = []
    start = 0
    for number, line in enumerate(lines, 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence, block, start = match.group(1), [], number
            lines[number - 1] = " " * len(line)
        elif fence is not None:
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence) \
                    and not line.strip().strip(fence[0]):
                code.append((start + 1, "\n".join(block)))
                fence = None
            else:
                block.append(line)
            lines[number - 1] = " " * len(line)
    if fence is not None:  # an unclosed fence runs to the end of the file, as GitHub renders it
        code.append((start + 1, "\n".join(block)))
    prose = "\n".join(lines)
    prose = HTML_COMMENT.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), prose)

    def blank(match: re.Match[str]) -> str:
        code.append((prose.count("\n", 0, match.start()) + 1, match.group(2).replace("\n", " ")))
        return re.sub(r"[^\n]", " ", match.group(0))

    return INLINE_CODE.sub(blank, prose), code


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: the rendered text lower-cased, punctuation dropped, spaces to dashes.

    Args:
        heading: the heading's Markdown source, without the leading ``#``.
    """
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading renders as its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every ``#anchor`` a Markdown file offers: its headings' slugs (repeats numbered ``-1``, ``-2`` as GitHub
    does) and explicit ``<a id=...>``/``<a name=...>`` anchors."""
    prose, _ = split_markdown(path.read_text(encoding="utf-8"))
    # Headings are read from the text with only fences blanked: a heading may hold inline code.
    with_spans = split_markdown_fences_only(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set(HTML_ANCHOR.findall(prose))
    for match in ATX_HEADING.finditer(with_spans):
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def split_markdown_fences_only(text: str) -> str:
    """``text`` with its fenced code blocks blanked out (a ``#`` comment in a bash block is not a heading)."""
    lines = text.split("\n")
    fence: str | None = None
    for number, line in enumerate(lines):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None and match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
            fence = None
        elif fence is None:
            continue
        lines[number] = ""
    return "\n".join(lines)


def links(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, target)`` for every link and image in a Markdown file's prose (code is not a link)."""
    prose, _ = split_markdown(path.read_text(encoding="utf-8"))
    for pattern in (INLINE_LINK, REFERENCE_DEFINITION, HTML_LINK):
        for match in pattern.finditer(prose):
            yield prose.count("\n", 0, match.start()) + 1, match.group(1)


def broken_links(path: Path, root: Path) -> list[str]:
    """Every relative link of ``path`` that does not resolve, as ``file:line: target: why``.

    Args:
        path: a Markdown file.
        root: the repository; a link that leaves it breaks in every clone.
    """
    problems = []
    for line, target in links(path):
        if not target or SCHEME.match(target):
            continue
        where, _, anchor = target.partition("#")
        resolved = (path.parent / unquote(where)).resolve() if where else path.resolve()
        name = f"{path.relative_to(root)}:{line}: {target}"
        if not resolved.is_relative_to(root.resolve()):
            problems.append(f"{name}: points outside the repository")
        elif not resolved.exists():
            problems.append(f"{name}: no such file")
        elif anchor and resolved.suffix == ".md" and unquote(anchor) not in anchors(resolved):
            problems.append(f"{name}: no heading with anchor #{anchor} in {resolved.relative_to(root.resolve())}")
    return problems


def quoted_commands(path: Path) -> Iterator[tuple[int, str, list[str]]]:
    """``(line, command, following words)`` for every ``xswinir COMMAND ...`` in a file's code."""
    _, code = split_markdown(path.read_text(encoding="utf-8"))
    for start, chunk in code:
        for match in COMMAND.finditer(chunk):
            if not COMMAND_PREFIX.fullmatch(chunk[chunk.rfind("\n", 0, match.start()) + 1:match.start()]):
                continue
            yield start + chunk.count("\n", 0, match.start()), match.group(1), match.group(2).split()


def sub_commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A parser's sub-command parsers by name (argparse keeps them on its sub-parsers action); {} if none."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def unknown_commands(path: Path, root: Path, parser: argparse.ArgumentParser) -> list[str]:
    """Every quoted ``xswinir CMD [SUB]`` whose CMD (or SUB, for a command with sub-commands) does not exist."""
    commands = sub_commands(parser)
    problems = []
    for line, name, rest in quoted_commands(path):
        where = f"{path.relative_to(root)}:{line}: xswinir {name}"
        if name not in commands:
            problems.append(f"{where}: no such command (commands: {', '.join(commands)})")
            continue
        nested = sub_commands(commands[name])
        if nested and rest and re.fullmatch(r"[a-z][a-z0-9_-]*", rest[0]) and rest[0] not in nested:
            problems.append(f"{where} {rest[0]}: no such sub-command (choices: {', '.join(nested)})")
    return problems


def documented_commands() -> list[tuple[str, ...]]:
    """Each distinct quoted command, with its sub-command where it has them: ``("texture", "train")``."""
    parser = cli.build_parser()
    commands = sub_commands(parser)
    found: set[tuple[str, ...]] = set()
    for path in DOC_FILES:
        for _, name, rest in quoted_commands(path):
            if name not in commands:
                continue  # reported by test_quoted_commands_exist
            nested = sub_commands(commands[name])
            found.add((name, rest[0]) if nested and rest and rest[0] in nested else (name,))
    return sorted(found)


def quoted_python_names(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, dotted name)`` for every ``xswinir.module.name`` and ``from xswinir.module import name`` in code."""
    for start, chunk in split_markdown(path.read_text(encoding="utf-8"))[1]:
        for match in DOTTED_NAME.finditer(chunk):
            yield start + chunk.count("\n", 0, match.start()), match.group(1)
        for match in FROM_IMPORT.finditer(chunk):
            for name in match.group(2).split(","):
                yield start + chunk.count("\n", 0, match.start()), f"{match.group(1)}.{name.strip()}"


def resolves(dotted: str) -> bool:
    """Whether ``dotted`` names a module, or an attribute reached from the longest importable module prefix."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        module_name = ".".join(parts[:split])
        try:
            target = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and module_name.startswith(err.name) and module_name != "xswinir":
                continue  # not a module: the rest of the name may be an attribute of a shorter prefix
            raise  # a module that exists but imports something missing: show that error
        for attribute in parts[split:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


def test_doc_files_exist():
    assert all(path.is_file() for path in DOC_FILES), [str(p) for p in DOC_FILES if not p.is_file()]
    assert len(DOC_FILES) > 3, "docs/*.md is empty"


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_relative_links_resolve(path: Path):
    assert broken_links(path, REPO_ROOT) == []


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_quoted_commands_exist(path: Path):
    assert unknown_commands(path, REPO_ROOT, cli.build_parser()) == []


@pytest.mark.parametrize("command", documented_commands(), ids=" ".join)
def test_quoted_command_answers_help(command: tuple[str, ...], capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: xswinir {' '.join(command)}")


def test_every_command_is_in_the_command_table():
    table = (REPO_ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert [name for name in cli.COMMANDS if f"`xswinir {name}" not in table] == []


def test_quoted_python_modules_exist():
    missing = []
    for path in DOC_FILES:
        for start, chunk in split_markdown(path.read_text(encoding="utf-8"))[1]:
            for match in PYTHON_MODULE.finditer(chunk):
                if importlib.util.find_spec(match.group(1)) is None:
                    missing.append(f"{path.relative_to(REPO_ROOT)}:{start}: python -m {match.group(1)}")
    assert missing == []


def test_quoted_python_names_exist():
    quoted = {(path.relative_to(REPO_ROOT), line, name)
              for path in DOC_FILES for line, name in quoted_python_names(path)}
    assert len(quoted) > 5
    assert sorted(f"{path}:{line}: {name}" for path, line, name in quoted if not resolves(name)) == []


def test_github_slug_matches_github():
    # Slugs as github.com renders them for headings of this repository.
    assert github_slug("Does the texture term help? (`xswinir study`)") == "does-the-texture-term-help-xswinir-study"
    assert github_slug("The GPU check (`bench/gpu_check.py`)") == "the-gpu-check-benchgpu_checkpy"
    assert github_slug("Training data, degradations and shards") == "training-data-degradations-and-shards"
    assert github_slug("Quickstart: two commands") == "quickstart-two-commands"
    assert github_slug("The console, and the demo's curves") == "the-console-and-the-demos-curves"
    assert github_slug("Explaining a real low-quality photo (no HR image)") == \
        "explaining-a-real-low-quality-photo-no-hr-image"


def test_checker_finds_broken_links(tmp_path: Path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "picture.png").write_bytes(b"")
    (tmp_path / "docs" / "good.md").write_text("# Hello, World!\n\n## Usage\n\n## Usage\n\n<a id=\"kept\"></a>\n")
    bad = tmp_path / "docs" / "bad.md"
    bad.write_text(
        "# Bad\n\n"
        "[fine](good.md) [fine](good.md#hello-world) [fine](good.md#usage-1) [fine](#bad) [fine](good.md#kept)\n"
        "![fine](../picture.png) [web](https://example.com/nowhere.md) [fine](<good.md> \"title\")\n"
        "[missing\nfile](missing.md) and ![missing picture](picture.png)\n"
        "[wrong anchor](good.md#hello) [own anchor](#nope) [out](../../elsewhere.md)\n"
        "`[in code](missing.md)`\n\n"
        "```\n[in a fence](missing.md)\n```\n"
        "[ref]: gone.md\n"
        "<!-- [commented out](missing.md) -->\n"
    )
    assert broken_links(bad, tmp_path) == [
        "docs/bad.md:5: missing.md: no such file",
        "docs/bad.md:6: picture.png: no such file",
        "docs/bad.md:7: good.md#hello: no heading with anchor #hello in docs/good.md",
        "docs/bad.md:7: #nope: no heading with anchor #nope in docs/bad.md",
        "docs/bad.md:7: ../../elsewhere.md: points outside the repository",
        "docs/bad.md:13: gone.md: no such file",
    ]


def test_checker_finds_unknown_commands(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text(
        "Run `xswinir demo`, `xswinir -v train --config demo` or `xswinir texture show CLF`.\n\n"
        "```bash\nxswinir evaluate --hr x  # renamed long ago\nxswinir texture fit --images x\n```\n\n"
        "Paths and names are not commands: `xswinir/configs/demo.yaml`, `--config xswinir_blur_noise`.\n"
        "Nor is prose: xswinir nothing, `not an xswinir shard: no column`.\n"
    )
    assert unknown_commands(page, tmp_path, cli.build_parser()) == [
        f"page.md:4: xswinir evaluate: no such command (commands: {', '.join(cli.COMMANDS)})",
        "page.md:5: xswinir texture fit: no such sub-command (choices: train, show)",
    ]
