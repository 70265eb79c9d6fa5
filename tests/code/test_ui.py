"""A user moves @champion in the MLflow UI (headless Chromium, driven by Selenium), and the Lambda follows by itself:
the webhook receiver mirrors the new champion, champion.json names it, the handler answers with it.

The `ui` suite (`make test-ui`): it needs Debian's `chromium` and `chromium-driver`. The steps are those of
docs/promotion.md, "In the UI"; the test saves a screenshot of the alias dialog, which
`UPDATE_SCREENSHOT=1 make test-ui` copies to docs/promote-champion.png.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import pytest
from mlflow import MlflowClient
from omegaconf import DictConfig

from agnews.config import PROJECT_ROOT, compose
from agnews.names import CHALLENGER, CHAMPION, PREVIOUS, PROMOTED_BY
from agnews.promotion.register import register
from agnews.promotion.registry import aliases
from agnews.tracking import step_run
from bundle.layout import POINTER
from tests.helpers import SEED_TEXT, TrainRuns, WebhookReceiver, unavailable

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

pytestmark = pytest.mark.ui

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
]
SCREENSHOT = PROJECT_ROOT / "docs" / "promote-champion.png"
WAIT_S = 60  # for the UI to render a step, and for the receiver to mirror


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    """Headless Chromium through chromedriver, with an empty profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        message = "the ui suite needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        unavailable(message)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"]:
        options.add_argument(flag)
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()


def click(browser: WebDriver, xpath: str) -> None:
    """Wait until the element is there and clickable, then click it, as a user would. The UI re-renders while it
    loads, so an element found a moment ago may be replaced before the click lands: find it again and retry."""
    from selenium.common.exceptions import ElementClickInterceptedException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.wait import WebDriverWait

    def clicked(driver: WebDriver) -> bool:
        element = expected_conditions.element_to_be_clickable((By.XPATH, xpath))(driver)
        if not element:
            return False
        element.click()
        return True

    ignored = (StaleElementReferenceException, ElementClickInterceptedException)
    WebDriverWait(browser, WAIT_S, ignored_exceptions=ignored).until(clicked)


def visible(browser: WebDriver, xpath: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.wait import WebDriverWait

    return WebDriverWait(browser, WAIT_S).until(expected_conditions.visibility_of_element_located((By.XPATH, xpath)))


def present(browser: WebDriver, xpath: str) -> bool:
    from selenium.webdriver.common.by import By

    return bool(browser.find_elements(By.XPATH, xpath))


def text(label: str) -> str:
    return f"//*[normalize-space(text())={json.dumps(label)}]"


def move_champion_in_the_ui(browser: WebDriver, server: str, name: str, version: int, screenshot: Path) -> None:
    """The documented steps: Model training, Model registry, the model, the version, the pencil next to Aliases, type
    champion, Enter, Save aliases."""
    browser.get(server)
    click(browser, f"//button[normalize-space(.)='Model training'] | {text('Model training')}")  # leave GenAI mode
    click(browser, "//a[normalize-space(.)='Model registry']")
    visible(browser, text("Registered Models"))
    if present(browser, "//button[normalize-space(.)='Try it now']"):  # the first visit's "new Model Registry UI"
        click(browser, "//button[normalize-space(.)='Try it now']")
    click(browser, f"//a[normalize-space(.)={json.dumps(name)}]")
    click(browser, f"//a[normalize-space(.)='Version {version}']")
    visible(browser, f"//h2[normalize-space(.)='Version {version}'] | {text(f'Version {version}')}")
    if present(browser, "//button[@aria-label='Close' and contains(@data-component-id, 'assistant')]"):
        click(browser, "//button[@aria-label='Close' and contains(@data-component-id, 'assistant')]")
    aliases_cell = (
        "//div[@data-testid='descriptions-item-label'][normalize-space(.)='Aliases']"
        "/following-sibling::div[@data-testid='descriptions-item-content']"
    )
    click(browser, f"{aliases_cell}//button")  # the pencil, "Edit aliases" (or "Add" on a version with no alias)
    dialog = f"//div[@role='dialog'][.//*[contains(normalize-space(.), 'alias for model version {version}')]]"
    field = visible(browser, f"{dialog}//input[@role='combobox']")
    field.send_keys(CHAMPION)
    from selenium.webdriver.common.keys import Keys

    field.send_keys(Keys.ENTER)
    visible(browser, f"{dialog}//*[contains(normalize-space(.), 'alias is also being used on version')]")
    browser.save_screenshot(str(screenshot))
    click(browser, f"{dialog}//button[normalize-space(.)='Save aliases']")
    visible(browser, f"{aliases_cell}//*[contains(normalize-space(.), '{CHAMPION}')]")


def run_register(cfg: DictConfig):
    with step_run(cfg, "register"):
        return register(cfg.registry, cfg.storage, cfg.tracking.experiment, cfg.registry.run_id)


def champion_json(bucket: str, name: str) -> dict | None:
    s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
    try:
        return json.loads(s3.get_object(Bucket=bucket, Key=f"models/{name}/{POINTER}")["Body"].read())
    except s3.exceptions.NoSuchKey:
        return None


def test_a_user_moves_champion_in_the_ui_and_the_lambda_follows(
    browser: WebDriver,
    train_runs: TrainRuns,
    webhook_receiver: Callable[[DictConfig], WebhookReceiver],
    serve,
    s3_env: str,
    bucket: str,
    tmp_path: Path,
) -> None:
    name = f"ui-{uuid.uuid4().hex[:8]}"

    def cfg(*overrides: str) -> DictConfig:
        return compose(
            [
                f"tracking.uri={train_runs.tracking_uri}",
                "tracking.experiment=registry-tests",
                f"storage.uri=s3://{bucket}",
                f"registry.model_name={name}",
                "registry.min_behaviour_pass_rate=0",
                *overrides,
            ]
        )

    receiver = webhook_receiver(cfg())
    assert run_register(cfg("registry.min_accuracy=0", f"registry.run_id={train_runs.good}")).version == 1
    rejected = run_register(cfg("registry.min_accuracy=0.99", f"registry.run_id={train_runs.worse}"))
    assert (rejected.version, rejected.alias) == (2, CHALLENGER)
    invoke = serve(f"s3://{bucket}/models/{name}", MODEL_REFRESH_SECONDS="0")
    assert invoke({"text": SEED_TEXT})["body"]["model_version"] == 1

    screenshot = tmp_path / "promote-champion.png"
    move_champion_in_the_ui(browser, train_runs.tracking_uri, name, 2, screenshot)
    assert screenshot.stat().st_size > 0
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(screenshot, SCREENSHOT)

    deadline = time.monotonic() + WAIT_S
    while (pointer := champion_json(bucket, name)) is None or pointer["version"] != 2:
        if time.monotonic() > deadline:
            pytest.fail(f"champion.json names {pointer} after {WAIT_S}s:\n{receiver.output()[-3000:]}")
        time.sleep(0.2)
    client = MlflowClient(train_runs.tracking_uri)
    assert aliases(client, name) == {CHAMPION: 2, PREVIOUS: 1}
    assert client.get_model_version(name, "2").tags[PROMOTED_BY] == "manual"
    assert invoke({"text": SEED_TEXT})["body"]["model_version"] == 2

    # The logged model's page links to the version registered from it, instead of "Not registered".
    run = client.get_run(train_runs.good)
    model_id = run.outputs.model_outputs[-1].model_id
    browser.get(f"{train_runs.tracking_uri}/#/experiments/{run.info.experiment_id}/models/{model_id}")
    link = visible(browser, f"{text('Model versions')}/following::a[@href='#/models/{name}/versions/1']")
    assert link.text.split() == [name, "v1"]
    assert not present(browser, text("Not registered"))
