"""The README's pictures of MLflow's UI: a fresh store made by the real commands (``ui_pages.make_store``:
a run, a sweep with a pruned trial, an ablation), ``mlflow ui`` on it, and headless Chromium taking the
pages a new user opens first, saved small (1000 px wide, 128 colours) as PNG.

    python scripts/screenshots.py [--out docs/ui] [--keep DIR]

Needs Debian's ``chromium`` and ``chromium-driver`` (``apt-get install chromium chromium-driver``). ~2 min
on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ui_pages  # noqa: E402

WIDTH = 1000  # px of the saved picture


def shoot(driver, path: Path, *, expand: bool = False, scroll_to: str | None = None,
          in_frame: str | None = None) -> None:
    from selenium.webdriver.common.by import By

    if expand:  # a long run description is folded under "Show more"
        for el in driver.find_elements(By.XPATH, "//*[normalize-space(text())='Show more']"):
            if el.is_displayed():
                el.click()
                break
    if scroll_to:
        els = [e for e in driver.find_elements(By.XPATH, f"//*[normalize-space(text())='{scroll_to}']")
               if e.is_displayed()]
        if els:
            driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", els[0])
    if in_frame:  # an HTML artifact, shown in a frame: scroll it to the first ``in_frame`` element
        driver.switch_to.frame(driver.find_element(By.TAG_NAME, "iframe"))
        driver.execute_script(f"document.querySelector('{in_frame}').scrollIntoView({{block: 'start'}})")
        driver.switch_to.default_content()
    time.sleep(3)  # charts and images finish drawing
    raw = path.with_suffix(".raw.png")
    driver.save_screenshot(str(raw))
    small(raw, path)
    raw.unlink()
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)")


def small(src: Path, dst: Path) -> None:
    from PIL import Image

    img = Image.open(src).convert("RGB")
    img = img.resize((WIDTH, round(img.height * WIDTH / img.width)), Image.LANCZOS)
    img.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(dst, optimize=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ui_pages.ROOT / "docs" / "ui"), help="folder for the PNG files")
    p.add_argument("--keep", help="make the store in this folder and keep it (default: a temporary one)")
    args = p.parse_args()
    from harness.cli import setup_logging

    setup_logging()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="harness-screenshots-") as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        take(folder, out)
        if args.keep:
            print(f"store: {folder}")
    return 0


def take(folder: Path, out: Path) -> None:
    from harness.tracking import links

    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")
    s = ui_pages.make_store(folder, epochs=20, trials=10, limit_train=2000, seeds=6)
    with ui_pages.mlflow_ui(s) as base, ui_pages.chromium() as driver:
        def open_(path: str, shows: str) -> None:
            ui_pages.open_page(driver, base, path, shows=shows)

        open_(links.run_path(s.experiment, s.sweep_parent), "Best:")
        shoot(driver, out / "sweep-parent.png", expand=True)
        ranked = links.runs_path(s.experiment, f"tags.mlflow.parentRunId = '{s.sweep_parent}'",
                                 order_by="metrics.`val/acc`")
        open_(ranked, f"trial-{ui_pages.PRUNED_TRIAL} (pruned)")
        shoot(driver, out / "trials-ranked.png")
        open_(links.run_path(s.experiment, s.pruned_trial), "(pruned)")
        shoot(driver, out / "pruned-trial.png")
        open_(f"#/experiments/{s.experiment}/runs/{s.best_trial}/system-metrics?{links.ML_VIEW}",
              "cpu_utilization_percentage")
        shoot(driver, out / "system-metrics.png")
        open_(links.run_path(s.ablation_experiment, s.ablation_parent), "Ablation digits-mode-bugs")
        shoot(driver, out / "ablation-parent.png", expand=True)
        open_(links.run_path(s.ablation_experiment, s.ablation_parent, artifact="ablation/report.html"),
              "ablation/report.html")
        shoot(driver, out / "ablation-report.png", in_frame="table")


if __name__ == "__main__":
    sys.exit(main())
