"""
cli.py: what mmmoe's command-line tools share. A mistake in what the user gave (a missing file, a bad
setting, a damaged checkpoint) is a BadInput: every tool prints it as one line, `error: ...`, and exits
with status 1, never with a traceback. Checks run before any long work starts.

    from cli import BadInput, run
    if __name__ == "__main__":
        run(main)
"""


class BadInput(Exception):
    """A problem with what the user gave us, said in one line that names it."""


def run(main, *args):
    """Call main(*args); a BadInput becomes one line on stderr and exit status 1."""
    try:
        return main(*args)
    except BadInput as e:
        raise SystemExit(f"error: {e}")
