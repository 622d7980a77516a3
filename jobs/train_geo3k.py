"""Train a vision-language policy on Geo3K-layout data with MAPO (or another estimator).

    python jobs/train_geo3k.py                                  # cpu-tiny where there is no GPU
    python jobs/train_geo3k.py --preset geo3k-qwen25vl-7b       # the paper's run, 8 GPUs
    ray job submit --working-dir . -- python jobs/train_geo3k.py --preset cpu-tiny
    python jobs/train_geo3k.py --output runs/x --resume auto    # continue a run

Options: --config FILE, --preset NAME, --set key=value (repeatable), --resume, --output.
"""

from __future__ import annotations

import time

from mapo_ray.job import connect_ray, job_parser, preflight, stop_on_startup_interrupt, summarize
from mapo_ray.loop import train
from mapo_ray.rollout.actor import create_rollout_actors


def main(description: str = __doc__, default_preset: str | None = None) -> None:
    args = job_parser(description.splitlines()[0]).parse_args()
    started = time.perf_counter()

    # Ctrl-C before the first step stops the job with exit status 130.
    with stop_on_startup_interrupt():
        # A wrong key, file, column or folder is named here, before Ray starts.
        job = preflight(args, default_preset)
        config, run_dir, model_path = job.config, job.run_dir, job.model_path
        print(f"run folder: {run_dir}\nmodel: {model_path}\ntrain data: {config.data.train}", flush=True)
        connect_ray()

        # The driver owns the rollout actors, so they outlive a learner restart; the learner reaches
        # them through Ray Train. Learner rank 0 starts the reward actors.
        rollout_actors = create_rollout_actors(config.rollout, model_path, seed=config.seed)

        train(
            config,
            run_dir=run_dir,
            model_path=model_path,
            rollout_actors=rollout_actors,
            resume_from=job.resume_from,
        )
    print("\n" + summarize(run_dir, time.perf_counter() - started), flush=True)


if __name__ == "__main__":
    main()
