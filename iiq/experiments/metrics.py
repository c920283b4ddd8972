"""Every Prometheus metric of iiq, declared once, here.

Labels are tool ids and outcomes, never org or experiment ids, so series stay bounded.
Tool authors add their own metrics to this module (prefix ``experiment_``), for example::

    candidate_eval_seconds = Histogram(
        "experiment_candidate_eval_seconds", "Time to evaluate one candidate.",
        ["tool"], buckets=DURATION_BUCKETS,
    )

and a panel for it in ``deploy/grafana/iiq-experiments.json``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Seconds: from sub-second test runs to multi-hour distillation runs.
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800)
# Seconds a job waits in the queue: mostly sub-second, hours when an org is throttled.
QUEUE_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 15, 60, 300, 900, 3600, 14400)

experiments_created_total = Counter("experiments_created", "Experiments accepted by POST /experiments.", ["tool"])
experiments_completed_total = Counter(
    "experiments_completed", "Experiments that reached a terminal state, by state.", ["tool", "status"]
)
experiment_duration_seconds = Histogram(
    "experiment_duration_seconds",
    "Running time of an experiment, start to terminal state.",
    ["tool", "status"],
    buckets=DURATION_BUCKETS,
)
experiment_queue_wait_seconds = Histogram(
    "experiment_queue_wait_seconds", "Time from queued to running.", ["tool"], buckets=QUEUE_WAIT_BUCKETS
)
experiment_events_total = Counter("experiment_events", "Events stored and announced, by event type.", ["event_type"])
experiment_quota_rejections_total = Counter(
    "experiment_quota_rejections", "Creates refused by quota, by reason (budget or concurrency).", ["reason"]
)
experiments_recovered_total = Counter(
    "experiments_recovered", "Running experiments ended as failed because their worker was lost.", ["tool"]
)
listen_reconnects_total = Counter(
    "experiment_listen_reconnects", "Times this process re-established its LISTEN connection."
)
open_streams = Gauge("experiment_open_streams", "Event streams open in this process.")
loop_stalls_total = Counter(
    "experiment_loop_stalls", "Times the event loop of this process was blocked longer than the stall threshold."
)

# Read from Postgres at scrape time, so every process reports the same cluster-wide value.
experiments_running = Gauge("experiments_running", "Experiments in the running state, cluster-wide.", ["tool"])
experiment_queue_depth = Gauge(
    "experiment_queue_depth", "Jobs waiting in the procrastinate queue (status todo), cluster-wide.", ["queue"]
)
