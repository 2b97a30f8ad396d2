"""forge-observe: metrics, logs and traces of every node, stored in PostgreSQL."""
