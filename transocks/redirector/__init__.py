"""transocks, the redirector: diverted connections to an exit chosen per connection."""
