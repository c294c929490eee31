"""T2: a policy file others can write (issue 12, point 7).

Whoever can write the config, or replace it through a directory on its
path, admits themselves at the next restart.  Like sshd's StrictModes and
sudo's sudoers check, the broker refuses a config file (or a directory
above it) owned by another non-root uid or writable by group or others;
a world-writable directory counts only if it has the sticky bit and the
next component is root's (or the broker's).  Each refusal names the path
and the mode, and the command that fixes it; following that advice makes
the same file load."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from adversary import policy_toml, write_config
from helpers import NOBODY, ChildError, run_in_child
from shmbroker._broker.config import load_config
from shmbroker.errors import ConfigError

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own files as other uids")
START_TIMEOUT = 15.0
HANG_SECONDS = 5
GOOD = policy_toml(uids=(0,), executables=None)


def refused(path: str | Path) -> str:
    """The ConfigError message for ``path``; fails the test if it loads."""
    try:
        load_config(str(path))
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(f"{path}: "), message
        return message
    pytest.fail(f"{path} was accepted although others can change it")


def follow_advice(message: str) -> None:
    """Run the command the refusal suggests, as an operator would paste it."""
    match = re.search(r"run `([^`]+)`", message)
    assert match, f"no command to run in: {message}"
    subprocess.run(["sh", "-c", match.group(1)], check=True)


@pytest.fixture
def confdir(short_tmp: Path) -> Path:
    """A root-owned 0755 directory under the root-owned 0755 short_tmp."""
    path = short_tmp / "etc"
    path.mkdir(mode=0o755)
    return path


@ROOT_ONLY
def test_an_outsider_who_can_write_the_config_cannot_admit_themselves(confdir: Path) -> None:
    """The attack as filed: the config is world-writable, nobody adds a rule
    for itself, and the broker is restarted.  It must not start."""
    config = Path(write_config(confdir, GOOD))
    config.chmod(0o666)

    def add_myself() -> None:
        with open(config, "a") as f:
            f.write(f"[[rules]]\nuids = [{NOBODY}]\ncreate = true\n")

    run_in_child(add_myself, uid=NOBODY, gid=NOBODY)
    proc = subprocess.Popen(
        [sys.executable, "-m", "shmbroker", "serve", "--config", str(config), "--socket", str(confdir / "s" / "b.sock")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        _, err = proc.communicate(timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the broker started with a policy file anyone could write (and nobody did)")
    assert proc.returncode == 2
    assert f"{config}: the config file is writable by everyone (mode 0666" in err
    assert f"`chmod go-w {config}`" in err
    assert "Traceback" not in err


@ROOT_ONLY
@pytest.mark.parametrize("mode, who", [(0o664, "group 0 (root)"), (0o646, "everyone"), (0o620, "group 0 (root)")])
def test_a_config_writable_by_group_or_others_is_refused(confdir: Path, mode: int, who: str) -> None:
    config = Path(write_config(confdir, GOOD))
    config.chmod(mode)
    message = refused(config)
    assert f"the config file is writable by {who} (mode {mode:04o}, owner uid 0 (root))" in message
    assert f"run `chmod go-w {config}`" in message
    follow_advice(message)
    assert load_config(str(config)).policy is not None


@ROOT_ONLY
def test_a_config_owned_by_another_uid_is_refused(confdir: Path) -> None:
    config = Path(write_config(confdir, GOOD))
    os.chown(config, NOBODY, NOBODY)
    message = refused(config)
    assert f"the config file belongs to uid {NOBODY} (nobody) (mode 0644), not to root" in message
    assert f"uid {NOBODY} could rewrite the policy" in message and f"run `chown root {config}`" in message
    follow_advice(message)
    load_config(str(config))


@ROOT_ONLY
@pytest.mark.parametrize("owner, mode, expect", [
    (0, 0o777, "is writable by everyone and has no sticky bit (mode 0777, owner uid 0 (root))"),
    (0, 0o775, "is writable by group"),
    (NOBODY, 0o755, f"belongs to uid {NOBODY} (nobody) (mode 0755), not to root"),
])
def test_a_config_in_a_directory_others_control_is_refused(confdir: Path, owner: int, mode: int, expect: str) -> None:
    """A root-owned 0644 file is no safer than its directory: whoever can
    write the directory can rename the file away and put their own."""
    config = write_config(confdir, GOOD)
    os.chown(confdir, owner, NOBODY)
    confdir.chmod(mode)
    message = refused(config)
    assert f"directory {confdir} {expect}" in message
    assert "could replace the config file" in message
    follow_advice(message)
    load_config(config)


@ROOT_ONLY
def test_a_config_in_a_sticky_directory_must_be_roots(short_tmp: Path) -> None:
    """The /tmp rule: in a sticky world-writable directory only the file's
    own owner can replace it, so a root-owned file there is accepted and a
    file someone else put there is not."""
    shared = short_tmp / "shared"
    shared.mkdir()
    shared.chmod(0o1777)

    def plant() -> str:
        return write_config(shared, GOOD)

    planted = run_in_child(plant, uid=NOBODY, gid=NOBODY)
    assert f"belongs to uid {NOBODY}" in refused(planted)
    os.unlink(planted)
    load_config(write_config(shared, GOOD))


@ROOT_ONLY
def test_a_symlinked_config_is_checked_where_it_points(confdir: Path, short_tmp: Path) -> None:
    """The link lives in a trusted directory, the file it names in one
    nobody owns: nobody can swap the file, so it is refused, naming both."""
    theirs = short_tmp / "theirs"
    theirs.mkdir()
    target = write_config(theirs, GOOD)
    os.chown(theirs, NOBODY, NOBODY)
    link = confdir / "broker.toml"
    link.symlink_to(target)
    message = refused(link)
    assert f"it resolves to {target}, and directory {theirs} belongs to uid {NOBODY}" in message
    os.chown(theirs, 0, 0)
    load_config(str(link))


@ROOT_ONLY
def test_a_fifo_in_place_of_the_config_cannot_hang_the_start(confdir: Path) -> None:
    """Opened O_NONBLOCK and checked through the fd: a FIFO (or anything
    else swapped in) is refused at once instead of blocking the broker."""
    fifo = confdir / "broker.toml"
    os.mkfifo(fifo, 0o644)

    def load() -> object:
        signal.alarm(HANG_SECONDS)  # a load that blocks dies here instead of hanging the suite
        return load_config(str(fifo))

    with pytest.raises(ChildError) as info:
        run_in_child(load)
    assert info.value.type_name != "Died", "opening a FIFO as the config blocked the start"
    assert info.value.type_name == "ConfigError" and f"{fifo}: not a regular file" in info.value.message


@ROOT_ONLY
def test_status_refuses_an_untrusted_config_without_traceback(confdir: Path) -> None:
    config = Path(write_config(confdir, GOOD))
    config.chmod(0o664)
    proc = subprocess.run(
        [sys.executable, "-m", "shmbroker", "status", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert f"{config}: the config file is writable by group 0 (root) (mode 0664" in proc.stderr
    assert "Traceback" not in proc.stderr
