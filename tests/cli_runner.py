"""`phi-jax` run in the test's own process, as the tests of each command call it."""

from phi_jax import cli


def run(capsys, *argv):
    """(exit status, stdout, stderr) of `phi-jax ARGV`; each argument is passed as str."""
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err
