"""The embedded CRM in SQL (SQLite by default, PostgreSQL by URL).

``schema`` holds the tables, ``store`` the engines and the translation of database
errors, ``writer`` the write path, ``backend`` the :class:`SqlBackend` that ties them.
"""

from proca_sync.crm.sql.backend import ANALYSE_FIRST, DEFAULT_URL, SqlBackend
from proca_sync.crm.sql.schema import (
    SCHEMA_VERSION,
    actions,
    applied_messages,
    campaigns,
    consents,
    contact_keys,
    contacts,
    email_status_history,
    meta_table,
    metadata,
)
from proca_sync.crm.sql.store import (
    check_store_url,
    create_private_file,
    create_store_engine,
    normalise_url,
    sqlite_file,
)

__all__ = [
    "ANALYSE_FIRST",
    "DEFAULT_URL",
    "SCHEMA_VERSION",
    "SqlBackend",
    "actions",
    "applied_messages",
    "campaigns",
    "check_store_url",
    "consents",
    "contact_keys",
    "contacts",
    "create_private_file",
    "create_store_engine",
    "email_status_history",
    "meta_table",
    "metadata",
    "normalise_url",
    "sqlite_file",
]
