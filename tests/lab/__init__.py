"""Network-namespace test lab for transocks."""
