"""Every `vmjob` command, for the tests that check each one (--json, help examples)."""

from __future__ import annotations

import click


def commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[str, click.Command]]:
    """("sub command", command) for every leaf command under `group`, depth first."""
    found = []
    ctx = click.Context(group)
    for name in group.list_commands(ctx):  # the root group loads its commands lazily
        command = group.get_command(ctx, name)
        assert command is not None, name
        if isinstance(command, click.Group):
            found.extend(commands(command, (*path, name)))
        else:
            found.append((" ".join((*path, name)), command))
    return found
