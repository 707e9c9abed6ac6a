"""The FineTunePolicy kind: what a policy allows and has spent, its status sync, its admission policy."""
