"""The one exception type for problems a user can fix (bad input, missing weights, absent CUDA)."""


class UserInputError(Exception):
    """A problem with the user's input, stated as one sentence saying what is wrong and how to fix it.

    The command line prints the message and exits with code 2; the Slicer module shows it in the panel.
    """

    exit_code = 2


class CancelledError(Exception):
    """Raised inside the engine when the caller's ``cancel()`` callback returns True."""
