"""The live view of the engines: registry, health checks, metrics scraping, routing snapshots."""
