"""The running daemon: the arbiter (signals, workers, the loop), the resync's bookkeeping,
the workers, the pidfile and the logs."""
