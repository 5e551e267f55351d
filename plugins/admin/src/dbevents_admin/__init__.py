"""dbevents-admin: the admin API and the web console."""
