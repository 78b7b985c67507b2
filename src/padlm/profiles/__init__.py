"""Per-user profiles: what padlm learns of a user's preference from their choices and their
history, stored in a database (SQLite or PostgreSQL) and applied at decoding time.

- ``learning``: the online preference model (Bayesian logistic regression, one Laplace step
  per choice) over per-axis features; pure math.
- ``store``: profiles, choices and recent responses in SQLite (WAL) or PostgreSQL, with
  versioned migrations and transactional updates.
"""
