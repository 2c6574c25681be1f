"""The engine model: pure, clock-free Python that predicts how an inference engine behaves on a GPU.

Nothing here does I/O or reads a clock. The emulated engine drives it on the wall clock, the simulator
on a virtual one, and load-predicting policies call it to estimate time to first token.
"""
