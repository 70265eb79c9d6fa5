"""A study never writes over an existing recipe unless asked (``tune.overwrite=true``), and the recipes that studies
write go where git ignores them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agnews.config import PROJECT_ROOT
from agnews.errors import ConfigError
from agnews.tuning import tune


def test_a_study_refuses_to_overwrite_an_existing_recipe_before_anything_runs(make_cfg, tmp_path: Path) -> None:
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    existing = recipes / "minilm-tuned.yaml"
    existing.write_text("# the committed recipe\n")
    cfg = make_cfg(f"tune.recipe_dir={recipes}", "tune.study=minilm-tuned", "tune.trials=1")
    with pytest.raises(ConfigError) as error:
        tune(cfg)
    assert str(error.value) == (
        f"tune.study=minilm-tuned: the recipe {existing} exists: choose another tune.study, or set "
        "tune.overwrite=true to replace it"
    )
    assert existing.read_text() == "# the committed recipe\n"
    assert not (tmp_path / "mlflow").exists(), "nothing ran: no tracking store was opened"


@pytest.mark.parametrize(
    ("path", "ignored"), [("conf/recipe/my-study.yaml", True), ("conf/recipe/minilm-tuned.yaml", False)]
)
def test_git_ignores_the_recipes_that_studies_write_but_not_the_committed_one(path: str, ignored: bool) -> None:
    done = subprocess.run(["git", "check-ignore", "-q", path], cwd=PROJECT_ROOT, check=False)
    assert done.returncode == (0 if ignored else 1)
