from plugins.admin.tests.support import admin

__all__ = ["admin"]
