"""The FineTuneJob kind: controller, pure planner and stage table, builders, the job's own ModelServer."""
