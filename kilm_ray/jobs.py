"""What the scripts in jobs/ run: the CLI subcommand, connected to the job's cluster.

``ray job submit`` sets RAY_ADDRESS for the driver; ``init_ray`` then connects to that cluster with a
runtime_env that ships this package (py_modules). Serve jobs deploy and return (the application
keeps running on the cluster; pass ``serve.host=0.0.0.0`` to reach it from outside the head node, with its token:
``serve.auth_token_file=...``, docs/serving.md).
"""

from __future__ import annotations

from kilm_ray.cli import main


def run_job(command: str, argv: list[str]) -> int:
    args = [command, *argv]
    if command == "serve" and "--detach" not in args:
        args.append("--detach")
    return main(args)
