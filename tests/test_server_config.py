"""The server's settings file (--server-config FILE, TOML: its flags without dashes): used by
`dlheir server start`/`stop` and `python -m dlheir.server`; a flag on the command line beats the
file; relative paths are relative to the file; a bad file, key or value is one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dlheir.cli import main

pytestmark = pytest.mark.slow


def _dlheir(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_start_and_stop_from_a_settings_file_flags_win(tmp_path, capsys, monkeypatch):
    conf = tmp_path / "conf" / "server.toml"
    conf.parent.mkdir()
    conf.write_text('data_dir = "../cloud"\nport = 0\nworkers = 4\nready-file = "ready.json"\nindex = "flat"\n')
    monkeypatch.chdir(tmp_path / "conf")  # relative to the file's folder, not the working folder
    code, out, err = _dlheir(capsys, "server", "start", "--server-config", conf, "--workers", "3")
    try:
        assert code == 0, err
        log = (tmp_path / "cloud" / "server.log").read_text()
        assert "3 workers" in log  # the flag beat the file
        assert '"port"' in (tmp_path / "conf" / "ready.json").read_text()  # the file's ready file, beside it
    finally:
        code, out, err = _dlheir(capsys, "server", "stop", "--server-config", conf)
    assert code == 0 and "stopped" in out, err


@pytest.mark.parametrize("text, says", [
    ('data_dir = "x"\nbogus = 1\n', "unknown setting 'bogus'"),
    ('data_dir = "x"\nport = "eighty"\n', "port: not a valid value 'eighty'"),
    ('data_dir = "x"\nindex = "fast"\n', "index must be one of auto, flat, mih"),
    ('data_dir = "x"\ninsecure = "yes"\n', "insecure must be true or false"),
    ('port = 0\n', "give --data-dir DIR (or data_dir in --server-config FILE)"),
    ('data_dir = \n', "not a TOML file"),
])
def test_bad_settings_are_one_line(tmp_path, capsys, text, says):
    conf = tmp_path / "server.toml"
    conf.write_text(text)
    code, out, err = _dlheir(capsys, "server", "start", "--server-config", conf)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()  # nothing started, nothing made
    run = subprocess.run([sys.executable, "-m", "dlheir.server", "--server-config", str(conf)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2 and says in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_help_states_the_multi_index_default_the_server_uses():
    import argparse

    from dlheir.server.app import add_server_args
    from dlheir.server.index import MIH_MIN_ITEMS

    parser = argparse.ArgumentParser()
    add_server_args(parser)
    (action,) = [a for a in parser._actions if a.dest == "mih_min_items"]
    assert f"default {MIH_MIN_ITEMS})" in action.help  # it said 200000 while the server used 100000
