"""The curvature engine: functional forward passes, products, and dense/diagonal reductions."""
