"""Built-in backbones: UNITER (own implementation), LXMERT and ViLT (transformers)."""
