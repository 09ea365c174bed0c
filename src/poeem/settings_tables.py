"""The settings tables of the docs, written from the config classes' fields
(``python -m poeem.settings_tables`` from the repository root; a test checks they are current)."""

from __future__ import annotations

import re
from pathlib import Path

from poeem.options import Option, markdown_table
from poeem.pipeline.config import run_options


def refreshed_tables(text: str, found: list[Option]) -> str:
    """``text`` with each block between ``<!-- settings: SECTION -->`` and ``<!-- end settings
    -->`` replaced by the current table of that section's settings."""

    def table(match: re.Match[str]) -> str:
        section = match.group(1)
        rows = [o for o in found if o.section == section]
        return f"<!-- settings: {section} -->\n{markdown_table(rows)}<!-- end settings -->"

    return re.sub(r"<!-- settings: (\S+) -->\n.*?<!-- end settings -->", table, text, flags=re.S)


DOCUMENTED = ("docs/concepts.md", "docs/cli.md")  # files with settings tables, from the repository root

if __name__ == "__main__":  # python -m poeem.settings_tables, from the repository root
    for name in DOCUMENTED:
        path = Path(name)
        path.write_text(refreshed_tables(path.read_text(), run_options()))
        print("wrote", path)
