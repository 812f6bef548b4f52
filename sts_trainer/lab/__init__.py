"""Measuring STS: the planner (`plan`, `sts-plan`), the benchmark (`bench`, `sts-bench`), the accuracy experiment
(`experiment`), the demo (`demo`, `sts-demo`), and what they run on: a synthetic image-question world (`synthetic`)
and tiny models built from configs (`tiny`).

Built on the core and on `sts_trainer.llava`; neither imports it.
"""
