"""Lost-host policies, pure parts: the spec fields, the state machine's transitions, the
snapshot XML, and what a restore does to a job's output files (vmjobs.daemon.hostloss)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmjobs.checkpoint import Periodic, adopt_periodic, save_path
from vmjobs.cli.options import spec_from_options
from vmjobs.daemon.hostloss import note_output, set_aside_after
from vmjobs.guest import JobFiles, OutputReader
from vmjobs.jobs import HostLossPolicy, JobState, allowed
from vmjobs.spec import SpecError, checkpoint_every_of, parse
from vmjobs.virt.domains import memory_snapshot_xml


def test_the_policy_defaults_to_fail_and_round_trips() -> None:
    assert parse({"argv": ["true"]}).on_host_loss == HostLossPolicy.FAIL
    spec = parse({"argv": ["true"], "on_host_loss": "restore", "checkpoint_every": "10m"})
    assert (spec.on_host_loss, spec.checkpoint_every) == (HostLossPolicy.RESTORE, 600.0)
    assert parse(spec.to_dict()) == spec
    assert checkpoint_every_of(spec.to_dict()) == 600.0
    # records written before the fields existed
    assert HostLossPolicy.of({"argv": ["true"]}) == HostLossPolicy.FAIL
    assert checkpoint_every_of({}) is None and checkpoint_every_of({"checkpoint_every": "x"}) \
        is None


@pytest.mark.parametrize(("fields", "message"), [
    ({"on_host_loss": "retry"}, "--on-host-loss must be one of fail, requeue, restore, not "
                                "'retry'"),
    ({"checkpoint_every": "1m"}, "--checkpoint-every needs --on-host-loss restore"),
    ({"on_host_loss": "requeue", "checkpoint_every": "1m"}, "--checkpoint-every needs "
                                                            "--on-host-loss restore"),
    ({"on_host_loss": "restore", "checkpoint_every": "2s"}, "--checkpoint-every 2s is "
                                                            "shorter than the shortest"),
    ({"on_host_loss": "restore", "checkpoint_every": "soon"}, "invalid --checkpoint-every "
                                                              "'soon'"),
])
def test_bad_values_are_one_usage_line(fields: dict[str, str], message: str) -> None:
    with pytest.raises(SpecError) as caught:
        spec_from_options({"argv": ("true",), **fields})
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_yaml_field_names_itself(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("argv: ['true']\non_host_loss: sometimes\n")
    with pytest.raises(SpecError, match=r"^-f .*job.yaml: on_host_loss must be one of"):
        spec_from_options({}, job)
    job.write_text("argv: ['true']\non_host_loss: restore\ncheckpoint_every: 30\n")
    assert spec_from_options({}, job).checkpoint_every == 30.0


def test_the_transitions_of_each_policy() -> None:
    # fail, requeue, restore from a job whose host stopped answering
    for state in (JobState.LOST, JobState.QUEUED, JobState.CHECKPOINTED):
        assert allowed(JobState.UNREACHABLE, state)
    # a job that never ran is requeued (PLACED -> CHECKPOINTED is a refused restore's own)
    for state in (JobState.PLACED, JobState.STARTING):
        assert allowed(state, JobState.QUEUED)
    assert not allowed(JobState.STARTING, JobState.CHECKPOINTED)
    # a running job is checkpointed only through CHECKPOINTING (a save), not by a host loss
    assert not allowed(JobState.RUNNING, JobState.CHECKPOINTED)


def test_the_snapshot_leaves_every_disk_out() -> None:
    domain = ("<domain><devices><disk type='file' device='disk'><target dev='vda'/></disk>"
              "<disk type='file' device='disk'><target dev='vdb'/></disk></devices></domain>")
    snap = ET.fromstring(memory_snapshot_xml(domain, Path("/spool/jobs/j/periodic.3.save")))
    assert snap.tag == "domainsnapshot"
    memory = snap.find("memory")
    assert memory is not None and memory.attrib == {"snapshot": "external",
                                                    "file": "/spool/jobs/j/periodic.3.save"}
    assert [d.attrib for d in snap.iterfind("disks/disk")] == [
        {"name": "vda", "snapshot": "no"}, {"name": "vdb", "snapshot": "no"}]


def _files(tmp_path: Path, *outputs: bytes) -> JobFiles:
    files = JobFiles.of(tmp_path, "j")
    files.dir.mkdir(parents=True)
    for index, data in enumerate(outputs):
        files.output(index).write_bytes(data)
    return files


def test_a_restore_sets_aside_what_the_lost_run_printed_after_its_checkpoint(
        tmp_path: Path) -> None:
    # checkpoint taken 8 bytes into output 0; output 1 (after a migration) came later
    files = _files(tmp_path, b"count 0\ncount 1\ncount 2\n", b"count 3\n")
    taken = Periodic(seq=2, file="periodic.2.save", at=0.0, output_index=0, output_bytes=8,
                     time_left_s=None)
    moved, kept = set_aside_after(files, taken)
    assert (moved, kept) == (24, ["lost.0.out", "lost.1.out"])
    assert files.output(0).read_bytes() == b"count 0\n" and files.output(1).read_bytes() == b""
    assert (files.dir / "lost.0.out").read_bytes() + (files.dir / "lost.1.out").read_bytes() \
        == b"count 1\ncount 2\ncount 3\n"
    note_output(files, "vmjob: restored\n")
    (files.dir / "output.3.out").write_bytes(b"count 1\ncount 2\n")  # the restored guest's
    reader = OutputReader(files)
    assert reader.read(final=True, limit=1 << 20) == b"count 0\n"
    text = b"count 0\n"
    while chunk := reader.read(final=True):
        text += chunk
    # each line once, and vmjob's line between the runs; the lost files are not read
    assert text == b"count 0\nvmjob: restored\ncount 1\ncount 2\n"


def test_a_requeue_keeps_the_lost_runs_output_before_vmjobs_line(tmp_path: Path) -> None:
    files = _files(tmp_path, b"line 0\nline 1\n")
    assert note_output(files, "vmjob: again\n") == files.output(1)
    assert max(files.output_indexes()) + 1 == 2  # the next guest process writes output.2


def test_only_a_complete_recorded_checkpoint_is_adopted(tmp_path: Path) -> None:
    files = _files(tmp_path)
    taken = Periodic(3, "periodic.3.save", 1.0, 0, 0, 12.5)
    assert adopt_periodic(tmp_path, "j", {"checkpoint": taken.to_dict()}) is None  # no file
    (files.dir / "periodic.3.save").write_bytes(b"state")
    assert adopt_periodic(tmp_path, "j", {}) is None  # never recorded: not known complete
    assert adopt_periodic(tmp_path, "j", {"checkpoint": {"seq": "x"}}) is None
    assert adopt_periodic(tmp_path, "j", {"checkpoint": taken.to_dict()}) == taken
    assert save_path(tmp_path, "j").read_bytes() == b"state"
    assert not (files.dir / "periodic.3.save").exists()
