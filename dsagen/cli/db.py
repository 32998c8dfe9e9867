"""`dsagen db ...` (moved here from dsagen.tuning.db_cli)."""
from ..tuning.db_cli import db_app  # noqa: F401
