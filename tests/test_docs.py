"""The README documents every command, option and exit code, and nothing that does not exist."""

from __future__ import annotations

import re

import click
import pyarrow as pa
import pytest

from catalog_tagger.cli import cli
from catalog_tagger.errors import EXIT_CODES
from catalog_tagger.schema import OUTPUT_FIELDS

from .conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")

# Commands that may land in cli.py before the README has their section. Each is let off
# the README checks only while it has no "### catalog-tagger NAME" section; once the
# section exists it is checked like every other command. Remove a name when documented.
NOT_YET_DOCUMENTED = frozenset({"review", "learn"})

# Options of other tools that the README shows next to ours (torchrun, ray start).
OTHER_TOOLS_OPTIONS = frozenset({"--standalone", "--nproc_per_node", "--head", "--num-cpus", "--num-gpus"})

OPTION = re.compile(r"(?<![\w-])--[a-z][\w-]*")


def long_options(command: click.Command) -> set[str]:
    """Every spelling of every long option, both halves of --x/--no-x flags included."""
    names: set[str] = set()
    for param in command.params:
        if isinstance(param, click.Option):
            names.update(o for o in [*param.opts, *param.secondary_opts] if o.startswith("--"))
    return names


GROUP_OPTIONS = long_options(cli) | {"--help"}
ALL_OPTIONS = GROUP_OPTIONS.union(*(long_options(c) for c in cli.commands.values()))


def section(name: str) -> str | None:
    """The README text under "### catalog-tagger NAME", up to the next heading."""
    match = re.search(rf"^### catalog-tagger {re.escape(name)}\n(.*?)(?=^#{{1,3}} |\Z)", README, re.M | re.S)
    return match.group(1) if match else None


def documented_section(name: str) -> str:
    text = section(name)
    if text is None and name in NOT_YET_DOCUMENTED:
        pytest.skip(f"{name} is listed in NOT_YET_DOCUMENTED and has no README section yet")
    assert text is not None, f"README has no '### catalog-tagger {name}' section"
    return text


def command_lines() -> list[str]:
    """Each catalog-tagger invocation in the README's shell blocks, continuation lines joined."""
    lines = []
    for block in re.findall(r"^ *```sh\n(.*?)^ *```", README, re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("catalog-tagger ") or " -m catalog_tagger " in line:
                lines.append(line)
    return lines + re.findall(r"`(catalog-tagger [^`]+)`", README)


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_has_help_and_is_in_the_readme(run_cli, name):
    result = run_cli(name, "--help")
    assert result.exit_code == 0 and len(cli.commands[name].help or "") > 20
    documented_section(name)


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_option_of_a_command_is_in_its_readme_section(run_cli, name):
    text = documented_section(name)
    command = cli.commands[name]
    help_text = run_cli(name, "--help").output
    expected = long_options(command)
    assert expected, f"{name} has no options?"
    assert all(option in help_text for option in expected)
    missing = expected - set(OPTION.findall(text))
    assert not missing, f"README section of {name} does not mention {sorted(missing)}"
    for argument in (p for p in command.params if isinstance(p, click.Argument)):
        assert f"`{argument.human_readable_name}`" in text, f"{name}: argument {argument.human_readable_name}"


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_a_readme_section_mentions_only_its_commands_options(name):
    text = documented_section(name)
    foreign = set(OPTION.findall(text)) - long_options(cli.commands[name]) - GROUP_OPTIONS
    assert not foreign, f"README section of {name} mentions options {name} does not have: {sorted(foreign)}"


def test_the_readme_mentions_no_option_that_does_not_exist():
    unknown = set(OPTION.findall(README)) - ALL_OPTIONS - OTHER_TOOLS_OPTIONS
    assert not unknown, f"README mentions options no command has: {sorted(unknown)}"


def test_the_global_options_are_in_the_readme():
    commands = README.split("## Commands", 1)[1].split("\n### ", 1)[0]
    missing = long_options(cli) - set(OPTION.findall(commands))
    assert not missing, f"README Commands section does not mention {sorted(missing)}"


def test_every_example_command_line_uses_options_of_its_own_command():
    lines = command_lines()
    assert len(lines) >= 10  # the examples were found at all
    for line in lines:
        words = line.split(" -m catalog_tagger ", 1)[-1].split()
        if words[0] == "catalog-tagger":
            words = words[1:]
        while words[0].startswith("-"):  # group options come before the command name
            assert words.pop(0) in {"-q", "-v", "-vv", *GROUP_OPTIONS}, line
        name, rest = words[0], words[1:]
        assert name in cli.commands, f"no command {name!r}: {line}"
        used = {word.split("=", 1)[0] for word in rest if word.startswith("--")}
        unknown = used - long_options(cli.commands[name]) - {"--help"}
        assert not unknown, f"{line}: {name} has no {sorted(unknown)}"


def test_the_option_checks_would_catch_a_missing_or_invented_option():
    assert "--max-pixels" in long_options(cli.commands["tag"])
    assert "--no-mixed-precision" in long_options(cli.commands["train"])  # the flag's second half counts
    assert "--max-pixels" not in long_options(cli.commands["train"])
    assert set(OPTION.findall("use `--max-pixels N`, not --no-such-option; a-b--c")) == {
        "--max-pixels", "--no-such-option"}


def readme_type(arrow_type: pa.DataType) -> str:
    """An Arrow type as the README's Output table writes it."""
    if pa.types.is_list(arrow_type):
        return f"list&lt;{readme_type(arrow_type.value_type)}&gt;"
    if pa.types.is_timestamp(arrow_type):
        return "timestamp (UTC)"
    return {"float": "float32", "double": "float64"}.get(str(arrow_type), str(arrow_type))


def test_the_output_table_lists_every_column_with_its_type():
    output = README.split("\n## Output\n", 1)[1].split("\n## ", 1)[0]
    documented: dict[str, str] = {}
    for names, types in re.findall(r"^\|\s*(`[^|]+`)\s*\|\s*([^|]+?)\s*\|", output, re.M):
        names_list, types_list = re.findall(r"`(\w+)`", names), types.split(", ")
        if len(types_list) == 1:  # `width`, `height` | int32
            types_list *= len(names_list)
        assert len(names_list) == len(types_list), f"one type per column, or one for all: {names} | {types}"
        documented.update(zip(names_list, types_list))
    assert documented == {f.name: readme_type(f.type) for f in OUTPUT_FIELDS}


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


def test_every_make_target_in_the_readme_exists():
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    mentioned = set(re.findall(r"`make ([\w-]+)`|^make ([\w-]+)", README, re.M))
    names = {name for pair in mentioned for name in pair if name}
    assert {"run", "test"} <= names and names <= targets, sorted(names - targets)


def test_readme_is_a_users_document():
    assert len(README) < 15_000, f"README is {len(README):,} characters; move evidence to docs/"
    for link in re.findall(r"\]\((docs/[^)#]+)", README):
        assert (REPO / link).is_file(), f"README links to missing {link}"
