"""find_files and grep against a real rg on real folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from crogia.errors import InvalidInput, NotFound
from crogia.sandbox.files import Files

from .conftest import write


@pytest.fixture
def project(root: Path) -> Path:
    write(root, "app.py", "import flask\napp = Flask(__name__)\n")
    write(root, "README.md", "# Flask demo\nUses flask.\n")
    write(root, "src/core.py", "def run():\n    return 'Flask'\n")
    write(root, "src/util/helpers.py", "x = 1\n")
    write(root, "src/test_core.py", "from core import run\n")
    write(root, "docs/guide.txt", "flask guide\n")
    write(root, "build/out.py", "Flask = None\n")
    write(root, "debug.log", "Flask log line\n")
    write(root, ".env", "SECRET_FLASK=1\n")
    write(root, ".gitignore", "build/\n*.log\n")
    write(root, ".git/config", "[core] Flask\n")
    return root


async def test_find_by_name_glob(ws: Files, project: Path) -> None:
    result = await ws.search("*.py")
    assert result.matches == ["app.py", "src/core.py", "src/test_core.py", "src/util/helpers.py"]
    assert not result.truncated
    assert (await ws.search("test_*")).matches == ["src/test_core.py"]


async def test_find_with_slash_matches_path_below_search_folder(ws: Files, project: Path) -> None:
    assert (await ws.search("src/*.py")).matches == ["src/core.py", "src/test_core.py"]
    assert (await ws.search("**/util/*.py")).matches == ["src/util/helpers.py"]
    assert (await ws.search("util/*.py", "src")).matches == ["src/util/helpers.py"]


@pytest.mark.parametrize("types", ["*.py,*.md", "py,md", " .py , .md ", "py,*.md"])
async def test_find_file_types(ws: Files, project: Path, types: str) -> None:
    result = await ws.search("*", file_types=types)
    assert result.matches == ["README.md", "app.py", "src/core.py", "src/test_core.py", "src/util/helpers.py"]


async def test_pattern_and_types_both_apply(ws: Files, project: Path) -> None:
    assert (await ws.search("*core*", file_types="py")).matches == ["src/core.py", "src/test_core.py"]
    assert (await ws.search("README*", file_types="py")).matches == []


async def test_gitignore_hidden_and_git_folder(ws: Files, project: Path) -> None:
    default = (await ws.search("*")).matches
    assert "build/out.py" not in default
    assert "debug.log" not in default
    assert ".env" not in default
    ignored = (await ws.search("*", include_ignored=True)).matches
    assert {"build/out.py", "debug.log"} <= set(ignored)
    assert ".env" not in ignored
    hidden = (await ws.search("*", include_hidden=True)).matches
    assert {".env", ".gitignore"} <= set(hidden)
    assert ".git/config" not in hidden
    everything = (await ws.search("*", include_hidden=True, include_ignored=True)).matches
    assert ".git/config" in everything


async def test_find_in_subfolder_prefixes_paths(ws: Files, project: Path) -> None:
    assert (await ws.search("*", "src/util")).matches == ["src/util/helpers.py"]


async def test_find_truncates(ws: Files, root: Path) -> None:
    for i in range(50):
        write(root, f"d/{i:02}.txt")
    result = await ws.search("*.txt", max_results=10)
    assert result.truncated
    assert len(result.matches) == 10
    assert result.matches == sorted(result.matches)
    exact = await ws.search("*.txt", max_results=50)
    assert not exact.truncated
    assert len(exact.matches) == 50


async def test_find_errors(ws: Files, project: Path) -> None:
    with pytest.raises(NotFound):
        await ws.search("*", "nope")
    with pytest.raises(InvalidInput, match="not a folder"):
        await ws.search("*", "app.py")
    with pytest.raises(InvalidInput, match="File type"):
        await ws.search("*", file_types="py;rm -rf /")
    with pytest.raises(InvalidInput):
        await ws.search("*", max_results=0)


async def test_a_nul_in_a_pattern_or_type_is_bad_input(ws: Files, project: Path) -> None:
    """Found by schemathesis: a NUL cannot be passed to rg as an argument (it was a 500)."""
    for call in (
        ws.search("a\x00b"),
        ws.search("*", file_types="py\x00"),
        ws.grep("a\x00b"),
        ws.grep("x", file_types="\x00"),
    ):
        with pytest.raises(InvalidInput, match="NUL"):
            await call


async def test_bang_pattern_is_literal(ws: Files, root: Path) -> None:
    write(root, "!important.txt")
    write(root, "other.txt")
    assert (await ws.search("!important.txt")).matches == ["!important.txt"]


async def test_grep_regex_sorted_with_compat_fields(ws: Files, project: Path) -> None:
    result = await ws.grep("Fl[a]sk")
    assert [(m.file, m.line, m.content) for m in result.matches] == [
        ("README.md", 1, "# Flask demo"),
        ("app.py", 2, "app = Flask(__name__)"),
        ("src/core.py", 2, "    return 'Flask'"),
    ]
    assert not result.truncated


async def test_grep_literal_case_and_types(ws: Files, project: Path) -> None:
    write(project, "dots.txt", "a.b\naxb\n")
    assert [m.content for m in (await ws.grep("a.b", regex=False)).matches] == ["a.b"]
    assert len((await ws.grep("a.b")).matches) == 2
    insensitive = await ws.grep("flask", case_sensitive=False, file_types="*.py,*.md")
    assert {m.file for m in insensitive.matches} == {"README.md", "app.py", "src/core.py"}
    assert len(insensitive.matches) == 5


async def test_grep_context(ws: Files, root: Path) -> None:
    write(root, "f.txt", "one\ntwo\nMATCH three\nfour\nMATCH five\nsix\nseven\n")
    result = await ws.grep("MATCH", context=1)
    first, second = result.matches
    assert (first.line, first.context_before, first.context_after) == (3, ("two",), ("four",))
    assert (second.line, second.context_before, second.context_after) == (5, ("four",), ("six",))
    edge = (await ws.grep("one", context=2)).matches[0]
    assert edge.context_before == ()
    assert edge.context_after == ("two", "MATCH three")
    with pytest.raises(InvalidInput):
        await ws.grep("x", context=-1)


async def test_grep_single_file_and_subfolder(ws: Files, project: Path) -> None:
    single = await ws.grep("Flask", "src/core.py")
    assert [(m.file, m.line) for m in single.matches] == [("src/core.py", 2)]
    folder = await ws.grep("run", "src")
    assert [(m.file, m.line) for m in folder.matches] == [("src/core.py", 1), ("src/test_core.py", 1)]
    ignored_file = await ws.grep("Flask", "debug.log")  # named explicitly: searched even if ignored
    assert [m.file for m in ignored_file.matches] == ["debug.log"]


async def test_grep_ignore_and_hidden(ws: Files, project: Path) -> None:
    default = {m.file for m in (await ws.grep("Flask|FLASK")).matches}
    assert default == {"README.md", "app.py", "src/core.py"}
    more = {m.file for m in (await ws.grep("Flask|FLASK", include_ignored=True, include_hidden=True)).matches}
    assert more == default | {"build/out.py", "debug.log", ".env", ".git/config"}


async def test_root_gitignore_applies_when_searching_subfolder(ws: Files, root: Path) -> None:
    write(root, ".gitignore", "generated/\n")
    write(root, "src/generated/x.py", "needle\n")
    write(root, "src/kept.py", "needle\n")
    assert [m.file for m in (await ws.grep("needle", "src")).matches] == ["src/kept.py"]


async def test_ignore_files_above_the_root_are_not_used(ws: Files, root: Path) -> None:
    (root.parent / ".gitignore").write_text("*.md\nws/\n")
    write(root, "notes.md", "needle\n")
    assert [m.file for m in (await ws.grep("needle")).matches] == ["notes.md"]
    assert (await ws.search("*.md")).matches == ["notes.md"]


async def test_grep_truncates_and_stops_early(ws: Files, root: Path) -> None:
    write(root, "big.txt", "hit\n" * 200_000)
    result = await ws.grep("hit", max_results=5)
    assert result.truncated
    assert len(result.matches) == 5
    assert all(m.file == "big.txt" for m in result.matches)


async def test_grep_bad_regex_reports_rg_message(ws: Files, project: Path) -> None:
    with pytest.raises(InvalidInput, match="unclosed group") as info:
        await ws.grep("(unclosed")
    assert str(project) not in info.value.message
    with pytest.raises(InvalidInput, match="empty"):
        await ws.grep("")


async def test_grep_pattern_is_data(ws: Files, root: Path, tmp_path: Path) -> None:
    write(root, "f.txt", "--files\n-rf\n$(touch pwned)\n")
    assert [m.line for m in (await ws.grep("--files", regex=False)).matches] == [1]
    assert [m.line for m in (await ws.grep("-rf")).matches] == [2]
    assert [m.line for m in (await ws.grep("$(touch pwned)", regex=False)).matches] == [3]
    assert not (root / "pwned").exists()
    assert not (tmp_path / "pwned").exists()


async def test_grep_odd_bytes(ws: Files, root: Path) -> None:
    write(root, "latin1.txt", b"caf\xe9 needle\r\n")
    write(root, "binary.bin", b"needle\x00\x01\x02")
    write(root, "name\nwith newline.txt", "needle\n")
    found = {m.file: m.content for m in (await ws.grep("needle")).matches}
    assert found == {"latin1.txt": "caf\ufffd needle", "name\nwith newline.txt": "needle"}
    assert (await ws.grep("nothing-matches-this")).matches == []
