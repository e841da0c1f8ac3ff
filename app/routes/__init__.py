"""API routers; app.main includes every router listed in ROUTERS (adding one is one line there)."""
