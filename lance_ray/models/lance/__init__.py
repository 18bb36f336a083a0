"""Clean-room Lance inference: see ARCHITECTURE.md for the module map (pipeline.LancePipeline is the entry)."""
