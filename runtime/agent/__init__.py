"""One node of a multi-node job: its rendezvous (:mod:`.rendezvous`), what every node agrees on (:mod:`.job`), and
the node's agent, daemon and workers (:mod:`.node`)."""
