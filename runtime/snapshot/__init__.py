"""In-memory, erasure-coded snapshots: the per-node daemon, its client, the trainer hook, recovery."""
