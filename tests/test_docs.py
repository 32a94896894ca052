"""The README documents every command and exit code; every command has help."""

import re

import pytest

from catalog_tagger.cli import cli
from catalog_tagger.errors import EXIT_CODES

from .conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_has_help_and_is_in_the_readme(run_cli, name):
    result = run_cli(name, "--help")
    assert result.exit_code == 0 and len(cli.commands[name].help or "") > 20
    assert f"catalog-tagger {name}" in README


def test_exit_codes_in_the_readme_match_the_code():
    table = dict(re.findall(r"^\|\s*`?(\d+)`?\s*\|\s*([^|]+?)\s*\|", README, flags=re.M))
    assert {int(k) for k in table} == set(EXIT_CODES)


def test_exit_codes_are_in_help(run_cli):
    text = run_cli("tag", "--help").output
    for code in EXIT_CODES:
        assert re.search(rf"^\s*{code}\s", text, flags=re.M)


def test_version_option(run_cli):
    assert run_cli("--version").output.startswith("catalog-tagger, version")


def test_quick_start_is_the_two_make_commands():
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "make run" in quick and "make test" in quick
