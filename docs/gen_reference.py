"""The docs pages that are generated, not written: recipe keys, loss terms, architectures, modules.

Each page is rendered from the code that owns the facts (the recipe schema in
``kd_trainer/recipe/``, the registries in ``kd_trainer/losses/registry.py`` and
``kd_trainer/losses/mimic.py``, the architecture configs read by ``kd_trainer/models/factory.py``,
the module docstrings)
every time the site is built, so a key, a term or an architecture added to the code is on the
page without anyone editing it, and a removed one disappears.

MkDocs runs this file as a hook (``hooks:`` in ``mkdocs.yml``): :func:`on_files` adds the pages
to the build. ``python docs/gen_reference.py OUT_DIR`` writes them as Markdown files instead.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import sys
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from kd_trainer.losses import TERMS
from kd_trainer.losses.mimic import MIMIC_LOSSES
from kd_trainer.models.factory import CONFIG_DIR, get_architecture, list_architectures
from kd_trainer.recipe import RECIPE_TYPES, Recipe
from kd_trainer.recipe.schema import OWN_TRAINING_KEYS

GENERATED_NOTE = ("*Generated from the code when the docs are built (`docs/gen_reference.py`); "
                  "do not edit by hand.*")


def _md(text: str) -> str:
    """A docstring or help text as Markdown: reST's ``code`` becomes `code`, roles lose their prefix."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def _cell(text: str) -> str:
    """Text that fits in one table cell: one line, pipes escaped outside code spans (inside them
    the table reads a pipe as text, and an escape would show)."""
    parts = re.split(r"(`[^`]*`)", _md(" ".join(text.split())))
    return "".join(p if p.startswith("`") else p.replace("|", "\\|") for p in parts)


# --- the recipe keys -----------------------------------------------------------------------------

def _anchor(model: type[BaseModel]) -> str:
    return model.__name__.lower()


def _members(annotation: Any) -> tuple[Any, ...]:
    """The alternatives of a union (also inside ``Annotated``), or the annotation alone."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(m for a in typing.get_args(annotation) for m in _members(a))
    return (annotation,)


def _type_text(annotation: Any) -> str:
    """A field's type as a reader of YAML needs it; nested schemas link to their section."""
    parts = []
    for a in _members(annotation):
        origin, args = typing.get_origin(a), typing.get_args(a)
        if a is type(None):
            parts.append("null")
        elif isinstance(a, type) and issubclass(a, BaseModel):
            parts.append(f"[{a.__name__}](#{_anchor(a)})")
        elif origin is typing.Literal:
            parts.extend(f"`{v}`" for v in args)
        elif origin is list:
            parts.append(f"list of {_type_text(args[0])}")
        elif origin is tuple:
            inner = f"{_type_text(args[0])}, ..." if len(args) == 2 and args[1] is Ellipsis else \
                ", ".join(_type_text(x) for x in args)
            parts.append(f"[{inner}]")
        elif origin is dict:
            parts.append(f"mapping of {_type_text(args[0])} to {_type_text(args[1])}")
        elif a is Any:
            parts.append("any")
        else:
            parts.append(getattr(a, "__name__", str(a)))
    return " \\| ".join(dict.fromkeys(parts))


def _default_text(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return f"`{json.dumps(value, default=list)}`"


def schema_models(root: Any = Recipe) -> dict[type[BaseModel], list[str]]:
    """Every schema class reachable from the recipe (the root's first, in reading order), with the
    dotted key paths where it appears (``N``: a list index, ``<name>``: a key the user chooses)."""
    found: dict[type[BaseModel], list[str]] = {}

    def visit(annotation: Any, path: str, ancestors: tuple[type, ...]) -> None:
        for a in _members(annotation):
            origin, args = typing.get_origin(a), typing.get_args(a)
            if isinstance(a, type) and issubclass(a, BaseModel) and a not in ancestors:
                found.setdefault(a, [])
                if path and path not in found[a]:
                    found[a].append(path)
                for name, f in a.model_fields.items():
                    visit(f.annotation, f"{path}.{name}" if path else name, (*ancestors, a))
            elif origin is list:
                visit(args[0], f"{path}.N", ancestors)
            elif origin is dict:
                visit(args[1], f"{path}.<name>", ancestors)

    visit(root, "", ())
    return found


def recipe_page() -> str:
    lines = [
        "# Recipe keys", "", GENERATED_NOTE, "",
        "Every key a recipe may hold, read from the schema that validates it (`kd_trainer/recipe/`). "
        "An unknown key, a wrong type or a value out of range stops the run with the key's dotted name "
        "(see [When something is wrong](../reliability.md)). Any key can be overridden on the command "
        "line as `key.sub=value`; list items by index (`loss.terms.0.weight=0.5`), and named entries by "
        "name (`teachers.teacher0.checkpoint=...`).", "",
        "`training:` is not listed here: it is `transformers.TrainingArguments`, field for field, "
        "checked against that class when the recipe is read, plus kd_trainer's own "
        + ", ".join(f"`training.{k}` ({t.__name__})" for k, t in OWN_TRAINING_KEYS.items())
        + ": a run refuses an `output_dir` that already holds another run's weights, state, results or "
        "checkpoints unless it resumes that run or this key is true.", "",
        "A recipe is one of three types, chosen by its `task:` key. Each type holds only the keys its "
        "task reads, so a key of another task (`loss:` in a detection recipe, `data.det` in a retrieval "
        "one) is refused, naming the key and both tasks.", "",
        "| `task:` | recipe type | what it trains | `data:` block |", "|---|---|---|---|",
    ]
    for task, kind in RECIPE_TYPES.items():
        data = kind.model_fields["data"].annotation
        lines.append(f"| `{task}`{' (the default)' if task == 'retrieval' else ''} | "
                     f"[{kind.__name__}](#{_anchor(kind)}) | {_cell(kind.about)} | [{data.__name__}](#{_anchor(data)}) |")
    lines.append("")
    reach = {task: set(schema_models(kind)) for task, kind in RECIPE_TYPES.items()}
    for model, paths in schema_models().items():
        lines += [f"## {model.__name__}", ""]
        tasks = [task for task, models in reach.items() if model in models]
        if paths:
            lines += ["At " + ", ".join(f"`{p}`" for p in paths) + ".", ""]
        if len(tasks) < len(RECIPE_TYPES) and model not in RECIPE_TYPES.values():
            lines += ["Only in " + " and ".join(f"`task: {t}`" for t in tasks) + " recipes.", ""]
        doc = inspect.getdoc(model)
        if doc and model.__doc__ is not None and "__doc__" in vars(model):
            lines += [_md(doc), ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            lines.append(f"| `{name}` | {_type_text(field.annotation)} | {_default_text(field)} | "
                         f"{_cell(field.description or '')} |")
        lines.append("")
    return "\n".join(lines)


# --- the loss terms ------------------------------------------------------------------------------

def _extra_kwargs(fn: Callable[..., Any], common: set[str]) -> str:
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.name not in common and p.kind is not inspect.Parameter.VAR_KEYWORD]
    return ", ".join(f"`{p.name}={p.default!r}`" if p.default is not inspect.Parameter.empty else f"`{p.name}`"
                     for p in params) or "none"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def terms_page() -> str:
    lines = [
        "# Loss terms", "", GENERATED_NOTE, "",
        "Every term a recipe can name under `loss.terms` (the registry, `kd_trainer/losses/registry.py`; "
        "`kd-trainer terms` prints the same list). The formulas use the notation of "
        "[Loss terms: the exact maths](../losses.md#notation).", "",
        "- **kind**: the side of the alpha mix the term is on, unless the recipe gives `group:`.",
        "- **T**: the default temperature (absolute: logits = cosine / T).",
        "- **projection**: the term compares student with teacher embeddings directly, so a student of "
        "another width gets a learnable projection.",
        "- **batch**: the term compares each sample with the rest of its batch (see exact accumulation "
        "in [Training](../training.md#gradient-accumulation-and-batch-dependent-terms)).",
        "- **local rows**: with several processes, each computes only its own rows of the gathered batch.", "",
        "| term | kind | sides | T | teacher | projection | batch | local rows | extra kwargs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_fn: dict[Any, list[str]] = {}
    for name, spec in sorted(TERMS.items()):
        by_fn.setdefault(spec.fn, []).append(name)
    for name, spec in sorted(TERMS.items()):
        lines.append(
            f"| [`{name}`](#{name}) | {spec.kind} | {', '.join(spec.sides)} | {spec.default_temperature:g} | "
            f"{_yes(spec.needs_teacher)} | {_yes(spec.direct_compare)} | {_yes(spec.batch_dependent)} | "
            f"{_yes(spec.local_rows)} | {_extra_kwargs(spec.fn, {'features', 'temperature', 'side'})} |")
    lines.append("")
    for name, spec in sorted(TERMS.items()):
        lines += [f"## `{name}`", ""]
        same = [n for n in by_fn[spec.fn] if n != name]
        if same:
            lines += [f"The same term as {', '.join(f'`{n}`' for n in same)}.", ""]
        reads = "; ".join(f"{side}: {', '.join(sorted(towers))}" for side, towers in spec.reads.items())
        lines += [f"Reads, per side: {reads}.", ""]
        doc = inspect.getdoc(spec.fn)
        if doc:
            lines += [_md(doc), ""]
    lines += [
        "## Mimic losses", "",
        "The losses a `mimic:` job names in `loss.type` (`kd_trainer/losses/mimic.py`; see "
        "[Mimic and detection](../mimic.md)). UP/EOD's names are aliases that bring UP's defaults.", "",
        "| loss | UP/EOD aliases (implied kwargs) | kwargs |", "|---|---|---|",
    ]
    for name, spec in sorted(MIMIC_LOSSES.items()):
        aliases = ", ".join(f"`{a}` {json.dumps(dict(d)) if d else ''}".strip() for a, d in spec.aliases.items())
        lines.append(f"| [`{name}`](#mimic-{name}) | {aliases or '—'} | {_extra_kwargs(spec.fn, {'s', 't'})} |")
    lines.append("")
    for name, spec in sorted(MIMIC_LOSSES.items()):
        doc = inspect.getdoc(spec.fn)
        lines += [f"### `{name}` {{ #mimic-{name} }}", "", _md(doc) if doc else "", ""]
    return "\n".join(lines)


# --- the named architectures ---------------------------------------------------------------------

def architectures_page() -> str:
    lines = [
        "# Named architectures", "", GENERATED_NOTE, "",
        "The names `student.arch` and `teacher.arch` accept, one JSON file each under "
        "`kd_trainer/models/configs/` (`kd-trainer archs` prints the same list). A recipe derives "
        "others from a name (`vision_layers`, `text_width`, ...: see [Recipe keys](recipe.md#modelconfig)), "
        "or gives the whole architecture as a dict in the same layout.", "",
        "| name | embed dim | image size (H, W) | vision: layers x width, head width, patch | "
        "text: layers x width, heads | context | what it is |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in list_architectures():
        a = get_architecture(name)
        doc = json.loads((CONFIG_DIR / f"{name}.json").read_text()).get("_doc", "")  # the factory drops it
        v, t = a["vision_cfg"], a["text_cfg"]
        size = a.get("image_size", v.get("image_size"))
        vision = f"{v['layers']} x {v['width']}, {v.get('head_width', 64)}, {v['patch_size']}"
        text = f"{t['layers']} x {t['width']}, {t.get('heads', '—')}"
        lines.append(f"| `{name}` | {a['embed_dim']} | {size} | {vision} | {text} | "
                     f"{t.get('context_length', 77)} | {_cell(doc)} |")
    lines.append("")
    return "\n".join(lines)


# --- the module map ------------------------------------------------------------------------------

PACKAGE = Path(__file__).resolve().parent.parent / "kd_trainer"


def _summary(path: Path) -> str:
    """The first paragraph of a module's docstring, read with ``ast`` (nothing is imported)."""
    doc = ast.get_docstring(ast.parse(path.read_text()))
    return _cell(doc.split("\n\n")[0]) if doc else "*(no docstring)*"


def modules_page() -> str:
    lines = [
        "# Module map", "", GENERATED_NOTE, "",
        "Every module of `kd_trainer/`, with the first paragraph of its docstring: each module answers "
        "one question, and its name says which. The layers they belong to: [Architecture](../architecture.md).", "",
        "| module | what it answers |", "|---|---|",
    ]
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).as_posix()
        lines.append(f"| `{rel}` | {_summary(path)} |")
    lines.append("")
    return "\n".join(lines)


PAGES: dict[str, Callable[[], str]] = {
    "reference/recipe.md": recipe_page,
    "reference/terms.md": terms_page,
    "reference/architectures.md": architectures_page,
    "reference/modules.md": modules_page,
}


def render_pages() -> Iterator[tuple[str, str]]:
    """Each generated page: (its path under ``docs/``, its Markdown)."""
    for path, render in PAGES.items():
        yield path, render()


def on_files(files: Any, config: Any) -> Any:
    """MkDocs hook: add the generated pages to the site's files before the nav is built."""
    from mkdocs.structure.files import File  # only under MkDocs, which loads this file as a hook

    for path, text in render_pages():
        files.append(File.generated(config, path, content=text))
    return files


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python docs/gen_reference.py OUT_DIR   (writes the generated reference pages there)")
    out = Path(sys.argv[1])
    for rel, text in render_pages():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text + "\n")
        print(out / rel)
