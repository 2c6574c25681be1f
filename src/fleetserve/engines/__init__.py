"""Engines: the emulated engine server, launchers for real engine processes (llama.cpp, vLLM, SGLang),
and the metric dialects each engine speaks."""
