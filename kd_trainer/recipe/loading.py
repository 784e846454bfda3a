"""Reading a recipe: a YAML file, its ``key.sub=value`` command-line overrides, the validation
errors as one message that names every bad key (with the closest valid keys), and the resolved
recipe written back as YAML beside a run.

Any key can be overridden from the command line as ``key.sub=value`` (values are parsed as
YAML, so ``training.num_train_epochs=3`` is an int and ``data.image_size=[64,32]`` a list); list
items are addressed by index, as in ``loss.terms.0.weight=0.5``.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kd_trainer.recipe.schema import RECIPE_TYPES, Recipe, RecipeError, did_you_mean, recipe_type

__all__ = ["apply_overrides", "dump_recipe", "load_recipe", "parse_recipe"]


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation may hold (``X | None``, ``list[X]``, ``dict[str, X]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _keys_at(loc: tuple[Any, ...], root: type[BaseModel]) -> list[str]:
    """The keys the schema ``root`` allows at ``loc`` (the location of an unknown key, without the key)."""
    models: list[type[BaseModel]] = [root]
    for part in loc:
        if isinstance(part, int) or part not in {k for m in models for k in m.model_fields}:
            continue  # a list index or a dict key (teachers.<name>): the same models hold below it
        models = [sub for m in models if part in m.model_fields for sub in _models_in(m.model_fields[part].annotation)]
    return sorted({k for m in models for k in m.model_fields})


def _unknown_key(loc: tuple[Any, ...], root: type[BaseModel]) -> str:
    """Why the key at ``loc`` is refused: a key of another task's recipe is named as such, with the task's
    own; any other is unknown. Both offer the closest keys the recipe does allow there."""
    close = did_you_mean(str(loc[-1]), _keys_at(loc[:-1], root))
    task = root.model_fields["task"].default
    owners = [other for other, t in RECIPE_TYPES.items() if t is not root and str(loc[-1]) in _keys_at(loc[:-1], t)]
    if not owners:
        return "unknown key." + close
    key = ".".join(str(p) for p in loc)
    return (f"`{key}` is not a key of a task: {task} recipe; it is a key of task: {' and '.join(owners)}. "
            f"task: {task} {root.about}.{close}")


def _format_errors(e: ValidationError, source: str, root: type[BaseModel]) -> str:
    lines = [f"Invalid recipe {source}:"]
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")  # pydantic's wording for a validator's ValueError
        if err["type"] == "extra_forbidden":
            msg = _unknown_key(tuple(err["loc"]), root)
        elif "input" in err and err["type"] not in ("missing", "value_error"):
            msg += f" (got {err['input']!r})"
        lines.append(f"  - {loc or '<root>'}: {msg}")
    return "\n".join(lines)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a raw recipe dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} is not of the form key.sub=value")
        path, _, text = item.partition("=")
        keys = [k for k in path.strip().split(".") if k]
        if not keys:
            raise RecipeError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise RecipeError(f"override {item!r}: the value is not valid YAML "
                              f"({getattr(e, 'problem', None) or e}); quote strings with ':' or '#' in them") from None
        node: Any = raw
        for i, k in enumerate(keys[:-1]):
            where = ".".join(keys[: i + 1])
            if isinstance(node, list):
                if not k.isdigit() or int(k) >= len(node):
                    raise RecipeError(f"override {item!r}: {where!r} is not an index of a list of {len(node)}")
                node = node[int(k)]
            else:
                if node.get(k) is None:
                    node[k] = {}
                node = node[k]
                if not isinstance(node, (dict, list)):
                    raise RecipeError(f"override {item!r}: {where!r} holds a value, not a mapping")
        last = keys[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise RecipeError(f"override {item!r}: {last!r} is not an index of a list of {len(node)}")
            node[int(last)] = value
        else:
            node[last] = value
    return raw


def parse_recipe(raw: dict[str, Any], source: str = "<dict>") -> Recipe:
    """The recipe of ``raw``: the type of its ``task:`` (retrieval when it has none), validated."""
    if not isinstance(raw, dict):
        raise RecipeError(f"Recipe {source} must be a YAML mapping at top level, got {type(raw).__name__}")
    try:
        kind = recipe_type(raw)
    except RecipeError as e:
        raise RecipeError(f"Invalid recipe {source}:\n  - {e}") from None
    try:
        return kind.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(_format_errors(e, source, kind)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.y*ml"))
        shown = f"; it holds {', '.join(inside[:5])}" + (" ..." if len(inside) > 5 else "") if inside else ""
        raise RecipeError(f"Recipe {str(path)!r} is a folder, not a recipe file{shown}; expected the path of one "
                          f"YAML recipe (see recipes/)")
    if not path.exists():
        raise RecipeError(f"Recipe file {str(path)!r} does not exist")
    if not path.is_file():
        raise RecipeError(f"Recipe {str(path)!r} is not a regular file (a device, socket or pipe); expected the "
                          f"path of one YAML recipe (see recipes/)")
    try:
        text = path.read_text()
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        tabs = " (YAML indents with spaces, never tabs)" if "\t" in text else ""
        raise RecipeError(f"Recipe {str(path)!r} is not valid YAML{at}: {problem}{tabs}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"Recipe {str(path)!r} cannot be read: {e}") from None
    made = _blocks_made_by(raw, overrides or [])
    if overrides:
        apply_overrides(raw, overrides)
    try:
        return parse_recipe(raw, str(path))
    except RecipeError as e:
        missing = [(block, item) for block, item in made if f"  - {block}." in str(e) and "Field required" in str(e)]
        if not missing:
            raise
        hints = "".join(f"\n  (the recipe has no `{block}:`; the override {item!r} made one that holds only what the "
                        "overrides give)" for block, item in missing)
        raise RecipeError(f"{e}{hints}") from None


def _blocks_made_by(raw: dict[str, Any], overrides: list[str]) -> list[tuple[str, str]]:
    """The top-level blocks the recipe lacks that an override would create (``teacher.checkpoint=...``
    on a recipe with no ``teacher:``), with the first override that does."""
    made: dict[str, str] = {}
    for item in overrides:
        key = item.partition("=")[0].strip().split(".")
        if len(key) > 1 and isinstance(raw, dict) and raw.get(key[0]) is None and key[0] not in made:
            made[key[0]] = item
    return list(made.items())


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (saved beside every run, so a run can be repeated)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
