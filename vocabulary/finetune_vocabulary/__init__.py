"""What the operator and the trainer image must agree on, stated once.

- `metrics`: metric names, which direction is better, and the primary-metric rule;
- `exitcodes`: the trainer's exit codes (CONTRACT.md) and which of them no retry can fix;
- `layout`: where a run's data, checkpoints, model and evaluation report live under its run prefix;
- `labels`: the API group, label and annotation keys, and the field manager name;
- `images`: which image runs which entrypoint;
- `distributed`: how the pods of a multi-node training Job find each other (environment, hostnames).
- `redaction`: what a credential looks like in text (the trainer's logs, the operator's copies of pod text).

Pure Python without dependencies: the operator imports it without torch, the trainer without Kopf.
"""
