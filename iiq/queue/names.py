"""Names of iiq's procrastinate queues and tasks, shared by the code that defers and the worker."""

EXPERIMENTS_QUEUE = "experiments"
MAINTENANCE_QUEUE = "maintenance"
RUN_TASK = "iiq.run_experiment"
PRUNE_TASK = "iiq.prune_finished_jobs"
