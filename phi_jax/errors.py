"""The base class of phi-jax's own errors.

Each error class of the project derives from `PhiJaxError` (and keeps a builtin base, ValueError or
RuntimeError, for callers that catch those). They are what a user can act on: a bad input, file or
setting, or a run that cannot go on. `phi-jax` reports one as a single line and exits with status 2
(phi_jax/cli.py, the one place that catches them); anything else is a bug and keeps its traceback.
"""


class PhiJaxError(Exception):
    pass
