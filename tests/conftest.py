import os

# Sharding tests need 8 devices; on CPU they are faked. Must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
