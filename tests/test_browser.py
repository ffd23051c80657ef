"""What a researcher sees: ``mlflow ui`` on a store made by the real commands (a run, a sweep with a
pruned trial, an ablation), opened in headless Chromium (Debian's ``chromium`` and ``chromium-driver``;
``.ci/run`` installs them). Each test opens a page as a user would and asserts what is on the screen.

Run with ``python -m pytest -m browser`` (~3 min on 2 cores: the store, the UI's start, the pages)."""
from __future__ import annotations

import re
import shutil
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import ui_pages  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """The store, the UI's address and one browser for the module."""
    for path in (ui_pages.CHROMIUM, ui_pages.CHROMEDRIVER):
        if not shutil.which(path):
            pytest.fail(f"{path} not found: apt-get install chromium chromium-driver (as .ci/run does)")
    import mlflow

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")  # the System metrics tab is looked at
        store = ui_pages.make_store(tmp_path_factory.mktemp("ui"))
    try:
        with ui_pages.mlflow_ui(store) as base, ui_pages.chromium() as driver:
            yield {"store": store, "base": base, "driver": driver}
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()


def page(ui, path: str, shows: str) -> str:
    return ui_pages.open_page(ui["driver"], ui["base"], path, shows=shows)


def route(link) -> str:
    """A link's MLflow route (``#/experiments/...``), to open in this tab."""
    return "#/" + link.get_attribute("href").split("/#/", 1)[1]


def test_the_sweep_parent_run_tells_the_story(ui):
    from selenium.webdriver.common.by import By

    from harness.tracking import links

    s, driver = ui["store"], ui["driver"]
    text = page(ui, links.run_path(s.experiment, s.sweep_parent), shows="Best:")
    assert "sweep:digits-lenet-" in text
    assert "3 complete, 1 pruned, 0 failed" in text
    # the best trial is one click away: a link in the description, named as its run (MLflow opens
    # description links in a new tab: the test follows the link's address)
    (best,) = {a.text: a for a in driver.find_elements(By.CSS_SELECTOR, f"a[href*='/runs/{s.best_trial}']")
               if a.text}.values()
    name = best.text
    assert name.startswith("trial-") and best.is_displayed()
    text = page(ui, route(best), shows=name)
    assert "sweep.best" in text  # its tag, to filter on


def test_every_trial_ranked_by_name_from_the_parents_link(ui):
    from selenium.webdriver.common.by import By

    from harness.tracking import links

    s, driver = ui["store"], ui["driver"]
    page(ui, links.run_path(s.experiment, s.sweep_parent), shows="Best:")
    ranked = driver.find_element(By.LINK_TEXT, "Every trial, best first")
    assert ranked.is_displayed()  # above the description's fold
    text = page(ui, route(ranked),
                shows=f"trial-{ui_pages.PRUNED_TRIAL} (pruned)")
    assert "4 matching runs" in text
    for n in range(4):
        assert f"trial-{n}" in text


def test_a_pruned_trial_says_so(ui):
    from harness.tracking import links

    s = ui["store"]
    text = page(ui, links.run_path(s.experiment, s.pruned_trial), shows="(pruned)")
    assert f"trial-{ui_pages.PRUNED_TRIAL} (pruned)" in text.splitlines()
    assert "Pruned by the" in text  # its description says by what and when
    assert "stopped_early" in text and "failure_reason" not in text
    assert "val/acc" in text and "test/acc" not in text  # partial curves; never tested


def test_a_plain_run_is_named_from_its_spec(ui):
    from harness.tracking import links

    s = ui["store"]
    text = page(ui, links.runs_path(s.experiment), shows="digits-lenet/lenet-s0")
    assert "sweep:digits-lenet-" in text


def test_the_models_page_shows_each_models_metrics(ui):
    from harness.tracking import links

    s = ui["store"]
    text = page(ui, f"#/experiments/{s.experiment}/models?{links.ML_VIEW}", shows="digits-lenet-lenet-s0")
    assert "No metrics recorded" not in text
    assert "digits-val" in text  # the metrics' columns, by the dataset they were measured on


def test_a_short_trial_has_system_metrics(ui):
    from selenium.webdriver.common.by import By

    from harness.tracking import links

    s, driver = ui["store"], ui["driver"]
    page(ui, f"#/experiments/{s.experiment}/runs/{s.best_trial}/system-metrics?{links.ML_VIEW}",
         shows="System metrics")
    from selenium.webdriver.support.ui import WebDriverWait

    def charts_drawn(d):
        text = d.find_element(By.TAG_NAME, "body").text
        return text if "cpu_utilization_percentage" in text else None

    text = WebDriverWait(driver, 60).until(charts_drawn)
    charts = re.search(r"System metrics\s*\((\d+)\)", text)
    assert charts and int(charts.group(1)) >= 3, text[:500]  # CPU, memory (x2), disk, network; GPU too


def test_the_ablation_report_renders_with_its_figures(ui):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from harness.tracking import links

    s, driver = ui["store"], ui["driver"]
    page(ui, links.run_path(s.ablation_experiment, s.ablation_parent, artifact="ablation/report.html"),
         shows="ablation/report.html")
    frame = WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.TAG_NAME, "iframe"))[0]
    driver.switch_to.frame(frame)  # MLflow shows HTML artifacts in a sandboxed frame
    try:
        WebDriverWait(driver, 60).until(lambda d: d.execute_script(
            "return document.images.length == 2 && Array.from(document.images).every(i => i.complete)"))
        widths = driver.execute_script("return Array.from(document.images).map(i => i.naturalWidth)")
        text = driver.find_element(By.TAG_NAME, "body").text
        tables = driver.find_elements(By.TAG_NAME, "table")
    finally:
        driver.switch_to.default_content()
    assert len(widths) == 2 and all(w > 0 for w in widths)  # decoded, not broken images
    assert "![" not in text and "| arm |" not in text  # nothing left as Markdown
    assert len(tables) == 3 and "Ablation digits-mode-bugs" in text


def test_the_ablation_parent_run_shows_the_effects(ui):
    from selenium.webdriver.common.by import By

    from harness.tracking import links

    s, driver = ui["store"], ui["driver"]
    text = page(ui, links.run_path(s.ablation_experiment, s.ablation_parent), shows="Ablation digits-mode-bugs")
    assert "no_zero_grad" in text and "Δ test/acc" in text
    hrefs = [a.get_attribute("href") for a in driver.find_elements(By.LINK_TEXT, "The full report")]
    assert hrefs and hrefs[0].split("?")[0].endswith(f"/runs/{s.ablation_parent}/artifacts/ablation/report.html")


def test_optuna_dashboard_names_the_objective_shows_the_spec_and_links_the_runs(ui):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    s, driver = ui["store"], ui["driver"]

    def shows(url: str, words: str) -> str:
        driver.get(url)
        return WebDriverWait(driver, 60, poll_frequency=0.5).until(
            lambda d: (lambda t: t if words in t else None)(d.find_element(By.TAG_NAME, "body").text),
            f"{url}: never showed {words!r}")

    with ui_pages.optuna_dashboard(s) as dash:
        text = shows(f"{dash}/dashboard/studies/0", "History")
        assert "val/acc" in text and "Objective 0" not in text
        note = shows(f"{dash}/dashboard/studies/0/note", "Spec (")
        assert "name: digits-lenet" in note.splitlines()  # the spec's YAML, a line per key
        hrefs = [a.get_attribute("href") for a in driver.find_elements(By.TAG_NAME, "a")]
        assert any(f"/runs/{s.sweep_parent}" in (h or "") for h in hrefs)
        shows(f"{dash}/dashboard/studies/0/trials", "MLflow run")
        hrefs = [a.get_attribute("href") or "" for a in driver.find_elements(By.TAG_NAME, "a")]
        assert any("#/experiments/" in h and "/runs/" in h for h in hrefs)  # each trial's run, a link
