"""Training and evaluation code: datasets, trainers and the papers' metrics. Imports engine, never app."""
