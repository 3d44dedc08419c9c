"""Live migration and checkpoint/restore figures between two hosts (a dev cluster by default).

For each guest size (128 MiB .. 1 GiB) and load (idle: `sleep`; dirty: a loop rewriting 64 MiB
of tmpfs), boots a guest on --from, live-migrates it to --to (vmjobs.virt.migration.migrate_domain
with the default policy), then saves it to the spool and restores it on --from. Prints total
migration time, downtime as libvirt measured it, memory moved, save and restore times and the
checkpoint file size. Figures, not a pass/fail test.

    python bench/migrate.py                          # the dev cluster 'dev', h1 -> h2
    python bench/migrate.py --config FILE --from a --to b --sizes 256M,1G
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

# bench/placement.py would shadow the placement package: import from the repository root.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import libvirt  # noqa: E402

from vmjobs import guest_protocol  # noqa: E402
from vmjobs.config import load  # noqa: E402
from vmjobs.convergence import Policy  # noqa: E402
from vmjobs.image import resolve_image  # noqa: E402
from vmjobs.jobs import new_job_id  # noqa: E402
from vmjobs.smoke import _allocation  # noqa: E402
from vmjobs.units import format_mib, parse_size_mib  # noqa: E402
from vmjobs.virt import domain_xml  # noqa: E402
from vmjobs.virt.conn import destroy_quietly  # noqa: E402
from vmjobs.virt.domain_xml import DomainSpec  # noqa: E402
from vmjobs.virt.migration import (  # noqa: E402
    MigrationFailed,
    migrate_domain,
    migration_uri,
    retarget_xml,
)

LOADS = {
    "idle": ("sh", "-c", "echo ready; sleep 100000"),
    "dirty": ("sh", "-c", "echo ready; while :; do dd if=/dev/zero of=/tmp/dirty bs=1M "
              "count=64 2>/dev/null; done"),
}


def boot(conn: libvirt.virConnect, workdir: Path, image: object, host: str, memory_mib: int,
         argv: tuple[str, ...]) -> libvirt.virDomain:
    job = f"bench-{new_job_id()}"
    initrd = workdir / "initrd"
    guest_protocol.write_job_initrd(
        guest_protocol.JobSpec(job_id=job, argv=argv, env={}, cpus=1, memory_mib=memory_mib),
        image.initrd, initrd)  # type: ignore[attr-defined]
    output = workdir / "output.raw"
    guest_protocol.create_output_disk(output, 1 << 20)
    console = workdir / f"console.{host}.log"
    xml = domain_xml.build(DomainSpec(
        name=f"vmjob-{job}", job_id=job, owner="bench", owner_uid=0, virt_type="qemu",
        allocation=_allocation(host, 0, memory_mib), kernel=image.boot_kernel,  # type: ignore
        loader=image.firmware,  # type: ignore[attr-defined]
        initrd=initrd, console_log=console, output_disk=output, clock_channel=True))
    dom = conn.createXML(xml, 0)
    deadline = time.monotonic() + 120
    while b"ready" not in (console.read_bytes() if console.exists() else b""):
        if time.monotonic() > deadline:
            raise SystemExit(f"guest on {host} did not start; see {console}")
        time.sleep(0.2)
    time.sleep(2)  # let the load run
    return dom


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="/run/vmjobs/devcluster/dev/config.yaml")
    parser.add_argument("--from", dest="source", default="h1")
    parser.add_argument("--to", dest="destination", default="h2")
    parser.add_argument("--sizes", default="128M,256M,512M,1G")
    parser.add_argument("--loads", default="idle,dirty")
    args = parser.parse_args()
    config = load(args.config)
    image = resolve_image(config.spool, "default")
    src, dst = config.host(args.source), config.host(args.destination)
    conns = {src.name: libvirt.open(src.uri), dst.name: libvirt.open(dst.uri)}
    sizes = [parse_size_mib(s) for s in args.sizes.split(",")]
    rows = [("GUEST", "LOAD", "MIGRATION", "DOWNTIME", "MOVED", "POLICY STEPS", "SAVE",
             "RESTORE", "CHECKPOINT FILE")]
    print(f"{src.name} -> {dst.name}, TCG, 1 vCPU, policy: {Policy()}", file=sys.stderr)
    for memory_mib in sizes:
        for load_name in args.loads.split(","):
            workdir = config.spool / "bench" / new_job_id()
            workdir.mkdir(parents=True)
            workdir.chmod(0o755)
            dom = None
            try:
                dom = boot(conns[src.name], workdir, image, src.name, memory_mib,
                           LOADS[load_name])
                xml = retarget_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE),
                                   _allocation(dst.name, 1, memory_mib), frozenset(),
                                   workdir / f"console.{dst.name}.log")
                try:
                    out = migrate_domain(dom, conns[dst.name], xml, migration_uri(dst.uri),
                                         Policy(), memory_mib)
                    migration = f"{out.duration_s:.2f}s"
                    downtime = f"{out.downtime_ms} ms"
                    moved = f"{(out.memory_bytes or 0) / (1 << 20):.0f} MiB"
                    steps = str(len(out.steps))
                    dom = conns[dst.name].lookupByName(dom.name())
                except MigrationFailed as exc:
                    migration, downtime, moved, steps = f"failed: {exc}", "-", "-", "-"
                here = dom.connect().getHostname()
                path = workdir / "checkpoint.save"
                started = time.monotonic()
                dom.save(str(path))
                save_s = time.monotonic() - started
                size = path.stat().st_size
                back = conns[src.name] if here == dst.name else conns[dst.name]
                started = time.monotonic()
                back.restoreFlags(str(path), None, libvirt.VIR_DOMAIN_SAVE_RUNNING)
                restore_s = time.monotonic() - started
                dom = back.lookupByName(dom.name())
                rows.append((format_mib(memory_mib), load_name, migration, downtime, moved,
                             steps, f"{save_s:.2f}s", f"{restore_s:.2f}s",
                             f"{size / (1 << 20):.0f} MiB"))
                print("  ".join(rows[-1]), file=sys.stderr, flush=True)
            except libvirt.libvirtError as exc:
                rows.append((format_mib(memory_mib), load_name,
                             f"failed: {exc.get_error_message()}", "-", "-", "-", "-", "-", "-"))
                print("  ".join(rows[-1]), file=sys.stderr, flush=True)
            finally:
                destroy_quietly(dom)
                shutil.rmtree(workdir, ignore_errors=True)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
