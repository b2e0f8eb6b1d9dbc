"""Running the `gpuwatch` command in-process, as the CLI tests do: its exit code and output,
and the one-line error a refusal must be."""

from __future__ import annotations

import io

import pytest

from gpuwatch import cli


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = cli.main(list(argv), out=out)
    return code, out.getvalue()


def one_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, out = run(*argv)
    err = capsys.readouterr().err
    assert code == 1 and out == "", (code, out, err)
    assert err.count("\n") == 1 and err.startswith("gpuwatch: error: "), err
    return err
