"""Moving running requests between engines (Llumnix, made heterogeneity-aware): `controller.py`."""

from fleetserve.migration.controller import (
    MIGRATION_POLICIES,
    EngineLoad,
    MigrationController,
    Move,
    WaitingHead,
    engine_load,
)

__all__ = ["MIGRATION_POLICIES", "EngineLoad", "MigrationController", "Move", "WaitingHead", "engine_load"]
