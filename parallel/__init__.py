"""Everything that knows about more than one device: device/backend choice, meshes, token
dispatchers, data-parallel wrappers and the distributed optimizer."""
