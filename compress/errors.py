"""The one exception type users see: the CLI prints its message on one line and exits 2."""


class CompressError(Exception):
    """A user-facing error (bad recipe, unknown model, corrupt checkpoint...).

    The message must name the problem on its own, without a traceback.
    """
