"""The FCL algorithm as small, Lightning-free modules named after the paper's concepts."""
