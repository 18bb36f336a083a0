"""Remote Ray clusters: job submission through the Jobs API, and cron schedules."""
