"""Testing kit: hypothesis strategies and contract tests over every registered component."""
