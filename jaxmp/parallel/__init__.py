"""The parallelism core: device meshes from a spec (``mesh``), logical axis names to mesh axes
(``rules``), and each parameter's sharding, FSDP and the sharding report (``sharding``).
"""
