"""`aipd cluster up|address|down`: a real multi-node Ray cluster on this machine, for trying distribution."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from app.cli_common import ConfigOpt, console, fail, handle_errors, new_app, settings_from

cli = new_app(help="A real multi-node Ray cluster on this machine, for trying distribution.")


@cli.command("up")
@handle_errors
def cluster_up(
    workers: int = typer.Option(1, "--workers", "-w", min=0, help="Worker nodes besides the head."),
    cpus: int = typer.Option(4, "--cpus-per-node", min=1, help="Logical CPUs each node offers."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Start a head and N worker nodes on this machine, each with its own ports and the auth token.

    Examples:
      aipd cluster up --workers 2
      aipd train --address $(aipd cluster address) --workers 2
    """
    from cluster.local_cluster import cluster_up as up

    settings = settings_from(config)
    cluster = up(settings.work_dir, workers=workers, cpus_per_node=cpus, settings=settings)
    console.print(f"Ray cluster with {1 + workers} node(s) at [bold]{cluster.address}[/bold]")
    console.print(
        f"dashboard: {cluster.dashboard_url}  (token: ~/.ray/auth_token, header 'Authorization: Bearer <token>')"
    )
    console.print(
        f"use it:    export RAY_AUTH_MODE=token RAY_ADDRESS={cluster.address}; aipd train --workers {1 + workers}"
    )
    console.print("stop it:   aipd cluster down")


@cli.command("address")
@handle_errors
def cluster_address(config: Optional[Path] = ConfigOpt) -> None:
    """Print the running local cluster's address (for RAY_ADDRESS / --address)."""
    from cluster.local_cluster import load_cluster

    cluster = load_cluster(settings_from(config).work_dir)
    if cluster is None:
        fail("no local cluster is running (start one with `aipd cluster up`)")
    print(cluster.address)


@cli.command("down")
@handle_errors
def cluster_down(config: Optional[Path] = ConfigOpt) -> None:
    """Stop every process of the local cluster `aipd cluster up` started, and nothing else."""
    from cluster.local_cluster import cluster_down as down

    groups = down(settings_from(config).work_dir)
    console.print(f"stopped {len(groups)} node(s)" if groups else "no local cluster was running")
