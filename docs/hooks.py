"""MkDocs hooks: the reference pages, generated from the code at every build.

    mkdocs build --strict          # (make docs) loads this file through mkdocs.yml's `hooks:`

Nothing here is written to docs/: each page is a virtual file added to the build, so the reference
cannot drift from the code it documents. Sources of truth:
  reference/cli.md           the click group in vaedist/cli.py (every command, option, default, envvar)
  reference/config.md        the dataclasses in vaedist/config.py (every key, type, default, allowed
                             values, and the field's docstring)
  reference/latent-table.md  vaedist/schema.py (the latent table's columns and types)
  reference/sweep-table.md   vaedist/sweep/results.py (sweep.parquet's columns)
  reference/python/*.md      one mkdocstrings page per module in API_MODULES
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import typing
from pathlib import Path
from typing import Any

import click

# Document this checkout's vaedist, whatever else is installed (mkdocs runs from the repository root).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The Python API reference: one page per module. Adding a module's page is one line here.
API_MODULES = [
    "vaedist.api",
    "vaedist.analyses",
    "vaedist.config",
    "vaedist.encode",
    "vaedist.lineage",
]
# Pages another branch adds: listed in the nav, dropped from it while the file is not there yet.
OPTIONAL_PAGES: set[str] = set()


def _md(text: str | None) -> str:
    """Plain help text or a docstring as one line of Markdown that shows it as written: outside
    `code spans`, the characters Markdown would read as emphasis, HTML or links are escaped (a
    column's `__key__` is not bold, `<split>` is not a tag); `|` is escaped everywhere (table cells)."""
    text = " ".join((text or "").replace("\b", "").split())
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # even parts are outside code spans
        parts[i] = re.sub(r"([\\_*\[\]])", r"\\\1", parts[i]).replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts).replace("|", "\\|")


# --- the CLI ----------------------------------------------------------------------------------

def _commands(group: click.Group, prefix: str) -> list[tuple[str, click.Command]]:
    found = []
    for name in sorted(group.commands):
        command = group.commands[name]
        path = f"{prefix} {name}"
        found.append((path, command))
        if isinstance(command, click.Group):
            found.extend(_commands(command, path))
    return found


def cli_commands() -> list[tuple[str, click.Command]]:
    """Every command and group under `vaedist`, as ("vaedist data prepare", command)."""
    from vaedist.cli import cli

    return [("vaedist", cli), *_commands(cli, "vaedist")]


def _option_row(param: click.Parameter, ctx: click.Context) -> str:
    if isinstance(param, click.Argument):
        names = f"`{param.human_readable_name}`"
    else:
        names = ", ".join(f"`{n}`" for n in [*param.opts, *param.secondary_opts])
    kind = param.type.name if not getattr(param, "is_flag", False) else "flag"
    if isinstance(param.type, click.Choice):
        kind = " \\| ".join(f"`{c}`" for c in param.type.choices)
    if param.multiple:
        kind += " (repeatable)"
    default = param.get_default(ctx, call=False)
    unset = default is None or default is getattr(click.core, "UNSET", None) or callable(default)
    default = "" if unset or default in ((), False) else f"`{default}`"
    envvar = param.envvar if isinstance(param.envvar, str) else ", ".join(param.envvar or ())
    envvar = f"`{envvar}`" if envvar else ""
    help_text = _md(getattr(param, "help", None))
    return f"| {names} | {kind} | {default} | {envvar} | {help_text} |"


def cli_page() -> str:
    lines = ["# Command line", "",
             "Generated from the `vaedist` click group at build time: every command, with its options, "
             "their types, defaults and environment variables. `vaedist COMMAND --help` prints the same.", ""]
    for path, command in cli_commands():
        ctx = click.Context(command, info_name=path)
        lines += [f"## `{path}`", ""]
        usage = command.collect_usage_pieces(ctx)
        lines += ["```text", f"{path} {' '.join(usage)}".rstrip(), "```", ""]
        if command.help:
            # The docstring's first paragraph, then its example lines as a code block.
            paragraphs = [p for p in command.help.replace("\b", "").split("\n\n") if p.strip()]
            for paragraph in paragraphs:
                body = [line.strip() for line in paragraph.strip().splitlines()]
                if body and all(line.startswith(("vaedist ", "#")) for line in body):
                    lines += ["```text", *body, "```", ""]
                else:
                    lines += [_md(" ".join(body)), ""]
        if isinstance(command, click.Group):
            lines += ["Commands: " + ", ".join(f"`{path} {name}`" for name in sorted(command.commands)), ""]
        params = [p for p in command.get_params(ctx) if p.name != "help"]
        if params:
            lines += ["| option | type | default | environment | what |", "| --- | --- | --- | --- | --- |"]
            lines += [_option_row(p, ctx) for p in params]
            lines.append("")
    return "\n".join(lines)


# --- the config -------------------------------------------------------------------------------

def config_keys() -> list[tuple[str, dataclasses.Field, Any, str]]:
    """Every config key as ("section.key", field, its type annotation, its docstring)."""
    from vaedist.config import Config, field_docs

    keys = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            keys.append((f"{section.name}.{f.name}", f, hints[f.name], docs.get(f.name, "")))
    return keys


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "(required)"
    return f"`{json.dumps(value)}`"


def config_page() -> str:
    from vaedist.config import Config, _type_name

    lines = ["# Configuration keys", "",
             "Generated from the configuration dataclasses at build time. Set a key in a YAML file "
             "(`--config`, one section per table below) or on the command line "
             "(`--set section.key=value`, repeatable; also `VAEDIST_SET`, whitespace-separated). "
             "An unknown key, a value of the wrong type or out of range is an error naming the key "
             "and what is allowed, before any cluster work starts. `vaedist config show` prints the "
             "resolved configuration.", ""]
    by_section: dict[str, list] = {}
    for key, f, tp, doc in config_keys():
        by_section.setdefault(key.split(".")[0], []).append((key, f, tp, doc))
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        lines += [f"## `{section.name}`", ""]
        if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
            lines += [_md(cls.__doc__), ""]
        for key, f, tp, doc in by_section[section.name]:
            lines += [f"### `{key}`", "",
                      f"- type: {_md(_type_name(tp))}",
                      f"- default: {_default(f)}"]
            if typing.get_origin(tp) is typing.Literal:
                lines.append("- allowed: " + ", ".join(f"`{a}`" for a in typing.get_args(tp)))
            lines += ["", _md(doc) if doc else "(undocumented)", ""]
    return "\n".join(lines)


# --- the tables -------------------------------------------------------------------------------

def latent_table_page() -> str:
    from vaedist import schema

    types = {f.name: str(f.type) for f in schema.arrow_schema(latent_dim=8, with_epoch=True, num_groups=2,
                                                               with_kl_dims=True)}
    lines = ["# The latent table", "",
             "Generated from the table's schema at build time. One row per datapoint (per checkpoint, "
             "in a table of several), in Parquet files under the table's directory, beside "
             f"`{schema.LINEAGE_FILE}` and `{schema.SUCCESS_FILE}`. Vectors are Arrow fixed-size lists "
             "(shown here for a latent dimension of 8 and 2 latent groups), so the files open as plain "
             f"arrays in DuckDB, pandas and Ray Data. Schema version {schema.SCHEMA_VERSION}; the lineage is also "
             f"in each file's Parquet metadata under `{schema.METADATA_KEY.decode()}`. "
             f"`vaedist query` exposes the table as the view `{schema.VIEW_NAME}`.", "",
             "| column | Arrow type | may be absent | meaning |", "| --- | --- | --- | --- |"]
    for name, meaning in schema.COLUMNS.items():
        optional = "yes" if name in schema.OPTIONAL_COLUMNS else ""
        lines.append(f"| `{name}` | `{types[name]}` | {optional} | {_md(meaning)} |")
    return "\n".join(lines) + "\n"


def sweep_table_page() -> str:
    from vaedist.sweep import results

    lines = ["# The sweep table", "",
             "Generated from the sweep table's definition at build time. `sweep.parquet` in a sweep's "
             "directory has one row per trial, rebuilt from the trials' run directories whenever a trial "
             f"ends. `vaedist query --sweep NAME` exposes it as the view `{results.VIEW_NAME}`.", "",
             "| column | Arrow type | meaning |", "| --- | --- | --- |"]
    for name, (tp, meaning) in results.COLUMNS.items():
        kind = "by its values" if name == results.SWEPT_KEYS else f"`{tp}`"
        lines.append(f"| `{name}` | {kind} | {_md(meaning)} |")
    return "\n".join(lines) + "\n"


def api_page(module: str) -> str:
    return f"# `{module}`\n\n::: {module}\n"


GENERATED = {
    "reference/cli.md": cli_page,
    "reference/config.md": config_page,
    "reference/latent-table.md": latent_table_page,
    "reference/sweep-table.md": sweep_table_page,
    **{f"reference/python/{m}.md": (lambda m=m: api_page(m)) for m in API_MODULES},
}


# --- the hooks --------------------------------------------------------------------------------

def _drop_missing(nav: list, docs_dir: str) -> list:
    kept = []
    for item in nav:
        (title, target), = item.items() if isinstance(item, dict) else ((None, item),)
        if isinstance(target, list):
            kept.append({title: _drop_missing(target, docs_dir)})
        elif target in OPTIONAL_PAGES and not (Path(docs_dir) / target).exists():
            continue
        else:
            kept.append(item)
    return kept


def on_config(config, **kwargs):
    """The Python API's pages join the nav under Reference; optional pages not yet there leave it."""
    nav = _drop_missing(config["nav"], config["docs_dir"])
    api = [{m: f"reference/python/{m}.md"} for m in API_MODULES]
    for item in nav:
        if isinstance(item, dict) and "Reference" in item:
            item["Reference"].append({"Python API": api})
    config["nav"] = nav
    return config


def on_files(files, config, **kwargs):
    from mkdocs.structure.files import File

    for path, render in GENERATED.items():
        files.append(File.generated(config, path, content=render()))
    return files
