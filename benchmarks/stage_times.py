"""Per-stage wall time of the latest `easyanimate pipeline` run, read back from MLflow.

    python benchmarks/stage_times.py [--tracking-uri sqlite:///mlflow.db]

Prints one row per stage (MLflow run start to end) plus training throughput where the stage trains,
and the share of the pipeline's wall time each stage took.
"""

from __future__ import annotations

import argparse

from mlflow.tracking import MlflowClient

from easyanimate.config import load_settings
from easyanimate.runtime import configure_environment


def main() -> None:
    configure_environment()
    settings = load_settings()
    parser = argparse.ArgumentParser()
    parser.add_argument("--tracking-uri", default=settings.registry.tracking_uri)
    args = parser.parse_args()
    client = MlflowClient(tracking_uri=args.tracking_uri)
    experiment = client.get_experiment_by_name(settings.registry.experiment)
    if experiment is None:
        raise SystemExit("no MLflow experiment yet: run `easyanimate pipeline` first")
    parents = client.search_runs(
        [experiment.experiment_id],
        "attributes.run_name = 'pipeline'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not parents:
        raise SystemExit("no pipeline run found")
    parent = parents[0]
    children = client.search_runs(
        [experiment.experiment_id],
        f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        order_by=["attributes.start_time ASC"],
    )
    total = (parent.info.end_time - parent.info.start_time) / 1000
    print(f"pipeline run {parent.info.run_id}: {total:.1f} s wall")
    print(f"{'stage':12s} {'seconds':>8s} {'share':>6s} {'samples/s':>10s}")
    for run in children:
        seconds = ((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000
        rate = next((v for k, v in run.data.metrics.items() if k.endswith("samples_per_second")), None)
        print(
            f"{run.info.run_name:12s} {seconds:8.1f} {seconds / total:6.1%} {'' if rate is None else f'{rate:10.2f}'}"
        )


if __name__ == "__main__":
    main()
