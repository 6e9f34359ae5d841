"""Running suites: the runner, the worker pool, sessions and the Slurm executor."""
