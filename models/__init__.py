"""Model pairs: one module per pair, each declaring `PAIR = ModelPair(...)`."""
