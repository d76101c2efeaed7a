"""Shared by the fault tests: the command a run's closing message advises, parsed from the message."""
import re


def advised_argv(argv, message):
    """argv as the message says to run it again: `the same command with --resume` (or --overwrite), or `the same
    command again`. A message that advises nothing runnable fails the test."""
    match = re.search(r"run the same command (with (--resume|--overwrite)|again)", message, re.IGNORECASE)
    assert match, f"the message advises no command: {message}"
    flag = match.group(2)
    return list(argv) + ([flag] if flag and flag not in argv else [])
