"""The README and docs/ point at things that exist: every relative link and anchor, every command the README shows
(parsed by the real parsers, recipes included), and every name its Python examples import."""

import ast
import glob
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: str) -> set[str]:
    text = re.sub(r"```.*?```", "", read(path), flags=re.DOTALL)
    return {slug(m[1]) for m in re.finditer(r"^#+ (.+)$", text, re.MULTILINE)}


def code_blocks(path: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", read(path), re.DOTALL)


def commands(path: str) -> list[list[str]]:
    """The shell commands of `path`'s bash blocks: continuation lines joined, comments dropped, `&&` split."""
    out = []
    for block in code_blocks(path, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            for part in filter(None, (p.strip() for p in line.split("&&"))):
                out.append(shlex.split(part))
    return out


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_resolves(page):
    text = re.sub(r"```.*?```", "", read(page), flags=re.DOTALL)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links or page != "README.md"
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        target, _, anchor = link.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), target)) if target else page
        assert os.path.exists(os.path.join(ROOT, resolved)), f"{page}: {link} does not exist"
        if anchor:
            assert anchor in anchors(resolved), f"{page}: {link}: no heading #{anchor} in {resolved}"


def test_every_readme_command_parses():
    """Each command the README shows is accepted by what runs it: scripts exist, `pip install` extras are declared,
    `trl-ica` subcommands parse their flags, and the recipe launch lines parse the recipe with the TRL parser."""
    from importlib.metadata import metadata

    from trl_ica.cli.launch import launch_arguments
    from trl_ica.cli.launch import make_parser as launch_parser
    from trl_ica.cli.main import make_parser

    extras = metadata("trl_ica").get_all("Provides-Extra")
    seen = set()
    for argv in commands("README.md"):
        program = os.path.basename(argv[0])
        seen.add(program)
        if program == "bash":
            assert os.path.isfile(os.path.join(ROOT, argv[1])), argv
        elif program == "pip":
            spec = argv[-1]
            assert set(re.search(r"\[(.*)\]", spec)[1].split(",")) <= set(extras), argv
        elif program == "trl-ica" and argv[1] in ("sft", "dpo", "simpo"):
            from accelerate.commands.launch import launch_command_parser

            cwd = os.getcwd()
            os.chdir(ROOT)
            try:
                launch_command_parser().parse_args(launch_arguments(argv[1:]))
            finally:
                os.chdir(cwd)
        elif program == "trl-ica":
            make_parser().parse_args(argv[1:])
        elif program == "accelerate":
            config = argv[argv.index("--config_file") + 1]
            assert os.path.isfile(os.path.join(ROOT, config)), argv
            task = argv[argv.index("trl_ica.launch") + 1]
            cwd = os.getcwd()
            os.chdir(ROOT)  # the recipe paths are relative to the repository, as the README runs them
            try:
                launch_parser(task).parse_args_and_config(args=argv[argv.index(task) + 1 :])
            finally:
                os.chdir(cwd)
        else:
            raise AssertionError(f"README command not checked: {argv}")
    assert {"bash", "pip", "trl-ica", "accelerate"} <= seen


def test_readme_python_examples_import_what_exists():
    import trl_ica

    blocks = code_blocks("README.md", "python")
    assert len(blocks) >= 3
    for block in blocks:
        tree = ast.parse(block)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "trl_ica":
                for alias in node.names:
                    assert hasattr(trl_ica, alias.name), alias.name


def test_every_public_name_loads_and_is_listed():
    """`trl_ica` loads its names on first use: each one in `__all__` resolves to the object its module defines, and
    `dir()` lists them (editors and `from trl_ica import *` see the same names)."""
    import importlib

    import trl_ica

    assert sorted(trl_ica._LAZY) == sorted(trl_ica.__all__)
    for name, module in trl_ica._LAZY.items():
        assert getattr(trl_ica, name) is getattr(importlib.import_module(f"trl_ica.{module}"), name)
    assert set(trl_ica.__all__) <= set(dir(trl_ica))
    with pytest.raises(AttributeError, match="nonsense"):
        trl_ica.nonsense  # noqa: B018
