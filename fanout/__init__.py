"""fanout: apply SQL migrations stored in S3 to every shard of a fleet, with yoyo-migrations.

The library is the product; `fanout.cli` is a thin layer over these functions.
"""

from fanout.commands import accept, apply, baseline, inspect, merge_reports, plan, publish, shards, status, verify
from fanout.config import Environment, load_environment
from fanout.directory import Target
from fanout.errors import ConfigError, DirectoryError, FanoutError, SourceError
from fanout.report import Mode, RunReport, Status, TargetResult, exit_code

__all__ = [
    "ConfigError",
    "DirectoryError",
    "Environment",
    "FanoutError",
    "Mode",
    "RunReport",
    "SourceError",
    "Status",
    "Target",
    "TargetResult",
    "accept",
    "apply",
    "baseline",
    "exit_code",
    "inspect",
    "load_environment",
    "merge_reports",
    "plan",
    "publish",
    "shards",
    "status",
    "verify",
]
