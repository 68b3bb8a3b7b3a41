"""`--dry-run`: a run checked before paying for it, then forecast from a few real rows.

- `checks`: the config, the endpoints and the input checked, rows counted, tokens and cost estimated,
  one probe request; nothing written;
- `forecast`: `run.forecast_rows` pending rows sent for real (and committed), the rest extrapolated:
  tokens, cost and wall time.
"""
