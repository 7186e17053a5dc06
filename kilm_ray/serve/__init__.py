"""Ray Serve: the knowledge-probe HTTP service and its client."""
