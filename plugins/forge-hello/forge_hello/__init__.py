"""forge-hello: an example third-party FORGE plugin."""
