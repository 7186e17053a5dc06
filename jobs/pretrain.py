"""Ray Train + DeepSpeed: continued pretraining with the KILM objective, resumable and elastic.

    ray job submit --working-dir . -- python jobs/pretrain.py --help

A thin entry point: the same arguments as `kilm-ray train` (a --config file and dotted key=value
overrides). Under `ray job submit` it connects to the job's cluster (RAY_ADDRESS) and ships the
kilm_ray package to every worker through its runtime_env (kilm_ray.cluster.init_ray).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, shipped as working_dir

from kilm_ray.jobs import run_job  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_job("train", sys.argv[1:]))
