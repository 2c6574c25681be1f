"""fleetserve: an OpenAI-compatible control plane for LLM serving on heterogeneous fleets."""

__version__ = "0.1.0"
