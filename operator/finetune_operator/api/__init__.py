"""The three kinds' API: pydantic types (spec, status, conditions) from which the CRDs are generated."""
