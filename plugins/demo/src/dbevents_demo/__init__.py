"""`dbevents demo`: database changes becoming webhooks, with nothing to set up."""
