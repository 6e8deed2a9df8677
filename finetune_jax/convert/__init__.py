"""Per-architecture key maps: a checkpoint's names <-> our param paths, both
ways, and Llama's GGUF layout. The file formats themselves are `formats/`'s.
"""
