"""Training engines: what runs the optimizer steps of a task (hf = the Trainer reference, fast = packed/compiled)."""
