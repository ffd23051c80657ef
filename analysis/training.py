"""The training runs of an ablation (``analysis.ablation``): one after another, or in a pool of worker
processes, each a child MLflow run of the ablation; a locked SQLite store is retried, one broken run is
reported, never the end of the study."""
from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import time

from analysis.scoring import child_tags
from harness.spec import Spec

log = logging.getLogger("analysis.ablation")


def run_training(tasks, parent: str, ab, exp_id: str, workers: int, echo) -> list[str]:
    """Train every (arm, seed, spec) task as a child of ``parent``; the failures, one line each."""
    failures: list[str] = []
    if not tasks:
        return failures
    total = len(tasks)
    payloads = [(spec.model_dump(mode="json"), f"{arm.name}-s{seed}", parent, child_tags(ab, arm, seed))
                for arm, seed, spec in tasks]
    labels = [(arm.name, seed) for arm, seed, _ in tasks]

    def report(i: int, res: dict) -> None:
        arm, seed = labels[i]
        if res["status"] == "ok":
            m = res["metrics"]
            echo(f"  [{report.n}/{total}] {arm} seed {seed}: val/acc {m['val/acc']:.4f} "
                 f"test/acc {m['test/acc']:.4f} ({res['seconds']:.1f}s)")
        else:
            echo(f"  [{report.n}/{total}] {arm} seed {seed}: {res['status'].upper()} {res['error']}")
            if res["status"] == "failed":
                failures.append(f"{arm} seed {seed}: {res['error']}")

    report.n = 0
    if workers <= 1:
        for i, payload in enumerate(payloads):
            report.n += 1
            report(i, _train_with_retry(exp_id, *payload))
        return failures
    ctx = multiprocessing.get_context("spawn")  # no forked torch/OpenMP state, no inherited MLflow run
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                initargs=(workers,)) as pool:
        futures = {pool.submit(_train_with_retry, exp_id, *p): i for i, p in enumerate(payloads)}
        try:
            for fut in cf.as_completed(futures):
                report.n += 1
                report(futures[fut], fut.result())
        except KeyboardInterrupt:
            for f in futures:
                f.cancel()
            raise
    return failures


def _init_worker(workers: int) -> None:
    from harness.cli import setup_logging
    from harness.core.device import share_cores

    setup_logging()
    share_cores(workers)  # the wait policy came with the parent's environment
    logging.getLogger("harness.guard").setLevel(logging.ERROR)


def _train_with_retry(exp_id: str, spec_json: dict, run_name: str, parent: str, tags: dict,
                      attempts: int = 4) -> dict:
    """One training run; a locked SQLite store (several writers) is retried after removing the
    half-made run."""
    for attempt in range(attempts):
        res = _train_task(spec_json, run_name, parent, tags)
        if res["status"] != "failed" or "database is locked" not in res["error"] or attempt == attempts - 1:
            return res
        _delete_unfinished(exp_id, parent, tags["ablation.task"])
        time.sleep(1.0 + attempt)
    return res


def _train_task(spec_json: dict, run_name: str, parent: str, tags: dict) -> dict:
    from harness.core.loop import Diverged
    from harness.run import run

    spec = Spec.model_validate(spec_json)
    t = time.perf_counter()
    try:
        r = run(spec, run_name=run_name, parent_run_id=parent, tags=tags, progress=False, system_metrics=None)
        return {"status": "ok", "run_id": r.run_id, "metrics": r.metrics, "seconds": r.seconds}
    except Diverged as e:
        return {"status": "diverged", "error": str(e), "seconds": time.perf_counter() - t}
    except Exception as e:  # one broken run must not end the study; it is reported
        return {"status": "failed", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                "seconds": time.perf_counter() - t}


def _delete_unfinished(exp_id: str, parent: str, task: str) -> None:
    from mlflow import MlflowClient

    c = MlflowClient()
    try:
        for r in c.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent}' and "
                                                       f"tags.`ablation.task` = '{task}'"):
            if r.info.status != "FINISHED":
                c.delete_run(r.info.run_id)
    except Exception as e:  # the store is busy: the collection ignores unfinished runs anyway
        log.debug("could not delete the half-made run of %s: %s", task, e)
