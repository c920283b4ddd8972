"""The tools shipped with iiq.

`iiq.experiments.registry.discover_tools` imports every public module of this package, and
each tool module (``l0_hardware_profiling``, ``l2_quantization``, ``l5_batching``) registers
its `ToolHandler` at import time. `catalog` and `roofline` are the shared model and GPU data
and the performance model the tools compute with.
"""
