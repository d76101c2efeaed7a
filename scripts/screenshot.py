"""A picture of an HTML page (predict.py --explain-html's report) taken by headless Chromium:
python scripts/screenshot.py PAGE.html OUT.png [--width 1200 --height 900]

find_chromium() and run_chromium() are what tests/test_explain_html.py opens its pages with. The browser runs with a
profile of its own in a temporary folder, without the sandbox (which needs privileges a container rarely grants),
without /dev/shm (small in containers) and without a GPU, and is stopped after a timeout.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from side import files  # noqa: E402 (the project's root on the path first)

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class BrowserError(Exception):
    """No browser, or it did not start or finish: the message says which and why."""


def find_chromium():
    """The path of the first Chromium-like browser on PATH, or None."""
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def run_chromium(page, *mode, timeout=60, browser=None):
    """Open the file page in headless Chromium with the mode's flags (--dump-dom, --screenshot=...) and return its
    stdout; a BrowserError with the end of its stderr if it is missing, fails or outlasts timeout seconds."""
    browser = browser or find_chromium()
    if browser is None:
        raise BrowserError(f"no Chromium on PATH (looked for {', '.join(BROWSERS)})")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                   "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
                   f"--user-data-dir={profile}", *mode, "file://" + os.path.abspath(page)]
        try:
            done = subprocess.run(command, capture_output=True, timeout=timeout, cwd=profile)
        except subprocess.TimeoutExpired:
            raise BrowserError(f"{browser} did not finish within {timeout} s") from None
        except OSError as e:
            raise BrowserError(f"cannot start {browser}: {e.strerror or e}") from None
    if done.returncode != 0:
        tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-5:]
        raise BrowserError(f"{browser} exited with status {done.returncode}: " + (" | ".join(tail) or "no message"))
    return done.stdout


def screenshot(page, out, width=1200, height=900, timeout=60):
    """Write a width x height PNG of page's top to out (beside it first, renamed once the browser wrote it)."""
    with files.replacing(out, "the picture", suffix=".png") as tmp:  # Chromium picks the format from the suffix
        os.unlink(tmp)  # so that a browser that wrote nothing is told from one that wrote an empty file
        run_chromium(page, f"--screenshot={tmp}", f"--window-size={width},{height}", "--hide-scrollbars",
                     timeout=timeout)
        if not os.path.exists(tmp):
            raise BrowserError(f"the browser wrote no picture to {tmp}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", help="the HTML file")
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--timeout", type=int, default=60, help="seconds before the browser is stopped")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.page):
        sys.exit(f"error: no such file: {args.page}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        sys.exit(f"error: no such folder for {args.out}")
    if args.width < 1 or args.height < 1:
        sys.exit("error: --width and --height must be positive")
    try:
        screenshot(args.page, args.out, args.width, args.height, args.timeout)
    except (BrowserError, files.WriteFailed) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.out} ({args.width}x{args.height})")


if __name__ == "__main__":
    main()
