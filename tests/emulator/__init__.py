"""Unit tests of the embedded cluster itself (dev/localcluster): its CRD validator, RBAC evaluator and the
local kubelet's runtime table. Dev tooling, kept apart from the product's tests; `make test-emulator`."""
