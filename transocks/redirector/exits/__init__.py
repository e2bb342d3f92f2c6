"""Exits chosen per connection, one concern a module.

`config` (the `pool` line), `member` (a member's health), `registry` (every
member of this worker), `balance` (a pool's order), `failover` (one opening's
way through its pool) and `metrics` (members in metrics and status).
"""
