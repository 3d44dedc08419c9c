"""`vmjob image build|list`: the guest images in the spool."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from vmjobs.image import Image, build_image, list_images


def image_dict(image: Image) -> dict[str, Any]:
    return {"name": image.name, "id": image.id, "kernel_version": image.kernel_version,
            "size_bytes": image.size_bytes, "kernel": str(image.kernel),
            "initrd": str(image.initrd),
            # what guests boot: the uncompressed kernel and qboot when the image has them
            "boot_kernel": str(image.boot_kernel),
            "firmware": str(image.firmware) if image.firmware else None}


def _spool(obj: Any) -> Path:
    return Path(obj.config.spool)


@click.group()
def image() -> None:
    """Build and list guest images (kernel + base initramfs).

    \b
    Examples:
      vmjob image build
      vmjob image list
    """


@image.command("build")
@click.option("--kernel", type=click.Path(dir_okay=False, path_type=Path), metavar="PATH",
              help="Use this bzImage and its modules from /lib/modules/<version> instead of "
                   "Debian's cloud kernel.")
@click.option("--name", default="default", show_default=True,
              help="Tag for the image, as given to 'vmjob run --image'.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def build(obj: Any, kernel: Path | None, name: str, as_json: bool) -> None:
    """Build the guest image, or do nothing if it is already built.

    Downloads Debian's cloud kernel and busybox-static with apt (checked against apt's
    SHA256), packs busybox, the init and the virtio modules into a reproducible initramfs and
    stores it in the spool under a content address. Progress goes to stderr.

    \b
    Examples:
      vmjob image build
      vmjob image build --kernel /boot/vmlinuz-$(uname -r) --name host
    """
    build_command(_spool(obj), kernel, name, as_json)


def build_command(spool: Path, kernel: Path | None, name: str, as_json: bool) -> None:
    started = time.monotonic()

    def progress(message: str) -> None:
        click.echo(f"vmjob: {message}", err=True)

    result, built = build_image(spool, kernel=kernel, name=name, progress=progress)
    seconds = time.monotonic() - started
    if as_json:
        click.echo(json.dumps({"built": built, "seconds": round(seconds, 2),
                               "image": image_dict(result)}))
        return
    what = "built" if built else "already built"
    click.echo(f"{result.name}: {result.id} ({what} in {seconds:.1f}s; kernel "
               f"{result.kernel_version}, {result.size_bytes / 2**20:.1f} MiB)")


@image.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the images as a JSON list.")
@click.pass_obj
def list_(obj: Any, as_json: bool) -> None:
    """List the images in the spool: name, id, kernel version, size.

    \b
    Examples:
      vmjob image list
      vmjob image list --json
    """
    list_command(_spool(obj), as_json)


def list_command(spool: Path, as_json: bool) -> None:
    images = list_images(spool)
    if as_json:
        click.echo(json.dumps([image_dict(i) for i in images]))
        return
    if not images:
        click.echo("no images; build one with 'vmjob image build'")
        return
    rows = [("NAME", "ID", "KERNEL", "SIZE")]
    rows += [(i.name or "-", i.id, i.kernel_version, f"{i.size_bytes / 2**20:.1f} MiB")
             for i in images]
    widths = [max(len(row[c]) for row in rows) for c in range(3)]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) +
                   "  " + row[3])
