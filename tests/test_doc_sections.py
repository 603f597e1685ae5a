"""The doc-section writer and reader the table script uses: replace in place, append when new, idempotent."""

from __future__ import annotations

from pathlib import Path

from binq.report import markdown_grid, write_section
from binq.tables import section_body


def test_markdown_grid() -> None:
    assert markdown_grid(["a", "b"], [["1", "2"]]) == "| a | b |\n|---|---|\n| 1 | 2 |"


def test_write_section_replaces_only_its_section(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    write_section(doc, "one", "first")
    write_section(doc, "two", "second")
    doc.write_text(doc.read_text() + "\nprose after\n")
    write_section(doc, "one", "first, again")
    text = doc.read_text()
    assert text.count("<!-- begin one -->") == 1 and "first, again" in text and "first\n" not in text
    assert "second" in text and text.endswith("prose after\n")
    assert "<!-- end one -->\n\n<!-- begin two -->" in text  # a blank line after each section
    write_section(doc, "one", "first, again")
    assert doc.read_text() == text  # rewriting the same content changes nothing


def test_section_body_reads_what_write_section_wrote(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("# Title\n\nprose\n")
    write_section(doc, "one", "| a |\n\nmore text\n\n")
    write_section(doc, "two", "second")
    text = doc.read_text()
    assert section_body(text, "one") == "| a |\n\nmore text"  # the body, trailing blank lines stripped
    assert section_body(text, "two") == "second"
    assert section_body(text, "three") is None
    assert section_body("<!-- begin one -->\n<!-- end one -->\n", "one") == ""
