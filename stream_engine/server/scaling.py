"""How the server scales out on Ray Serve (:mod:`.ray_serve`): replicas and autoscaling.

Kept apart from :mod:`.ray_serve` so that the command line can read it without Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Scaling:
    """How many replicas, and how many connections each takes before Serve adds another."""

    replicas: int | None = 1  # a fixed number; None: autoscale between min and max
    min_replicas: int = 1
    max_replicas: int = 1
    # open connections (WebSocket sessions and speech requests) per replica that autoscaling
    # aims at; docs/ray.md says how it was chosen
    target_connections: float = 2.0
    max_connections: int = 16  # Serve queues connections past this many on a replica
    graceful_shutdown_timeout_s: float = 60.0  # a removed replica's connections get this long
    num_gpus: float | None = None  # per replica; None: 1 when the cluster has GPUs, else 0
    num_cpus: float = 1.0

    def deployment_options(self, cluster_gpus: float) -> dict[str, Any]:
        gpus = self.num_gpus if self.num_gpus is not None else (1.0 if cluster_gpus else 0.0)
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_connections,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": gpus},
        }
        if self.replicas is not None:
            options["num_replicas"] = self.replicas
        else:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_connections,
                "upscale_delay_s": 10.0,
                "downscale_delay_s": 120.0,
            }
        return options
