"""Docs that cannot go stale (issue 23).

- The site builds with ``mkdocs build --strict``: a broken link, a missing page or anchor fails.
- The generated reference pages list every recipe key, every registered loss term and mimic
  loss, every named architecture and every module, read from the code at build time.
- Every ``.md`` file and every package path that a comment, docstring or help text of the code
  cites exists in the repository (and a cited section of a docs page exists in that page); so do
  those cited by the recipes' YAML comments, the Makefile, and the tests' comments and docstrings.
- The README stays short, keeps the test command, and links only to files that exist.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import re
import tokenize
from pathlib import Path

import pytest
from mkdocs.commands.build import build
from mkdocs.config import load_config
from mkdocs.exceptions import Abort
from pydantic import TypeAdapter

from kd_trainer.losses import TERMS
from kd_trainer.losses.mimic import MIMIC_LOSSES, available_mimic_losses
from kd_trainer.models.factory import list_architectures
from kd_trainer.recipe import Recipe

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

_spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
gen_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_reference)


# --- the site builds, strictly ------------------------------------------------------------------

def test_the_site_builds_strictly_with_the_generated_pages(tmp_path, caplog):
    # In this process (kd_trainer is already imported, so the hook costs nothing more), exactly
    # as `make docs` builds it: strict, so any warning (broken link, missing page or anchor) aborts.
    site = tmp_path / "site"
    config = load_config(str(ROOT / "mkdocs.yml"), site_dir=str(site), strict=True)
    try:
        build(config)
    except Abort as e:
        pytest.fail(f"mkdocs build --strict failed: {e}\n{caplog.text}")
    terms = (site / "reference" / "terms" / "index.html").read_text()
    assert all(f"<code>{name}</code>" in terms for name in TERMS)
    assert (site / "reference" / "recipe" / "index.html").is_file()
    assert (site / "losses" / "index.html").is_file()
    assert not list(site.rglob("*.py")), "the generator is not part of the site"


def test_every_page_on_disk_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert pages, "docs/ has no pages"
    missing = sorted(p for p in pages | set(gen_reference.PAGES) if f" {p}" not in nav)
    assert not missing, f"pages not in mkdocs.yml's nav: {missing}"
    clash = sorted(set(gen_reference.PAGES) & pages)
    assert not clash, f"generated pages must not also exist as files: {clash}"


# --- the generated pages list everything the code has -------------------------------------------

def _sections(page: str) -> dict[str, str]:
    """``## Heading`` -> the text under it."""
    parts = re.split(r"(?m)^## (.+)$", page)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def test_the_recipe_page_lists_every_key_of_every_schema():
    # pydantic's own JSON schema of the recipe is the independent list of every block and key.
    schema = TypeAdapter(Recipe).json_schema()
    blocks = {name: d for name, d in schema.get("$defs", {}).items() if "properties" in d}
    if "properties" in schema:
        blocks[schema["title"]] = schema
    assert len(blocks) > 10 and "DataConfig" in blocks
    sections = _sections(gen_reference.recipe_page())
    for block, d in blocks.items():
        assert block in sections, f"recipe block {block} has no section on the recipe-key page"
        for key in d["properties"]:
            assert f"| `{key}` |" in sections[block], f"{block}.{key} is missing from the recipe-key page"


def test_the_terms_page_lists_every_registered_term_and_mimic_loss():
    page = gen_reference.terms_page()
    sections = _sections(page)
    for name, spec in TERMS.items():
        assert f"[`{name}`](#{name}) | {spec.kind} |" in page, f"term {name} is not in the table"
        assert f"`{name}`" in sections, f"term {name} has no section"
    for name in available_mimic_losses():  # ours and UP's aliases
        assert f"`{name}`" in page, f"mimic loss {name} is missing"
    assert all(f"#mimic-{name}" in page for name in MIMIC_LOSSES)


def test_the_architectures_page_lists_every_named_architecture():
    page = gen_reference.architectures_page()
    rows = re.findall(r"(?m)^\| `([^`]+)` \|", page)
    assert rows == list_architectures()


def test_the_module_map_lists_every_module():
    page = gen_reference.modules_page()
    listed = set(re.findall(r"(?m)^\| `(kd_trainer/[^`]+\.py)` \|", page))
    on_disk = {p.relative_to(ROOT).as_posix() for p in (ROOT / "kd_trainer").rglob("*.py")}
    assert listed == on_disk


# --- what the code cites exists -----------------------------------------------------------------

# Bare file names the toolkit writes (the report's and the demo's table), not citations.
WRITTEN_FILES = {"results.md"}
# Files of the projects the code reproduces, cited by their own paths (IRRA's solver, open_clip,
# the seed code's training scripts that the recipes reproduce).
EXTERNAL = {"solver/build.py", "solver/lr_scheduler.py", "open_clip/model.py",
            "distillation/distillation_train.py", "distillation/sequence_distillation_train.py"}
MD_PATH = re.compile(r"(?<![\w/.-])((?:\.\./)*(?:[\w.-]+/)*[\w-]+\.md)\b")
PY_PATH = re.compile(r"(?<![\w/.-])((?:[\w-]+/)+[\w-]+\.py)\b")
# A cited section: `docs/losses.md, "Notation"`, or `README, "Quick start"`.
SECTION = re.compile(r"(docs/[\w/-]+\.md|\bREADME(?:\.md)?)`{0,2}[,;:]? *\(?\"([^\"]+)\"")
CODE_DIRS = ("kd_trainer", "bench", "data_scripts")


def _prose(source: str) -> list[tuple[int, str]]:
    """Comments and string literals (docstrings, help texts, messages) with their line numbers."""
    kinds = {tokenize.COMMENT, tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}
    return [(t.start[0], t.string) for t in tokenize.generate_tokens(io.StringIO(source).readline)
            if t.type in kinds]


def _headings(page: Path) -> set[str]:
    """A page's headings, without `{ #anchor }` attributes; comment lines in code blocks are not."""
    text = re.sub(r"(?ms)^```.*?^```", "", page.read_text())
    return {re.sub(r"\s*\{.*\}\s*$", "", h).strip() for h in re.findall(r"(?m)^#+ (.+)$", text)}


def _comments_and_docstrings(source: str) -> list[tuple[int, str]]:
    """A test module's comments and docstrings: its other strings are test data (a test of this
    check holds citations that must be broken)."""
    tree = ast.parse(source)
    docs = [(node.body[0].lineno, ast.get_docstring(node, clean=False))
            for node in ast.walk(tree) if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                           ast.AsyncFunctionDef)) and ast.get_docstring(node)]
    comments = [(t.start[0], t.string) for t in tokenize.generate_tokens(io.StringIO(source).readline)
                if t.type == tokenize.COMMENT]
    return sorted(docs + comments)


def _hash_comments(text: str) -> list[tuple[int, str]]:
    """The ``#`` comments of a YAML file, a run of full-line comments joined into one
    text (a cited section may wrap onto the next line), with the line each starts on. A ``#``
    inside a quoted YAML value is not a comment."""
    out: list[tuple[int, str]] = []
    joined = False
    for number, line in enumerate(text.splitlines(), 1):
        unquoted = re.sub(r"\"[^\"]*\"|'[^']*'", lambda m: " " * len(m.group()), line)
        start = re.search(r"(?:^|\s)#", unquoted)
        if start is None:
            joined = False
            continue
        comment = line[start.end():].strip()
        full_line = not line[:start.start()].strip()
        if full_line and joined:
            out[-1] = (out[-1][0], f"{out[-1][1]} {comment}")
        else:
            out.append((number, comment))
        joined = full_line
    return out


def _lines(text: str) -> list[tuple[int, str]]:
    """Every line, for a file that is prose and commands alike (the Makefile: its help and the
    scripts its targets run)."""
    return list(enumerate(text.splitlines(), 1))


def broken_citations(source: str, where: str, prose=_prose) -> list[str]:
    """Every path cited in ``source``'s prose that is not in the repository, and every cited
    section of a docs page that the page lacks. ``prose``: how to find the prose (default: the
    comments and string literals of Python code)."""
    problems = []
    for line, text in prose(source):
        for path in MD_PATH.findall(text):
            if path not in WRITTEN_FILES and not (ROOT / path).is_file():
                problems.append(f"{where}:{line}: cites {path}, which is not in the repository")
        for path in PY_PATH.findall(text):
            candidates = [ROOT / path, ROOT / "kd_trainer" / path]  # repository or package paths
            if path not in EXTERNAL and not any(c.is_file() for c in candidates):
                problems.append(f"{where}:{line}: cites {path}, which is not in the repository")
        for page, section in SECTION.findall(text):
            page = "README.md" if page.startswith("README") else page
            if (ROOT / page).is_file() and section not in _headings(ROOT / page):
                problems.append(f"{where}:{line}: cites section {section!r} of {page}, which has none")
    return problems


def test_the_citation_check_finds_a_missing_page_a_moved_module_and_missing_sections():
    source = '''"""Notation as in ``losses.md``; see docs/losses.md, "No such section"."""
# weights: see kd_trainer/distill/schedules.py; gather: docs/losses.md, "Gathering across processes"
HELP = 'a schedule (kd_trainer/recipe/schedules.py), written to results.md (README, "Quick start")'
# measured on SynthPEDES (README, "Deploy: ONNX / INT8")
'''
    problems = broken_citations(source, "x.py")
    assert len(problems) == 4, problems
    assert "cites losses.md" in problems[0]
    assert "'No such section'" in problems[1]
    assert "kd_trainer/distill/schedules.py" in problems[2]
    assert "'Deploy: ONNX / INT8' of README.md" in problems[3]


def test_every_path_the_code_cites_exists():
    problems = []
    for folder in CODE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            problems += broken_citations(path.read_text(), path.relative_to(ROOT).as_posix())
    assert not problems, "\n".join(problems)


def _cited_beside_the_code() -> list[tuple[Path, object]]:
    """The files beside the code whose prose cites pages: each recipe (its comments), the Makefile
    (every line), each test module (its comments and docstrings)."""
    return ([(p, _hash_comments) for p in sorted((ROOT / "recipes").rglob("*.y*ml"))]
            + [(ROOT / "Makefile", _lines)]
            + [(p, _comments_and_docstrings) for p in sorted((ROOT / "tests").glob("*.py"))])


def test_the_citation_check_reads_recipe_comments_the_makefile_and_test_docstrings():
    recipe = '''# Reproduces the seed run (docs/methods.md, "No such
# section"; see distill/schedules.py)
name: x  # weights as in losses.md
note: "not a # comment: gone.md"
'''
    problems = broken_citations(recipe, "r.yaml", prose=_hash_comments)
    assert len(problems) == 3, problems
    assert problems[0].startswith("r.yaml:1: cites distill/schedules.py")
    assert problems[1].startswith("r.yaml:1: cites section 'No such section' of docs/methods.md")
    assert problems[2].startswith("r.yaml:3: cites losses.md")
    makefile = "# make report   results.md + plots (docs/reporting.md)\nreport:\n\t$(PY) bench/gone.py\n"
    problems = broken_citations(makefile, "Makefile", prose=_lines)
    assert problems == ["Makefile:1: cites docs/reporting.md, which is not in the repository",
                        "Makefile:3: cites bench/gone.py, which is not in the repository"]
    test = '''"""Checks docs/gone.md."""
def test_x():
    """As in design/architecture.md."""
    # see docs/losses.md, "Gone"
    assert read("missing.md")  # a file the test writes is data, not a citation
'''
    problems = broken_citations(test, "t.py", prose=_comments_and_docstrings)
    assert [p.split(",")[0] for p in problems] == [
        "t.py:1: cites docs/gone.md", "t.py:3: cites design/architecture.md",
        "t.py:4: cites section 'Gone' of docs/losses.md"]


def test_every_path_the_recipes_the_makefile_and_the_tests_cite_exists():
    problems = []
    for path, prose in _cited_beside_the_code():
        problems += broken_citations(path.read_text(), path.relative_to(ROOT).as_posix(), prose=prose)
    assert not problems, "\n".join(problems)


# Repository paths the docs pages and the README name (a glob, a brace list or a placeholder
# after the path, as in `configs/*.json` or `inherit/{a,b}.yaml`, is left alone).
DOC_PATH = re.compile(r"(?<![\w/.-])((?:kd_trainer|recipes|bench|tests|data_scripts|docs)/[\w./-]*\w)(?![\w{*<])")


def test_every_repository_path_the_docs_name_exists():
    problems = []
    for page in sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]:
        for line, text in enumerate(page.read_text().splitlines(), 1):
            problems += [f"{page.relative_to(ROOT)}:{line}: names {path}, which is not in the repository"
                         for path in DOC_PATH.findall(text) if not (ROOT / path).exists()]
    assert not problems, "\n".join(problems)


# --- the README ---------------------------------------------------------------------------------

def test_the_readme_is_short_keeps_the_test_command_and_links_to_files_that_exist():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "make test" in text
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert any(link.startswith("docs/") for link in local), "the README links to no docs page"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


# --- a recipe shown in the docs is the file it names --------------------------------------------

def test_the_walked_through_recipe_is_the_file_on_disk():
    """Getting started walks through recipes/demo/student_kd.yaml: the YAML it shows (comments aside)
    is that file's, key for key, so the page cannot drift from the demo."""
    import yaml

    page = (DOCS / "getting-started.md").read_text()
    name = "recipes/demo/student_kd.yaml"
    after = page[page.index(f"`{name}`, the distillation step of the demo"):]
    shown = re.search(r"```yaml\n(.*?)```", after, re.S).group(1)
    assert yaml.safe_load(shown) == yaml.safe_load((ROOT / name).read_text())


def test_the_plan_shown_in_the_methods_page_is_what_plan_prints():
    """docs/methods.md shows `kd-trainer plan recipes/ours_3stage.yaml`; each line it shows is a line
    of today's output (a line ending in ' ...' is the start of one; '...' stands for lines left out),
    in the same order."""
    from kd_trainer.plan_view import format_plan, plan_report
    from kd_trainer.recipe import load_recipe

    page = (DOCS / "methods.md").read_text()
    shown = re.search(r"```\n\$ kd-trainer plan recipes/ours_3stage\.yaml\n(.*?)```", page, re.S).group(1)
    printed = format_plan(plan_report(load_recipe(ROOT / "recipes" / "ours_3stage.yaml"))).splitlines()
    at = 0
    for line in shown.splitlines():
        if line == "...":
            continue
        start = line[:-4] if line.endswith(" ...") else None
        for i in range(at, len(printed)):
            if printed[i] == line or (start is not None and printed[i].startswith(start)):
                at = i + 1
                break
        else:
            raise AssertionError(f"not printed by kd-trainer plan (in this order): {line!r}")
