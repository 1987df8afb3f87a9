"""Official checkpoints -> the engine's models (one mapper per model; each states why every renamed or dropped key is
renamed or dropped)."""
