"""Input frames (vmjobs/console.py) and the guest's console helper (images/vmjob-console.c),
the helper built as for a guest and run here, on the host, with a FIFO standing in for the
input port: the frames the host sends do to a job's stdin and terminal what the docs say."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from placement import Allocation, NodeShare
from vmjobs.cbuild import build_static
from vmjobs.console import (
    MAX_DATA,
    Data,
    End,
    FrameError,
    FrameReader,
    Resize,
    data_frames,
    encode,
)
from vmjobs.spec import SpecError, parse
from vmjobs.virt import domain_xml

frames = st.one_of(
    st.binary(min_size=1, max_size=300).map(Data),
    st.builds(Resize, st.integers(1, 9999), st.integers(1, 9999)),
    st.just(End()),
)


@given(st.lists(frames, max_size=20), st.integers(1, 50))
def test_frames_survive_any_split(sent: list, piece: int) -> None:
    stream = b"".join(encode(f) for f in sent)
    reader = FrameReader()
    got = []
    for i in range(0, len(stream), piece):
        got += reader.feed(stream[i:i + piece])
    assert got == sent


@pytest.mark.parametrize("bad", [b"d 0\n", b"d 65537\n", b"d -1\n", b"w 0 80\n", b"w 24\n",
                                 b"x\n", b"e 1\n", b"d" * 40, b"w 24 10000\n"])
def test_malformed_frames_are_refused(bad: bytes) -> None:
    with pytest.raises(FrameError):
        FrameReader().feed(bad)


def test_long_input_is_split_into_bounded_frames() -> None:
    data = os.urandom(MAX_DATA * 2 + 5)
    reader = FrameReader()
    got = [f for chunk in data_frames(data) for f in reader.feed(chunk)]
    assert [len(f.data) for f in got] == [MAX_DATA, MAX_DATA, 5]
    assert b"".join(f.data for f in got) == data
    with pytest.raises(FrameError):
        encode(Data(b""))


def test_stdin_is_a_spec_field() -> None:
    spec = parse({"argv": ["sh"], "stdin": "tty"})
    assert spec.stdin == "tty" and parse(spec.to_dict()) == spec
    assert parse({"argv": ["sh"]}).stdin is None
    with pytest.raises(SpecError, match="stdin must be one of pipe, tty"):
        parse({"argv": ["sh"], "stdin": "yes"})


def test_input_port_is_in_the_domain_xml_of_interactive_jobs_only() -> None:
    alloc = Allocation(host="h", cpus=(2,), memory_mib=256,
                       nodes=(NodeShare(node=0, cpus=(2,), memory_mib=256),))

    def channels(**extra: bool) -> list[tuple[str | None, str | None]]:
        spec = domain_xml.DomainSpec(
            name="vmjob-0a1b2c3d", job_id="0a1b2c3d", owner="u", owner_uid=1000,
            virt_type="qemu", allocation=alloc, kernel=Path("/k"), initrd=Path("/i"),
            console_log=Path("/c"), output_disk=Path("/o"), clock_channel=True, **extra)
        root = ET.fromstring(domain_xml.build(spec))
        return [(c.get("type"), c.find("target").get("name"))  # type: ignore[union-attr]
                for c in root.iter("channel")]

    assert channels() == [("unix", domain_xml.CLOCK_CHANNEL)]
    assert channels(input_channel=True) == [("unix", domain_xml.CLOCK_CHANNEL),
                                            ("unix", domain_xml.INPUT_CHANNEL)]


# --- the guest helper, run on the host -------------------------------------------------------


@pytest.fixture(scope="module")
def helper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_static("vmjob-console.c", tmp_path_factory.mktemp("bin"), "test", "-Os")


def run_helper(helper: Path, tmp_path: Path, mode: str, chunks: list[bytes],
               argv: list[str], pause_s: float = 0.0) -> subprocess.CompletedProcess:
    """The helper with a FIFO as its port; `chunks` written to it one by one (`pause_s`
    apart, after the first), the FIFO kept open until the helper exits."""
    port = tmp_path / "port"
    os.mkfifo(port)
    proc = subprocess.Popen([str(helper), mode, str(port), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    fd = os.open(port, os.O_WRONLY)

    def writer() -> None:
        for i, chunk in enumerate(chunks):
            if i and pause_s:
                time.sleep(pause_s)
            os.write(fd, chunk)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        os.close(fd)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_pipe_mode_feeds_stdin_and_end_of_file(helper: Path, tmp_path: Path) -> None:
    chunks = [encode(Data(b"1\n")), encode(Data(b"2\n")), encode(End())]
    result = run_helper(helper, tmp_path, "pipe", chunks,
                        ["sh", "-c", "read a; read b; read c || echo eof; echo $b$a; exit 4"],
                        pause_s=0.2)
    assert result.returncode == 4, result.stderr
    assert result.stdout == b"eof\n21\n"


def test_pipe_mode_end_of_input_is_end_of_file(helper: Path, tmp_path: Path) -> None:
    result = run_helper(helper, tmp_path, "pipe", [encode(Data(b"a\nb\n")), encode(End())],
                        ["wc", "-l"])
    assert result.returncode == 0 and result.stdout.strip() == b"2"


def test_tty_mode_size_ctrl_c_and_exit_code(helper: Path, tmp_path: Path) -> None:
    chunks = [encode(Resize(33, 77)), encode(Data(b"stty size; tty\n")),
              encode(Data(b"sleep 100\n")), encode(Data(b"\x03")),
              encode(Resize(40, 101)), encode(Data(b"echo after-$((1+1)); stty size\n")),
              encode(Data(b"exit 3\n"))]
    started = time.monotonic()
    result = run_helper(helper, tmp_path, "tty", chunks, ["sh"], pause_s=0.3)
    assert result.returncode == 3, result.stderr
    out = result.stdout.replace(b"\r\n", b"\n")
    assert b"\n33 77\n" in out and b"/dev/pts/" in out
    assert b"\nafter-2\n40 101\n" in out  # Ctrl+C ended the sleep; the shell went on
    assert time.monotonic() - started < 20


def test_a_malformed_frame_ends_input(helper: Path, tmp_path: Path) -> None:
    result = run_helper(helper, tmp_path, "pipe", [b"bogus\n"], ["cat"])
    assert result.returncode == 0 and result.stdout == b""
    assert b"malformed frame" in result.stderr


def test_helper_reports_a_missing_command(helper: Path, tmp_path: Path) -> None:
    result = run_helper(helper, tmp_path, "pipe", [encode(End())], ["/nonexistent"])
    assert result.returncode == 127
