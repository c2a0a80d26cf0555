"""The one OS file lock (`vitkit.io.files.lock_file`) behind run folders (a second owner is refused) and
embeddings files and indexes (a second writer waits its turn)."""
import logging
import os
import threading

import pytest

from vitkit.io import files
from vitkit.io.files import LockHeld, lock_file, write_pid


def _in_thread(fn):
    """Start `fn` in a thread; return (thread, box) where box gets its result or exception."""
    box = {}

    def run():
        try:
            box["fd"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def test_a_held_lock_is_refused_at_once_with_the_holders_pid(tmp_path):
    path = tmp_path / "run" / ".lock"
    held = lock_file(path, wait=False)  # makes the folder
    write_pid(held)
    t, box = _in_thread(lambda: lock_file(path, wait=False))  # another open of the file: flock refuses it
    t.join(timeout=5)
    assert not t.is_alive(), "refuse mode waited for the holder"
    assert isinstance(box.get("error"), LockHeld) and box["error"].pid == str(os.getpid())
    os.close(held)
    fd = lock_file(path, wait=False)  # free again once the holder closes it
    assert fd is not None
    os.close(fd)


def test_a_held_lock_is_waited_for_and_the_wait_is_logged(tmp_path, caplog):
    path = tmp_path / ".emb.lock"
    held = lock_file(path, wait=True)
    write_pid(held)
    with caplog.at_level(logging.WARNING, logger="vitkit.io.files"):
        t, box = _in_thread(lambda: lock_file(path, wait=True, what="emb.safetensors"))
        t.join(timeout=0.5)
        assert t.is_alive() and not box, f"wait mode did not wait: {box}"
        os.close(held)
        t.join(timeout=5)
    assert not t.is_alive() and "error" not in box
    os.close(box["fd"])
    assert f"emb.safetensors is being written by another vitkit process (pid {os.getpid()})" in caplog.text


def test_a_lock_file_removed_by_its_holder_is_not_taken(tmp_path, monkeypatch):
    """A run folder's previous owner may delete the folder, lock file and all, while we wait to lock it: the lock
    taken must be on the file that is there now, not on the deleted one."""
    path = tmp_path / "run" / ".lock"
    real = files._flock
    calls = []

    def flock_then_removed(fd, p, wait, what):
        real(fd, p, wait, what)
        if not calls:  # the first time: the holder removes the folder as we lock
            calls.append(1)
            os.unlink(p)
            os.rmdir(p.parent)

    monkeypatch.setattr(files, "_flock", flock_then_removed)
    fd = lock_file(path, wait=False)
    assert os.fstat(fd).st_ino == os.stat(path).st_ino and len(calls) == 1
    os.close(fd)


def test_without_fcntl_nothing_is_locked(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "fcntl", None)
    assert lock_file(tmp_path / "a" / ".lock", wait=False) is None and (tmp_path / "a").is_dir()


@pytest.mark.parametrize("wait", [False, True])
def test_both_users_go_through_the_one_helper(tmp_path, monkeypatch, wait):
    """RunDir refuses (wait=False); retrieve's writer_lock waits (wait=True)."""
    from vitkit.tasks import retrieve
    from vitkit.train import rundir

    seen = []
    real = files.lock_file

    def spy(path, *, wait, what=""):
        seen.append(wait)
        return real(path, wait=wait, what=what)

    monkeypatch.setattr(rundir, "lock_file", spy)
    monkeypatch.setattr(retrieve, "lock_file", spy)
    if wait:
        with retrieve.writer_lock(tmp_path / "emb.safetensors"):
            pass
    else:
        rundir.RunDir.create(tmp_path, "r", overwrite=False).release()
    assert seen == [wait]
