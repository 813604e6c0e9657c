"""How a run is distributed: the DeepSpeed config (generated from the typed config) and process setup."""
