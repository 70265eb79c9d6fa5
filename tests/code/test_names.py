"""The names that steps share have one home, agnews/names.py: no other module of the library, the entry points or the
benchmarks spells one of them as a string literal (docstrings and comments aside: the source is parsed).

A name that is a plain word (``error``, ``gate``, ``champion``, ``run_id``) is also an ordinary word of other
vocabularies (a JSON field, a column, a config key): it counts where MLflow reads it, as an argument of MLflow's tag,
metric, param, artifact and alias calls or an Optuna user attribute, and as a key of a run's or version's ``tags``,
``metrics``, ``params`` or ``aliases``. Every other name (``test_accuracy``, ``dataset.test.rows``) counts wherever it
is spelled.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from agnews.config import PROJECT_ROOT

NAMES = PROJECT_ROOT / "agnews" / "names.py"
CHECKED = ("agnews", "steps", "bench")
WORD = re.compile(r"[a-z]+(_id)?")
# What MLflow (and Optuna) call with a name: tags, metrics, params, artifacts, aliases and user attributes.
MLFLOW_CALL = re.compile(r"(set|get|delete|log)_\w+|set_tags|user_attrs|search_runs|search_model_versions")
MLFLOW_MAPS = {"tags", "metrics", "params", "aliases", "user_attrs"}


def defined_names(tree: ast.Module) -> dict[str, str]:
    """Each string that names.py defines at its top level (``A = "a"``, ``A, B = "a", "b"``), with its name."""
    found: dict[str, str] = {}
    for node in tree.body:
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            pairs = (
                zip(target.elts, node.value.elts, strict=False)
                if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple)
                else [(target, node.value)]
            )
            for name, value in pairs:
                if isinstance(name, ast.Name) and isinstance(value, ast.Constant) and isinstance(value.value, str):
                    found[value.value] = name.id
    return found


def docstrings(tree: ast.Module) -> set[int]:
    """The ids of the docstring nodes of a module, its classes and functions."""
    owners = [
        tree,
        *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)),
    ]
    return {
        id(owner.body[0].value)
        for owner in owners
        if owner.body and isinstance(owner.body[0], ast.Expr) and isinstance(owner.body[0].value, ast.Constant)
    }


def mlflow_names(tree: ast.Module) -> set[int]:
    """The ids of the string literals in MLflow-name positions: inside a call of ``MLFLOW_CALL``, or a subscript or
    ``.get`` of one of ``MLFLOW_MAPS``."""
    found: set[int] = set()
    for node in ast.walk(tree):
        inside: list[ast.AST] = []
        if isinstance(node, ast.Call):
            callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            receiver = node.func.value if isinstance(node.func, ast.Attribute) else None
            if MLFLOW_CALL.fullmatch(callee) or (
                callee == "get" and isinstance(receiver, ast.Attribute) and receiver.attr in MLFLOW_MAPS
            ):
                inside = [*node.args, *node.keywords]
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute):
            inside = [node.slice] if node.value.attr in MLFLOW_MAPS else []
        found |= {id(n) for part in inside for n in ast.walk(part) if isinstance(n, ast.Constant)}
    return found


def spelled(path: Path, names: dict[str, str]) -> list[str]:
    """Where ``path`` spells one of ``names`` as a string literal: ``path:line: 'value' (NAME)``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip, mlflow_positions = docstrings(tree), mlflow_names(tree)
    return [
        f"{path.relative_to(PROJECT_ROOT)}:{node.lineno}: {node.value!r} ({names[node.value]})"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value in names
        and id(node) not in skip
        and (not WORD.fullmatch(node.value) or id(node) in mlflow_positions)
    ]


def test_names_module_defines_the_shared_names() -> None:
    names = defined_names(ast.parse(NAMES.read_text()))
    assert names["test_accuracy"] == "TEST_ACCURACY" and names["dataset.test.rows_sha256"] == "TEST_ROWS_TAG"
    assert names["best_val_accuracy"] == "BEST_VAL_ACCURACY" and names["trial.state"] == "TRIAL_STATE_TAG"


def test_no_module_spells_a_shared_name_as_a_literal() -> None:
    names = defined_names(ast.parse(NAMES.read_text()))
    sources = sorted(path for folder in CHECKED for path in (PROJECT_ROOT / folder).rglob("*.py") if path != NAMES)
    assert sources, "no source found"
    found = sorted({where for path in sources for where in spelled(path, names)})
    assert not found, "import these from agnews.names instead:\n" + "\n".join(found)


def test_the_check_finds_a_literal_and_ignores_docstrings(tmp_path: Path) -> None:
    """The check itself: a literal is found, a docstring or comment naming the same thing is not; a plain word only
    where MLflow reads it."""
    source = PROJECT_ROOT / "agnews" / "probe_for_test_names.py"
    source.write_text(
        '"""Reads "test_accuracy"."""\n# test_accuracy\nMETRIC = "test_accuracy"\n'
        'answer = {"error": "no such version"}\nmlflow.set_tag("error", "x")\nerror = run.data.tags.get("error")\n'
    )
    try:
        assert spelled(source, {"test_accuracy": "TEST_ACCURACY", "error": "ERROR_TAG"}) == [
            "agnews/probe_for_test_names.py:3: 'test_accuracy' (TEST_ACCURACY)",
            "agnews/probe_for_test_names.py:5: 'error' (ERROR_TAG)",
            "agnews/probe_for_test_names.py:6: 'error' (ERROR_TAG)",
        ]
    finally:
        source.unlink()
