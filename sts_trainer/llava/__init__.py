"""LLaVA's recipe on Hugging Face models, with STS: its data format and collator (`data`), the two-stage command line
(`train`, `sts-train`), and the evaluation harness with offline metric modules (`evaluate`, `metrics`, `sts-eval`).

Built on the core (`sts_trainer`); the core never imports it.
"""
