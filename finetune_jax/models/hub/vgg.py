"""vgg: aliases and checkpoint loaders (to be filled in)."""
