"""What every stage shares about the frozen LM: the prompt template, the `Prefix` it reads, the one injection
forward pass and greedy generation. Imports nothing of ours but `configs` (see docs/ARCHITECTURE.md)."""
