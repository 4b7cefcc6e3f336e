"""Reading costs off compiled programs: one HLO reader (``hlo``), collectives, FLOPs and bytes
(``flops``), XLA's memory reports (``compiled``), the closed forms (``closed_forms``, ``textbook``), the
step report behind ``jaxmp.analyze`` (``step_report``), the hardware table and the mesh planner.
"""
