"""The training runtime: the compiled train step (``step``), the loop around it (``loop``, ``fit``),
Orbax checkpoints, JSONL metrics, datasets, profiling and multi-process start-up.
"""
