"""The ModelServer kind: controller and queue, pure pool planner, status, builders of the pool."""
