"""FineTuneSchedule: cron and trigger runs that assemble data and create FineTuneJobs (controller.py)."""
