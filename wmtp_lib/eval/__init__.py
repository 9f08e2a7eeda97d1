"""Evaluation on held-out tasks, sandboxed execution of generated code, analysis tables (layer 4)."""
