"""Tests against libvirt's test driver (test:///...): the real libvirt API, no hypervisor."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture
def default_conn() -> Iterator[libvirt.virConnect]:
    """test:///default; its state lives while a connection to it is open, so tests clean up."""
    conn = libvirt.open("test:///default")
    yield conn
    conn.close()


@pytest.fixture
def node_conn() -> Iterator[libvirt.virConnect]:
    """The test driver loaded with tests/data/testnode-2socket.xml."""
    conn = libvirt.open(f"test://{DATA / 'testnode-2socket.xml'}")
    yield conn
    conn.close()
