"""python -m harness.train SPEC [key=value ...] [--resume RUN_ID]: one run, tracked in MLflow."""
from __future__ import annotations

import argparse
import sys

from harness.cli import Parser, exit_with, name_of, run_id


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(
        prog="python -m harness.train",
        description="Train one experiment spec and log it to MLflow "
                    "(MLFLOW_TRACKING_URI, default sqlite:///mlflow.db).",
        epilog="example: python -m harness.train experiments/digits_lenet.yaml optimizer.lr=0.01 "
               "model.dropout=0.3",
    )
    p.add_argument("spec", help="experiment spec (YAML), e.g. experiments/digits_lenet.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="typed spec overrides")
    p.add_argument("--resume", metavar="RUN_ID", type=run_id,
                   help="continue this MLflow run from its last checkpoint")
    p.add_argument("--run-name", type=name_of(),
                   help="MLflow run name (default <name>/<arch>-s<seed>, e.g. digits-lenet/lenet-s0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_intermixed_args(argv)  # overrides may follow options


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from harness.cli import setup_logging, user_errors
    from harness.core.device import prepare_threads

    prepare_threads()  # before torch loads: OpenMP reads its wait policy once

    setup_logging()
    with user_errors("harness.train"):
        from harness.spec import load_spec

        # Validate before importing torch and MLflow: a bad spec fails in well under a second.
        spec = load_spec(args.spec, args.overrides)
        from harness.core.loop import Diverged
        from harness.run import run
        from harness.tracking.store import mlflow_ui_command

        def report(result) -> None:  # the numbers, printed before the model is logged
            m = result.metrics
            print(f"run {result.run_id}: val/acc {m['val/acc']:.4f} (best {result.best:.4f}), "
                  f"test/acc {m['test/acc']:.4f}, {result.seconds:.1f}s", flush=True)
            if result.guard:
                print(f"mode guard findings: {result.guard}", flush=True)

        try:
            run(spec, run_name=args.run_name, resume_run_id=args.resume, progress=not args.quiet,
                system_metrics=None, on_tested=report)
        except Diverged as e:
            print(f"harness.train: the run diverged and was marked FAILED: {e}", file=sys.stderr)
            return 1
        print(f"browse: {mlflow_ui_command()}")
    return 0


if __name__ == "__main__":
    exit_with(main)
