"""Root conftest: kept thin on purpose; the plugin is loaded through its pytest11 entry point."""
