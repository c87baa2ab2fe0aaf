"""The documentation against the code: the generated configuration reference is current, the
README stays a newcomer's page (short, every command in its synopsis), and every relative link
in README.md and docs/*.md reaches a file (and a heading, when it names one)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from nightstack.cli import build_parser
from nightstack.config import Settings, reference, reference_document

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CONFIG_PAGE = ROOT / "docs" / "configuration.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_BYTES = 12_000  # issue 21: a newcomer's page; the rest lives in docs/

LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", flags=re.MULTILINE | re.DOTALL)


def test_configuration_reference_is_current() -> None:
    text = CONFIG_PAGE.read_text(encoding="utf-8")
    assert reference_document(text) == text, (
        "docs/configuration.md differs from the settings in config.py; regenerate it with\n"
        "    .venv/bin/python -m nightstack.config docs/configuration.md"
    )


def test_every_setting_has_a_description_and_a_row() -> None:
    rendered = reference()
    for name, field in Settings.model_fields.items():
        assert field.description and field.description.strip(), f"{name} has no description"
        assert f"| `{name}` | `NIGHTSTACK_{name.upper()}` |" in rendered, name


def test_readme_is_a_short_page() -> None:
    size = README.stat().st_size
    assert size < README_MAX_BYTES, f"README.md is {size} bytes: move detail to docs/"


def test_readme_has_the_two_commands_ci_runs() -> None:
    readme = README.read_text(encoding="utf-8")
    assert "sh deploy/dev.sh demo" in readme and "sh deploy/dev.sh test" in readme
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "exec sh deploy/dev.sh test\n" in ci


def test_readme_synopsis_names_every_command() -> None:
    readme = README.read_text(encoding="utf-8")
    synopsis = readme[readme.index("## Usage") :].split("```")[1]
    (commands,) = [
        a.choices for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    ]
    for command in commands:
        assert re.search(rf"^nightstack {command}\b", synopsis, flags=re.MULTILINE), command


def _anchors(page: Path) -> set[str]:
    """GitHub's ids for the page's headings: lower case, punctuation dropped, spaces to '-'."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text(encoding="utf-8")), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_relative_links_reach_a_file_and_heading() -> None:
    broken = []
    for page in PAGES:
        for target in LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
