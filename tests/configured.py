"""A shipped config's `:smoke` variant with dotted-path overrides, for in-process runs."""


def smoke_config(module, **overrides):
  """`module.get_config('smoke')` with {'text.max_length': 64, ...} applied, locked."""
  config = module.get_config('smoke')
  config.unlock()
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  config.lock()
  return config
