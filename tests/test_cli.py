"""The command-line tools' one exit path: bad input -> one `error:` line and status 2, no traceback."""

import pytest

from mtp_jax.cli import run_main
from mtp_jax.config import ConfigError
from mtp_jax.data.readers import DataError


class Stopped(RuntimeError):
    pass


def raising(exc):
    def main(argv):
        raise exc
    return main


@pytest.mark.parametrize("exc", [ConfigError("train.lr: must be > 0"), DataError("d.jsonl: record 2: bad")])
def test_known_input_error_is_one_line_and_status_2(exc, capsys):
    assert run_main(raising(exc), []) == 2
    assert capsys.readouterr().err == f"error: {exc}\n"


def test_tool_errors_and_stops():
    assert run_main(raising(KeyError("x")), [], errors=(KeyError,)) == 2
    assert run_main(raising(Stopped("non-finite streak")), [], stopped=(Stopped,)) == 1


def test_other_errors_keep_their_traceback():
    with pytest.raises(ZeroDivisionError):
        run_main(raising(ZeroDivisionError("bug")), [])


def test_status_and_argv_pass_through():
    assert run_main(lambda argv: len(argv), ["a", "b"]) == 2
    assert run_main(lambda argv: None, []) == 0
