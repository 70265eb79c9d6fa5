"""Every config in conf/ composes and resolves, and the recipes, seed recipe and presets mean what they say."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agnews.config import CONF_DIR, PROJECT_ROOT, compose
from agnews.errors import ConfigError
from tests.helpers import SEED_TEXT

OPTIONS = sorted(f"{path.parent.name}={path.stem}" for path in CONF_DIR.glob("*/*.yaml") if path.parent.name != "hydra")


@pytest.mark.parametrize("option", OPTIONS)
def test_every_option_composes_and_resolves(option: str) -> None:
    cfg = compose([option])
    assert cfg.train.learning_rate > 0 and cfg.data.val_size > 0


def test_a_model_brings_its_recipe_and_the_seed_recipe_keeps_the_seeds() -> None:
    for model in ("distilbert", "minilm", "tiny"):
        cfg = compose([f"model={model}"])
        assert cfg.train.learning_rate == cfg.model.recipe.learning_rate
        assert cfg.train.warmup_ratio == cfg.model.recipe.warmup_ratio
        assert cfg.train.label_smoothing == cfg.model.recipe.label_smoothing
        seed = compose([f"model={model}", "train=seed_recipe"]).train
        assert (seed.learning_rate, seed.warmup_ratio, seed.label_smoothing, seed.batch_size) == (2e-5, 0, 0, 8)
    assert compose(["model=minilm"]).train.learning_rate == 8e-5
    assert compose(["model=minilm", "train.learning_rate=1e-4"]).train.learning_rate == 1e-4  # still overridable


def test_a_model_is_named_in_descriptions_by_its_name_not_a_folder_of_the_training_machine() -> None:
    for model in ("distilbert", "minilm", "tiny"):
        cfg = compose([f"model={model}"])
        assert not Path(cfg.model.display_name).is_absolute(), cfg.model.display_name
    assert compose(["model=minilm"]).model.display_name == "sentence-transformers/all-MiniLM-L6-v2"
    assert compose(["model=distilbert", "model.name=org/other"]).model.display_name == "org/other"


def test_smoke_preset_has_its_own_model_experiment_and_gate() -> None:
    default, smoke = compose([]), compose(["preset=smoke"])
    assert smoke.registry.model_name != default.registry.model_name
    assert smoke.tracking.experiment != default.tracking.experiment
    assert (smoke.registry.gate, default.registry.gate) == ("smoke", "production")
    assert smoke.registry.min_accuracy < default.registry.min_accuracy
    assert smoke.model.name == compose(["model=minilm"]).model.name


def test_the_test_preset_is_the_tiny_run_and_yields_to_what_a_test_names_after_it() -> None:
    cfg = compose(["preset=test"])
    assert (cfg.model.name, cfg.data.sample_size, cfg.data.test_size, cfg.train.epochs) == (
        "tiny-distilbert",
        200,
        100,
        1,
    )
    assert cfg.registry == compose([]).registry  # the production gate, unless a test opens it
    varied = compose(["preset=test", "data.sample_size=400", "model=distilbert"])
    assert (varied.data.sample_size, varied.model.name) == (400, compose([]).model.name)


@pytest.mark.integration
def test_make_smoke_ends_with_the_lambda_answering_from_the_mirrored_model(agnews_dir: Path, tmp_path: Path) -> None:
    """The make target's whole path, on the tiny model (the real preset's MiniLM run is in bench/smoke.py)."""
    args = [
        f"data.source={agnews_dir}",
        f"storage.uri={tmp_path / 'store'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"train.output_dir={tmp_path / 'checkpoints'}",
        "model=tiny",
        "data.sample_size=300",
        "data.val_size=100",
        "data.test_size=100",
        "registry.min_accuracy=0",
        "registry.min_behaviour_pass_rate=0",
    ]
    done = subprocess.run(
        ["make", "--no-print-directory", "-o", ".venv/.installed", "smoke", f"ARGS={' '.join(args)}"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "distilbert-agnews-smoke v1 is @champion: promoted by the smoke gate" in done.stdout + done.stderr
    assert "not the production gate" in done.stdout
    lines = done.stdout.splitlines()
    answer = json.loads("\n".join(lines[max(i for i, line in enumerate(lines) if line == "{") :]))
    assert answer["model_version"] == 1 and answer["predicted_class"] in {"World", "Sports", "Business", "Sci/Tech"}
    assert (tmp_path / "store" / "models" / "distilbert-agnews-smoke" / "champion.json").is_file()
    assert SEED_TEXT in done.stdout  # the seed's example is what the handler answered


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trian.epochs=1", "trian.epochs=1: no such key; did you mean 'train.epochs'?"),
        ("train.epoch=1", "train.epoch=1: no such key; did you mean 'train.epochs'?"),
        ("+trian.epochs=1", "+trian.epochs=1: adds a key that no step reads; did you mean 'train.epochs'?"),
        ("+train.extra=1", "+train.extra=1: adds a key that no step reads"),
        ("model=minlm", "model=minlm: no such option; did you mean 'minilm'? (choose from distilbert, minilm, tiny)"),
    ],
)
def test_a_misspelled_override_fails_in_one_line_naming_the_closest_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        compose([override])
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


@pytest.mark.integration
def test_the_command_line_answers_a_misspelled_key_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "steps.train", "trian.epochs=1"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["error: trian.epochs=1: no such key; did you mean 'train.epochs'?"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.epochs=0"], "train.epochs=0 is out of range: it must be > 0"),
        (["train.learning_rate=-1e-5"], "train.learning_rate=-1e-05 is out of range: it must be > 0"),
        (["train.batch_size=0"], "train.batch_size=0 is out of range: it must be > 0"),
        (["train.warmup_ratio=1"], "train.warmup_ratio=1 is out of range: it must be in [0, 1)"),
        (["train.label_smoothing=1.0"], "train.label_smoothing=1.0 is out of range: it must be in [0, 1)"),
        (["train.serving_batch_size=0"], "train.serving_batch_size=0 is out of range: it must be > 0"),
        (["train.precision=fp8"], "train.precision=fp8 is out of range: it must be one of auto, bf16, fp16, fp32"),
        (["train.precision=BF16"], "train.precision=BF16 is out of range: it must be one of auto, bf16, fp16, fp32"),
        (["train.dataloader_workers=-1"], "train.dataloader_workers=-1 is out of range: it must be >= 0"),
        (["train.pad_to_multiple_of=-8"], "train.pad_to_multiple_of=-8 is out of range: it must be auto, null or >= 0"),
        (["train.pad_to_multiple_of=eight"], "train.pad_to_multiple_of=eight is out of range: it must be auto, null"),
        (["train.epochs=abc"], "train.epochs=abc: Value 'abc' of type 'str' is incompatible with type hint"),
        (["train.tf32=maybe"], "train.tf32=maybe: Value 'maybe' is not a valid bool"),
        (["data.sample_size=1.5"], "data.sample_size=1.5: Value '1.5' of type 'float' could not be converted to Int"),
        (["data.sample_size=-1"], "data.sample_size=-1 is out of range: it must be >= 0 (0 or null: every row)"),
        (["data.val_size=0"], "data.val_size=0 is out of range: it must be > 0"),
        (["registry.min_accuracy=2"], "registry.min_accuracy=2 is out of range: it must be in [0, 1]"),
        (["registry.min_behaviour_pass_rate=-0.1"], "registry.min_behaviour_pass_rate=-0.1 is out of range"),
        (["registry.version=abc"], "registry.version=abc: Value 'abc' of type 'str' could not be converted to Int"),
        (["registry.version=0"], "registry.version=0 is out of range: it must be > 0 or null"),
        (["registry.version=1", "registry.rollback=true"], "registry.rollback=true and registry.version are exclusive"),
        (["registry.run_id=abc", "registry.version=1"], "registry.run_id registers a new version: do not combine"),
        (["storage.lease_s=0"], "storage.lease_s=0 is out of range: it must be > 0"),
        (["tracking.cleanup.stale_after_minutes=-1"], "tracking.cleanup.stale_after_minutes=-1 is out of range"),
        (["tune.trials=0"], "tune.trials=0 is out of range: it must be > 0"),
        (["tune.study=../../x"], "tune.study=../../x is out of range: it must be a slug of 1 to 128 letters, digits"),
        ([f"tune.study={'s' * 600}"], f"tune.study={'s' * 600} is out of range: it must be a slug of 1 to 128"),
        (["tune.study="], "tune.study= is out of range: it must be a slug"),
        (["tune.storage="], "tune.storage= is out of range: it must be an RDB URL, or null (not blank)"),
        (["tune.pruner.n_warmup_steps=-1"], "tune.pruner.n_warmup_steps=-1 is out of range: it must be >= 0"),
        (["webhook.threads=0"], "webhook.threads=0 is out of range: it must be > 0"),
        (["~train.epochs"], "train.epochs: TrainSettings (DictConfig) does not support deletion"),
        (["train.epochs=1,2"], "Ambiguous value for argument 'train.epochs=1,2'"),
    ],
)
def test_a_bad_value_fails_at_composition_in_one_line_naming_its_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        compose(overrides)
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_an_environment_variable_is_checked_against_its_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAMPLE_SIZE", "0")
    assert compose([]).data.sample_size == 0
    monkeypatch.setenv("SAMPLE_SIZE", "many")
    with pytest.raises(ConfigError, match=r"^data.sample_size=.*: .*'many'"):
        compose([])


def test_a_number_keeps_the_type_it_was_written_in() -> None:
    """``int | float`` keys: ``train.epochs=1`` is still 1 in the run's parameters, and a fraction of an epoch runs."""
    assert repr(compose(["train.epochs=1"]).train.epochs) == "1"
    assert repr(compose(["train.epochs=0.3"]).train.epochs) == "0.3"
    assert repr(compose(["registry=open"]).registry.min_accuracy) == "0"


@pytest.mark.parametrize(
    ("step", "override", "message"),
    [
        ("train", "train.epochs=0", "error: train.epochs=0 is out of range: it must be > 0"),
        ("register", "registry.min_accuracy=2", "error: registry.min_accuracy=2 is out of range: it must be in [0, 1]"),
        (
            "tune",
            "tune.study=../../x",
            "error: tune.study=../../x is out of range: it must be a slug of 1 to 128 letters, digits, '.', '_' and"
            " '-', starting with a letter or digit",
        ),
        ("tune", "tune.storage=", "error: tune.storage= is out of range: it must be an RDB URL, or null (not blank)"),
        (
            "train",
            "train.epochs=abc",
            "error: train.epochs=abc: Value 'abc' of type 'str' is incompatible with type hint 'Union[int, float]'",
        ),
    ],
)
def test_the_command_line_answers_a_bad_value_in_one_line(call_step, step: str, override: str, message: str) -> None:
    result = call_step(step, override)
    assert (result.returncode, result.stderr.splitlines()) == (1, [message])
