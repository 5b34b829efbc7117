"""The analyses' registry (vaedist.analyses.ANALYSES) is the one list of names: `vaedist query`
takes exactly those, an unknown name is an error listing them, and SQL is `vaedist query sql`."""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import vaedist.analyses as analyses
from vaedist.analyses import ANALYSES, NEEDS, QueryError, get_analysis
from vaedist.cli import cli

PACKAGE = Path(analyses.__file__).parent


@pytest.mark.parametrize("name", list(ANALYSES))
def test_each_entry_is_a_module_constant_a_function_and_its_options(name):
    analysis = ANALYSES[name]
    module = inspect.getmodule(analysis.function)
    # The house pattern: the SQL is a module constant of the module that runs it.
    assert any(value is analysis.sql for key, value in vars(module).items() if key.endswith("_SQL")), name
    parameters = inspect.signature(analysis.function).parameters
    assert set(analysis.options) <= set(parameters), (name, set(analysis.options) - set(parameters))
    assert set(analysis.needs) <= set(NEEDS)
    assert analysis.takes_against == ("against_dir" in parameters)
    assert "\n" not in analysis.summary and analysis.summary.endswith(".") and len(analysis.summary) <= 110
    assert analysis.doc and analysis.doc == inspect.getdoc(analysis.function)


def test_the_cli_lists_every_analysis_in_its_help():
    help_text = CliRunner().invoke(cli, ["query", "--help"]).output
    for name in ANALYSES:
        assert name in help_text, name


def test_modules_of_the_package_import_only_core_and_nothing_above_it():
    """No cycle: core imports no analysis; an analysis imports core only (and nothing of report/, cli)."""
    for path in PACKAGE.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vaedist"):
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names if alias.name.startswith("vaedist")}
        siblings = {m for m in imported if m.startswith("vaedist.analyses")}
        if path.name == "core.py":
            assert not siblings, siblings
        elif path.name != "__init__.py":
            assert siblings <= {"vaedist.analyses.core"}, (path.name, siblings)
        assert not any(m.startswith(("vaedist.report", "vaedist.cli", "vaedist.api")) for m in imported), path.name


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(QueryError) as raised:
        get_analysis("worts")
    message = str(raised.value)
    assert message.startswith("unknown analysis 'worts': did you mean 'worst'? the analyses are loss-by-digit, worst")
    assert all(name in message for name in ANALYSES) and 'vaedist query sql "SELECT ...";' not in message
    assert message.endswith('For SQL over the view `latents`: vaedist query sql "SELECT ..."')


@pytest.mark.parametrize("args, expected", [
    (["lossbydigit"], "unknown analysis 'lossbydigit': did you mean 'loss-by-digit'?"),
    (["LIMIT"], "unknown analysis 'LIMIT': the analyses are loss-by-digit"),
    (["sql"], 'sql needs the query, e.g. vaedist query sql "SELECT count(*) FROM latents"'),
    (["worst", "SELECT 1"], "unexpected argument 'SELECT 1': SQL goes after the word sql"),
])
def test_cli_unknown_names_and_misplaced_sql_are_one_clear_line(latent_tables, args, expected):
    result = CliRunner().invoke(cli, ["query", *args, "--latents", latent_tables["latents"]])
    assert result.exit_code != 0 and expected in result.output, result.output
    assert "Traceback" not in result.output and "Parser Error" not in result.output


def test_cli_sql_by_word_and_as_before(latent_tables):
    sql = "SELECT split, count(*) AS n FROM latents GROUP BY split ORDER BY split"
    runs = [CliRunner().invoke(cli, ["query", *args, "--latents", latent_tables["latents"], "--format", "json"])
            for args in (["sql", sql], [sql])]
    assert all(r.exit_code == 0 for r in runs), [r.output for r in runs]
    assert runs[0].output == runs[1].output
    assert [json.loads(line) for line in runs[0].output.splitlines()] == [{"split": "test", "n": 1000},
                                                                         {"split": "train", "n": 1000}]
