"""The one exception type users of lorax_ref need to catch."""


class LoraxInputError(ValueError):
    """Bad input to a lorax_ref function.

    The message names the argument, the problem and the offending shape, dtype or value,
    so that a user sees what to fix without reading a torch traceback.
    """
