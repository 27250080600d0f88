"""Summaries of what a crashed container said, for status messages."""

from __future__ import annotations

from gptq_operator.observe import crash_summary

TAIL = """    dill = import_dill()
           ^^^^^^^^^^^^^
  File "/usr/lib/python3.11/tempfile.py", line 362, in _get_default_tempdir
    raise FileNotFoundError(_errno.ENOENT,
FileNotFoundError: [Errno 2] No usable temporary directory found in ['/tmp', '/var/tmp']
"""


def test_a_traceback_becomes_its_exception_line_and_where_to_read_the_rest():
    said = crash_summary(TAIL, "tiny-worker-1-abcde")
    assert said == (
        "the worker crashed: FileNotFoundError: [Errno 2] No usable temporary directory "
        "found in ['/tmp', '/var/tmp'] (traceback: kubectl logs tiny-worker-1-abcde)"
    )
    assert 'File "' not in said and "^^^" not in said


def test_other_output_keeps_its_last_lines():
    said = crash_summary("loading\nKilled\n", "p")
    assert said == "loading / Killed (kubectl logs p)"
    assert crash_summary("  \n", "p") == "the worker exited without a message; see kubectl logs p"
