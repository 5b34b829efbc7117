"""The documentation site: it builds in strict mode (a broken link, reference or nav entry fails), its
generated reference covers every CLI command and config key (derived from the code here, so a new
command or key that the generator missed fails), and user-facing text tells no development history."""

from __future__ import annotations

import dataclasses
import html
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
pytest.importorskip("mkdocstrings", reason="the docs extra is not installed: pip install -e '.[docs]'")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return out


def _text(page: Path) -> str:
    """The page's text, tags dropped, entities decoded, whitespace runs as one space."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", page.read_text())).split())


def test_every_cli_command_and_option_is_in_the_reference(site):
    import click

    from vaedist.cli import cli

    page = _text(site / "reference" / "cli" / "index.html")

    def walk(group: click.Group, path: str):
        yield path, group
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                yield from walk(command, f"{path} {name}")
            else:
                yield f"{path} {name}", command

    commands = list(walk(cli, "vaedist"))
    assert len(commands) > 15
    for path, command in commands:
        assert f"{path} [OPTIONS]" in page, f"{path} is missing from the CLI reference"
        for param in command.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("-"):
                    assert opt in page, f"{path}'s {opt} is missing from the CLI reference"


def test_every_config_key_is_in_the_reference_with_its_docstring(site):
    from vaedist.config import Config, field_docs

    page = _text(site / "reference" / "config" / "index.html")
    keys = 0
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            key = f"{section.name}.{f.name}"
            assert re.search(rf"\b{re.escape(key)}\b", page), f"{key} is missing from the config reference"
            first_words = " ".join(docs[f.name].replace("`", "").split()[:6])
            assert first_words in page, f"{key}'s docstring is missing from the reference"
            keys += 1
    assert keys > 60


def test_table_schemas_and_python_api_are_generated(site):
    from vaedist import schema
    from vaedist.sweep import results

    latent = _text(site / "reference" / "latent-table" / "index.html")
    assert all(column in latent for column in schema.COLUMNS)
    sweep = _text(site / "reference" / "sweep-table" / "index.html")
    assert all(column in sweep for column in results.COLUMNS if column != results.SWEPT_KEYS)
    # mkdocstrings rendered the modules' public functions, from their docstrings.
    assert "load_config" in _text(site / "reference" / "python" / "vaedist.config" / "index.html")
    assert "def encode" in (site / "reference" / "python" / "vaedist.encode" / "index.html").read_text() or \
        "encode(" in _text(site / "reference" / "python" / "vaedist.encode" / "index.html")


# What user-facing text must not contain: the history of how vaedist was built.
HISTORY = [r"\bsessions? \d", r"\bissue \d+", r"\brun \d+\b(?! (?:epochs|steps|trials))", r"/work/", r"/tmp/\d",
           r"\bborrowed\b", r"minutes a loan", r"\boverturn", r"\bcommit [0-9a-f]{7,}"]


USER_PAGES = ["README.md", "k8s/README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "examples").rglob("*.md")),
              *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").rglob("*.md"))]


@pytest.mark.parametrize("path", USER_PAGES)
def test_user_facing_text_tells_no_development_history(path):
    text = (REPO / path).read_text()
    found = [m.group(0) for pattern in HISTORY for m in re.finditer(pattern, text, re.IGNORECASE)]
    assert not found, f"{path} tells development history: {found}"


def _open_quote(text: str) -> bool:
    import shlex

    try:
        shlex.split(text)
    except ValueError:
        return True
    return False


def _documented_vaedist_commands() -> list[tuple[str, str]]:
    """(page, command) for every `vaedist ...` line of every bash block, run by the tests or not."""
    found = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        for block in re.findall(r"```bash[^\n]*\n(.*?)```", page.read_text(), re.S):
            pending = ""
            for line in block.splitlines():
                line = re.sub(r"(^|\s+)#.*$", "", line).rstrip()
                pending = f"{pending} {line.removesuffix(chr(92)).strip()}".strip()
                if line.endswith("\\") or _open_quote(pending):
                    continue
                for part in re.split(r"\s*(?:&&|;)\s*", pending):
                    if part.startswith("vaedist ") and "$" not in part:
                        found.append((str(page.relative_to(REPO)), part))
                pending = ""
    return found


def test_every_documented_vaedist_command_parses():
    """Each documented `vaedist` line names a real command with options it has and values of their
    types (click parses it without running it), so the docs' unrun blocks cannot drift either."""
    import shlex

    import click

    from vaedist.cli import cli
    from vaedist.config import ConfigError, load_config

    commands = _documented_vaedist_commands()
    assert len(commands) > 40
    for page, line in commands:
        args = shlex.split(line)[1:]
        command: click.Command = cli
        while isinstance(command, click.Group):
            name = args.pop(0)
            assert name in command.commands, f"{page}: {line!r}: no command {name!r}"
            command = command.commands[name]
        try:
            ctx = command.make_context(name, list(args), resilient_parsing=False)
        except click.UsageError as e:
            pytest.fail(f"{page}: {line!r}: {e.format_message()}")
        # The config it names, with its overrides, is a valid config (a renamed key fails here).
        config_path, overrides = ctx.params.get("config_path"), ctx.params.get("overrides") or ()
        if config_path is None or (REPO / config_path).is_file():
            try:
                load_config(config_path and REPO / config_path, list(overrides))
            except ConfigError as e:
                pytest.fail(f"{page}: {line!r}: {e}")
        ctx.close()


def test_generated_reference_tells_no_development_history(site):
    """The reference is the code's own help text and docstrings: they are user-facing too."""
    for page in sorted((site / "reference").rglob("index.html")):
        text = _text(page)
        found = [m.group(0) for pattern in HISTORY for m in re.finditer(pattern, text, re.IGNORECASE)]
        assert not found, f"{page.relative_to(site)} tells development history: {found}"
