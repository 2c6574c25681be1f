"""OpenAI-shaped requests, responses, SSE framing and errors, shared by the gateway and the emulator."""
