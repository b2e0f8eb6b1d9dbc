"""`gpuwatch serve`: the one service on the monitoring host.

It owns the reservations file (bookings, through gpuwatch.reservations' store) and the claims
(`gpuwatch run`: free GPUs held for a few minutes, kept in memory), checks every write against
the fleet Prometheus sees, and serves the JSON API, /metrics (the booking and claim series
Prometheus scrapes as job gpuwatch-reservations), /-/healthy and the lab's page at / (`web`:
the grid and booking in a browser), on the exporter's server (gpuwatch.exporter.web: TLS,
basic auth, limits).

By step: `options` (what it is asked to do), `identity` (who is asking), `claims` (the
claims held), `service` (the checked operations, blocking, no HTTP), `metrics` (the claim
collector and the registry), `web` (the page's files), `app` (HTTP: routes, JSON, browser
safety; build and start).
"""
