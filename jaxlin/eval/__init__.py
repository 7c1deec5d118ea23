"""Evaluation: lm-evaluation-harness-style tasks scored on an exported jaxlin model (see runner.run)."""
